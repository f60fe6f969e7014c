"""LLaMA (Touvron et al. 2023) and its successors Llama 2 and Llama 3 as a Hugging Face model.

Pre-RMSNorm decoder blocks with rotary position embeddings, grouped-query attention and a SwiGLU feed-forward; the
norm, RoPE, MLP, attention math, KV cache and kernels come from `layers.py`. Parameter names are those of
transformers' `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`, ...), the layout of the Llama checkpoints
on the Hub, so those folders load as they are. Meta's original layout (`params.json` + `consolidated.*.pth`) is
converted by `scripts/convert_llama_meta.py`.
"""

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .configuration_llama import LmbLlamaConfig
from .heads import CausalLMHead, LastTokenClassifierHead
from .integrations import register_peft_target_modules
from .layers import MultiHeadAttention, RMSNorm, RotaryEmbedding, SwiGLUMLP
from .modeling_common import DecoderModel, LmbPreTrainedModel, register_for_auto_classes

# peft's default targets for this family, by role (`LoraConfig()`, `IA3Config()`, ... without `target_modules`;
# integrations.register_peft_target_modules): LoRA and its relatives adapt the projections, IA3 scales the keys,
# values and feed-forward output, LN tuning trains the norms.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_TARGET_MODULES = {
    "projections": LORA_TARGET_MODULES,
    "ia3": ("k_proj", "v_proj", "down_proj"),
    "ia3_feedforward": ("down_proj",),
    "norms": ("input_layernorm", "post_attention_layernorm", "norm"),
}
register_peft_target_modules(LmbLlamaConfig.model_type, PEFT_TARGET_MODULES)


class LmbLlamaAttention(MultiHeadAttention):
    """Causal self-attention with separate query / key / value projections; `num_key_value_heads` < heads gives
    grouped-query attention (each key-value head shared by `num_attention_heads / num_key_value_heads` query heads)."""

    def __init__(self, config: LmbLlamaConfig, layer_idx: int) -> None:
        super().__init__(
            config,
            layer_idx,
            num_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dropout=config.attention_dropout,
            is_causal=True,
        )
        q_dim, kv_dim = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=config.attention_bias)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    def project_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attn_output)


class LmbLlamaDecoderLayer(GradientCheckpointingLayer):
    """x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x))."""

    attention_class = LmbLlamaAttention  # a family built on LLaMA may name its own

    def __init__(self, config: LmbLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, bias=config.rms_norm_bias)
        self.self_attn = self.attention_class(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, bias=config.rms_norm_bias)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias, act=config.hidden_act)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask, past_key_values, position_embeddings, **kwargs
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LmbLlamaPreTrainedModel(LmbPreTrainedModel):
    """Shared settings of the LLaMA models. Initialisation is transformers' default: normal(0, initializer_range)
    for projections and embeddings, ones for the RMSNorm gains, the RoPE frequencies recomputed from the config."""

    config: LmbLlamaConfig
    config_class = LmbLlamaConfig
    peft_target_modules = PEFT_TARGET_MODULES  # a family built on this one inherits its peft defaults
    base_model_prefix = "model"
    _no_split_modules = ["LmbLlamaDecoderLayer"]
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": LmbLlamaDecoderLayer, "attentions": LmbLlamaAttention}


class LmbLlamaModel(DecoderModel, LmbLlamaPreTrainedModel):
    """The LLaMA decoder: token embeddings, `num_hidden_layers` blocks, final RMSNorm. No position embeddings are
    added to the input: positions enter through RoPE, computed once here and shared by every layer."""

    decoder_layer_class = LmbLlamaDecoderLayer  # a family built on LLaMA names its own (Qwen2)

    def __init__(self, config: LmbLlamaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, bias=config.rms_norm_bias)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def run_layers(
        self,
        inputs_embeds: torch.Tensor,
        causal_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        past_key_values: Cache | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)  # cos, sin: (B, T, hs)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                causal_mask,
                position_embeddings,
                past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
        return self.norm(hidden_states)


class LmbLlamaForCausalLM(CausalLMHead, LmbLlamaPreTrainedModel, GenerationMixin):
    """LLaMA with the language-modelling head (untied from the embeddings unless `tie_word_embeddings`). `labels`
    gives the causal-LM loss, shifted inside; `-100` labels are ignored."""

    base_model_class = LmbLlamaModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}


class LmbLlamaForSequenceClassification(LastTokenClassifierHead, LmbLlamaPreTrainedModel):
    """LLaMA with a linear classification head on the last real token of each row."""

    base_model_class = LmbLlamaModel


# How this family exports to transformers' own classes (`lmblocks.export`): the class each lmblocks class becomes,
# and the options transformers' LLaMA cannot express (exported only at the one value it has).
TRANSFORMERS_EXPORT = {
    "classes": {
        LmbLlamaModel: "LlamaModel",
        LmbLlamaForCausalLM: "LlamaForCausalLM",
        LmbLlamaForSequenceClassification: "LlamaForSequenceClassification",
    },
    "required": {"rms_norm_bias": False},
}

# How this family exports to GGUF for llama.cpp (`lmblocks.export_gguf`): llama.cpp's architecture, the config field
# behind each of its hyper-parameters, the options it computes only one way (field -> allowed values), and the q/k
# rows it wants reordered for its interleaved RoPE (per head count).
GGUF_EXPORT = {
    "architecture": "llama",
    "hyperparameters": {
        "context_length": "max_position_embeddings",
        "embedding_length": "hidden_size",
        "feed_forward_length": "intermediate_size",
        "block_count": "num_hidden_layers",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.key_length": "head_dim",
        "attention.value_length": "head_dim",
        "rope.dimension_count": "head_dim",
        "rope.freq_base": "rope_parameters.rope_theta",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    },
    "required": {
        "rope_parameters.rope_type": "default",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_bias": False,
    },
    "tensor_transforms": {
        "self_attn.q_proj.weight": ("rope_rows", "num_attention_heads"),
        "self_attn.k_proj.weight": ("rope_rows", "num_key_value_heads"),
    },
}

# Every Auto class the family answers to: registered here for remote code (`auto_map`), and by `lmblocks.families`
# with this process's Auto classes.
AUTO_CLASSES = {
    "AutoModel": LmbLlamaModel,
    "AutoModelForCausalLM": LmbLlamaForCausalLM,
    "AutoModelForSequenceClassification": LmbLlamaForSequenceClassification,
}
register_for_auto_classes(LmbLlamaConfig, AUTO_CLASSES)

__all__ = [
    "AUTO_CLASSES",
    "LORA_TARGET_MODULES",
    "TRANSFORMERS_EXPORT",
    "GGUF_EXPORT",
    "PEFT_TARGET_MODULES",
    "LmbLlamaPreTrainedModel",
    "LmbLlamaModel",
    "LmbLlamaForCausalLM",
    "LmbLlamaForSequenceClassification",
]
