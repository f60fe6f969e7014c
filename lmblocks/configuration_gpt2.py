"""Configuration of the lmblocks GPT-2 family (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners").

Field names follow the official GPT-2 checkpoints (`n_embd`, `n_layer`, ...), so a `config.json` written by
transformers' built-in `GPT2Config` loads here too: `from_dict` translates it and refuses the GPT-2 variants this
implementation does not have (cross-attention, layer-index attention scaling, ...).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from huggingface_hub.dataclasses import strict

from .configuration_common import LmbPretrainedConfig

if TYPE_CHECKING:
    from transformers import GPT2Config

GPT2_PRESETS: dict[str, dict[str, Any]] = {
    # GPT_CONFIG_124M: vocab 50257, context 1024, width 768, 12 heads, 12 layers, dropout 0.1.
    "124M": dict(n_embd=768, n_layer=12, n_head=12),
    "355M": dict(n_embd=1024, n_layer=24, n_head=16),
    "774M": dict(n_embd=1280, n_layer=36, n_head=20),
    "1558M": dict(n_embd=1600, n_layer=48, n_head=25),
    # Small shapes for CPU runs and tests.
    "small": dict(n_embd=384, n_layer=6, n_head=6, n_positions=256),
    "tiny": dict(vocab_size=1024, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1023, eos_token_id=1023),
}


@strict
class LmbGPT2Config(LmbPretrainedConfig):
    """GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU MLP of width `n_inner` (default 4·`n_embd`),
    fused QKV projection, tied input and output embeddings.

    `lm_loss_weight` is λ of the GPT fine-tuning objective L = L_task + λ·L_LM, used by
    `LmbGPT2ForSequenceClassification` when it is given labels (the GPT paper uses λ = 0.5; 0 turns it off).

    Example: `LmbGPT2Config.from_preset("124M")` or `LmbGPT2Config(n_embd=256, n_layer=4, n_head=4)`.
    """

    model_type = "lmb_gpt2"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }
    presets: ClassVar[dict[str, dict[str, Any]]] = GPT2_PRESETS
    # transformers' GPT2Config files (the official checkpoints) load here. Keys only its double-heads model uses
    # (`summary_*`), `n_ctx` and `task_specific_params` have no effect and are kept as they are; the variants below
    # change the attention and are accepted only at the value lmblocks implements.
    foreign_model_type: ClassVar[str] = "gpt2"
    fixed_keys: ClassVar[dict[str, Any]] = {
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
    }
    derived_fields = {"n_inner": (("n_embd",), lambda c: 4 * c.n_embd)}

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    qkv_bias: bool = True
    lm_loss_weight: float = 0.0
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    def validate_architecture(self):
        """Checks shapes that would otherwise fail deep inside a forward pass."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): each head gets n_embd / n_head "
                f"dimensions."
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")

    def to_transformers_gpt2(self) -> "GPT2Config":
        """The equivalent config of transformers' built-in GPT-2, for exporting to its format.

        `lm_loss_weight` has no counterpart there (transformers' GPT-2 has no auxiliary LM loss) and is left out;
        `qkv_bias=False` cannot be expressed, so it is refused.
        """
        from transformers import GPT2Config

        if not self.qkv_bias:
            raise ValueError("transformers' GPT-2 always has a bias on c_attn; a model with qkv_bias=False cannot be "
                             "exported to its format.")
        shared = {f.name for f in dataclasses.fields(GPT2Config)} & {f.name for f in dataclasses.fields(self)}
        values = {name: getattr(self, name) for name in shared if name not in ("transformers_version", "architectures")}
        return GPT2Config(**values, **self.fixed_keys)


__all__ = ["LmbGPT2Config", "GPT2_PRESETS"]
