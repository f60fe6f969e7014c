"""LLaMA (Touvron et al. 2023) and its successors Llama 2 and Llama 3 as a Hugging Face model.

Pre-RMSNorm decoder blocks with rotary position embeddings, grouped-query attention and a SwiGLU feed-forward; the
norm, RoPE, MLP, attention math, KV cache and kernels come from `layers.py`. Parameter names are those of
transformers' `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`, ...), the layout of the Llama checkpoints
on the Hub, so those folders load as they are. Meta's original layout (`params.json` + `consolidated.*.pth`) is
converted by `scripts/convert_llama_meta.py`.
"""

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_llama import LmbLlamaConfig
from .integrations import register_lora_target_modules
from .layers import (
    MultiHeadAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLUMLP,
    check_cache_capacity,
    check_model_inputs,
    last_token_index,
)
from .losses import causal_lm_loss

register_lora_target_modules(
    LmbLlamaConfig.model_type, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
)


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

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attend(
            self.q_proj(hidden_states),  # (B, T, nh·hs)
            self.k_proj(hidden_states),  # (B, T, nkv·hs)
            self.v_proj(hidden_states),  # (B, T, nkv·hs)
            attention_mask,
            past_key_values,
            position_embeddings,
            **kwargs,
        )
        return self.o_proj(attn_output), attn_weights


class LmbLlamaDecoderLayer(GradientCheckpointingLayer):
    """x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x))."""

    def __init__(self, config: LmbLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, bias=config.rms_norm_bias)
        self.self_attn = LmbLlamaAttention(config, layer_idx)
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
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, past_key_values, **kwargs
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LmbLlamaPreTrainedModel(PreTrainedModel):
    """Shared settings of the LLaMA models. Initialisation is transformers' default: normal(0, initializer_range)
    for projections and embeddings, ones for the RMSNorm gains, the RoPE frequencies recomputed from the config."""

    config: LmbLlamaConfig
    config_class = LmbLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LmbLlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": LmbLlamaDecoderLayer, "attentions": LmbLlamaAttention}


class LmbLlamaModel(LmbLlamaPreTrainedModel):
    """The LLaMA decoder: token embeddings, `num_hidden_layers` blocks, final RMSNorm. No position embeddings are
    added to the input: positions enter through RoPE, computed once here and shared by every layer."""

    def __init__(self, config: LmbLlamaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LmbLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, bias=config.rms_norm_bias)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embed_tokens = new_embeddings

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        check_model_inputs(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        seq_len = inputs_embeds.shape[1]
        check_cache_capacity(past_key_values, seq_len)

        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past_seen).unsqueeze(0)  # (1, T)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )

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
        hidden_states = self.norm(hidden_states)

        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class LmbLlamaForCausalLM(LmbLlamaPreTrainedModel, GenerationMixin):
    """LLaMA with the language-modelling head (untied from the embeddings unless `tie_word_embeddings`). `labels`
    gives the causal-LM loss, shifted inside; `-100` labels are ignored."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # transformers' ForCausalLMLoss on a leaner cross-entropy (losses.py); `model.loss_function = f` still overrides it.
    loss_function = staticmethod(causal_lm_loss)
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LmbLlamaConfig) -> None:
        super().__init__(config)
        self.model = LmbLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        """`logits_to_keep`: compute logits for only the last N positions (0 = all), which saves memory in generation.
        `num_items_in_batch` in kwargs (passed by Trainer) makes the loss exact under gradient accumulation."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # (B, T', vocab)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class LmbLlamaForSequenceClassification(LmbLlamaPreTrainedModel):
    """LLaMA with a linear classification head on the last real token of each row (a causal model has seen the whole
    sequence only there). `num_labels == 1` is regression; `problem_type` picks the loss as in transformers."""

    def __init__(self, config: LmbLlamaConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LmbLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, C)
        batch_size = hidden_states.shape[0]
        last_index = last_token_index(input_ids, attention_mask, self.config.pad_token_id, hidden_states.device)
        pooled_logits = self.score(hidden_states[torch.arange(batch_size, device=hidden_states.device), last_index])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=pooled_logits, labels=labels, pooled_logits=pooled_logits,
                                      config=self.config)

        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "LmbLlamaPreTrainedModel",
    "LmbLlamaModel",
    "LmbLlamaForCausalLM",
    "LmbLlamaForSequenceClassification",
]
