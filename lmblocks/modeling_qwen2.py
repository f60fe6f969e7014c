"""Qwen2 (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen) as LLaMA's differences: biases on q/k/v but not on the output
projection, and sliding-window attention on the layers `config.layer_types` names (off in the released checkpoints;
masks from transformers' `masking_utils`). Tensor names are `Qwen2ForCausalLM`'s: Qwen2.5 folders load as they are."""

import torch
from transformers.masking_utils import create_sliding_window_causal_mask

from .configuration_qwen2 import LmbQwen2Config
from .integrations import register_peft_target_modules
from .modeling_common import register_for_auto_classes
from .modeling_llama import (GGUF_EXPORT as LLAMA_GGUF_EXPORT, LORA_TARGET_MODULES, PEFT_TARGET_MODULES,
                             TRANSFORMERS_EXPORT as LLAMA_TRANSFORMERS_EXPORT, LmbLlamaDecoderLayer,
                             LmbLlamaForCausalLM, LmbLlamaForSequenceClassification, LmbLlamaModel,
                             LmbLlamaPreTrainedModel)

register_peft_target_modules(LmbQwen2Config.model_type, PEFT_TARGET_MODULES)  # LLaMA's modules, LLaMA's names


class LmbQwen2DecoderLayer(LmbLlamaDecoderLayer):
    """LLaMA's block, attending through the mask of its layer type (full, or a sliding window)."""

    def __init__(self, config: LmbQwen2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.self_attn.o_proj.register_parameter("bias", None)  # biases on q/k/v (`attention_bias`), never on o_proj
        self.attention_type = config.layer_types[layer_idx]
        self.sliding_window = config.sliding_window if self.attention_type == "sliding_attention" else None

    def forward(self, hidden_states: torch.Tensor, attention_mask: dict | None = None, *args, **kwargs) -> torch.Tensor:
        # Masks come keyed by layer type; kernels that take no mask (flash attention) apply the window themselves.
        mask = attention_mask[self.attention_type] if isinstance(attention_mask, dict) else attention_mask
        return super().forward(hidden_states, mask, *args, sliding_window=self.sliding_window, **kwargs)


class LmbQwen2PreTrainedModel(LmbLlamaPreTrainedModel):
    """LLaMA's settings with Qwen2's config: first among the bases of each Qwen2 class, so that its `config_class`
    wins over the one transformers copies into every LLaMA class."""

    config: LmbQwen2Config
    config_class = LmbQwen2Config
    _no_split_modules = ["LmbQwen2DecoderLayer"]


class LmbQwen2Model(LmbQwen2PreTrainedModel, LmbLlamaModel):
    """The Qwen2 decoder: LLaMA's, with Qwen2's blocks and a sliding-window mask where a layer needs one."""

    decoder_layer_class = LmbQwen2DecoderLayer

    def decoder_inputs(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache):
        """LLaMA's, with the causal masks keyed by layer type (as generate passes them, ready, for static caches)."""
        ready = attention_mask if isinstance(attention_mask, dict) else None
        inputs_embeds, position_ids, past_key_values, causal_mask = super().decoder_inputs(
            input_ids, ready.get("full_attention") if ready else attention_mask, position_ids, past_key_values,
            inputs_embeds, use_cache)
        masks = ready or {"full_attention": causal_mask}
        if ready is None and "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                past_key_values=past_key_values, position_ids=position_ids)
        return inputs_embeds, position_ids, past_key_values, masks


class LmbQwen2ForCausalLM(LmbQwen2PreTrainedModel, LmbLlamaForCausalLM):
    """Qwen2 with the language-modelling head, tied to the embeddings when `tie_word_embeddings` (the small sizes)."""

    base_model_class = LmbQwen2Model


class LmbQwen2ForSequenceClassification(LmbQwen2PreTrainedModel, LmbLlamaForSequenceClassification):
    """Qwen2 with a linear classification head on the last real token of each row."""

    base_model_class = LmbQwen2Model


# Exports (`lmblocks.export`, `lmblocks.export_gguf`): LLaMA's tables, read as transformers' Qwen2 (no MLP bias) and
# llama.cpp's qwen2, which has the q/k/v biases, no window and rotates halves as transformers does (no row reordering).
TRANSFORMERS_EXPORT = {
    "classes": {LmbQwen2Model: "Qwen2Model", LmbQwen2ForCausalLM: "Qwen2ForCausalLM",
                LmbQwen2ForSequenceClassification: "Qwen2ForSequenceClassification"},
    "required": {**LLAMA_TRANSFORMERS_EXPORT["required"], "mlp_bias": False}}
GGUF_EXPORT = {"architecture": "qwen2", "hyperparameters": LLAMA_GGUF_EXPORT["hyperparameters"],
               "required": {**LLAMA_GGUF_EXPORT["required"], "attention_bias": True, "use_sliding_window": False}}

AUTO_CLASSES = {"AutoModel": LmbQwen2Model, "AutoModelForCausalLM": LmbQwen2ForCausalLM,
                "AutoModelForSequenceClassification": LmbQwen2ForSequenceClassification}
register_for_auto_classes(LmbQwen2Config, AUTO_CLASSES)

__all__ = ["AUTO_CLASSES", "LORA_TARGET_MODULES", "PEFT_TARGET_MODULES", "TRANSFORMERS_EXPORT", "GGUF_EXPORT",
           "LmbQwen2PreTrainedModel", "LmbQwen2Model", "LmbQwen2ForCausalLM", "LmbQwen2ForSequenceClassification"]
