"""Configuration of the lmblocks LLaMA family (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language
Models"; Llama 2; Llama 3).

Field names follow transformers' `LlamaConfig`, so the `config.json` of a Llama checkpoint on the Hub (or one written
by transformers' `LlamaForCausalLM.save_pretrained`) loads here too: `from_dict` translates it. RoPE settings live in
`rope_parameters` (`rope_type`, `rope_theta`, and the scaling factors of the `linear`, `dynamic`, `yarn` and `llama3`
variants); the legacy keys `rope_theta` / `rope_scaling` of older config files are folded into it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_common import LmbPretrainedConfig

# RoPE variants the rotary embedding can compute: the original one plus transformers' scaled variants.
SUPPORTED_ROPE_TYPES = ("default", *ROPE_INIT_FUNCTIONS)

_LLAMA1 = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
_LLAMA3 = dict(
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
# Llama 3.1: the Llama 3 shapes trained on to 128k tokens with frequency-dependent RoPE scaling ("llama3").
_LLAMA31 = dict(
    _LLAMA3,
    max_position_embeddings=131072,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)

LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA (2023-02): multi-head attention, 2k context.
    "llama-7b": dict(_LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(_LLAMA1, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama-33b": dict(_LLAMA1, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),
    "llama-65b": dict(_LLAMA1, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
    # Llama 2 (2023-07): 4k context; grouped-query attention (8 key-value heads) for 70B.
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40),
    "llama2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8),
    # Llama 3 (2024-04): 128k vocabulary, 8k context, rope_theta 500000, grouped-query attention everywhere.
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    # Llama 3.1 (2024-07): 128k context through llama3 RoPE scaling.
    "llama3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8),
    "llama3.1-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8),
    "llama3.1-405b": dict(_LLAMA31, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                          num_attention_heads=128, num_key_value_heads=8),
    # Small shapes for CPU runs and tests.
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
}


@strict
class LmbLlamaConfig(LmbPretrainedConfig):
    """LLaMA: pre-RMSNorm decoder blocks, SwiGLU feed-forward of width `intermediate_size`, rotary position
    embeddings, grouped-query attention (`num_key_value_heads` ≤ `num_attention_heads`), no biases by default,
    untied input and output embeddings by default.

    Derived when not given, and recomputed when their sources change (`derived_fields`): `head_dim` =
    `hidden_size // num_attention_heads` and `num_key_value_heads` = `num_attention_heads` (multi-head attention).

    Example: `LmbLlamaConfig.from_preset("llama3-8b")` or
    `LmbLlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)`.
    """

    model_type = "lmb_llama"
    keys_to_ignore_at_inference = ["past_key_values"]
    presets: ClassVar[dict[str, dict[str, Any]]] = LLAMA_PRESETS
    # transformers' LlamaConfig files (the Llama checkpoints on the Hub, TinyLlama, SmolLM2) load here. Keys such as
    # `pretraining_tp` (Meta's tensor-parallel degree at pretraining, ignored by transformers 5 too) or SmolLM2's
    # `is_llama_config` are kept as they are; interleaved RoPE (pairs (0,1), (2,3), ... instead of the two halves)
    # would change the computation and is refused.
    foreign_model_type: ClassVar[str] = "llama"
    fixed_keys: ClassVar[dict[str, Any]] = {"rope_interleaved": False}
    derived_fields = {
        "head_dim": (("hidden_size", "num_attention_heads"), lambda c: c.hidden_size // c.num_attention_heads),
        "num_key_value_heads": (("num_attention_heads",), lambda c: c.num_attention_heads),
    }
    # Legacy RoPE keys of older config files; `PreTrainedConfig.__post_init__` moves them into `rope_parameters`.
    extra_accepted_keys: ClassVar[frozenset[str]] = frozenset({"rope_scaling", "rope_theta"})
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")`): column-shard the projections into heads / the
    # hidden MLP width, row-shard the projections back to the model width, so each layer needs one all-reduce
    # after attention and one after the MLP.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    # Pipeline parallelism: the inputs and outputs of each stage of the base model.
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rms_norm_bias: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False

    def validate_architecture(self):
        """Checks shapes and options that would otherwise fail deep inside a forward pass."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}): {self.hidden_size} / {self.num_attention_heads} = "
                f"{self.hidden_size / self.num_attention_heads:g} is not a whole head size."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}): in grouped-query attention each key-value head serves the same "
                f"number of query heads."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of dimensions.")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"Unknown rope_type {rope_type!r} in rope_parameters. Supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"Unknown hidden_act {self.hidden_act!r}.")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}.")


__all__ = ["LmbLlamaConfig", "LLAMA_PRESETS", "SUPPORTED_ROPE_TYPES"]
