"""What every family's models share above the blocks of `layers.py`: the `PreTrainedModel` base (the settings all
families declare alike, config validation when a model is built, a complete `auto_map` on save), registration of a
family's classes for remote code, and the decoder preamble (embeddings → cache → positions → causal mask).

A family's modeling file keeps only what makes it that family: its blocks, its embeddings and what its heads add.
"""

from __future__ import annotations

import sys

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .decoding import Int8Linear, compiled_step
from .layers import check_cache_capacity, check_model_inputs


class LmbPreTrainedModel(PreTrainedModel):
    """Base of every lmblocks model class.

    - The config is validated when a model is built from it, so fields changed after construction
      (`config.hidden_size = 100`) are checked before they become wrongly shaped weights.
    - `save_pretrained` writes an `auto_map` naming every Auto class the family registers (the base model under
      `AutoModel` and every head), so a checkpoint saved through any one class loads through all of them with
      `trust_remote_code=True` where lmblocks is not installed — as transformers' own families behave.
    """

    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config, *inputs, **kwargs) -> None:
        config.validate()
        super().__init__(config, *inputs, **kwargs)

    def get_compiled_call(self, compile_config):
        """transformers' compiled decoding step; with a frozen-weights config, compiled as this model's own function
        and again when a parameter changed since the compilation (`lmblocks.decoding.compiled_step`): generating
        after an optimizer step, a `load_state_dict`, a move or a write through `.data` never runs with the old
        weights, and other compiled models in the process do not use up this one's recompile limit."""
        if compile_config is not None and getattr(compile_config.backend, "freezes_weights", False):
            return compiled_step(self, compile_config)
        return super().get_compiled_call(compile_config)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if any(isinstance(module, Int8Linear) for module in self.modules()):
            # Its int8 layers are saved under names no model class loads: from_pretrained would build those layers
            # from random weights, with a warning only.
            raise ValueError(
                f"This {type(self).__name__} holds int8 decoding layers (lmblocks.decoding.Int8Linear, made by "
                "`enable_compiled_decoding(model, weights='int8')`), which from_pretrained cannot load back. Save "
                "the model before converting it; the conversion takes a second when the model is loaded.")
        if getattr(self, "_auto_class", None) is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **family_auto_map(type(self))}
        return super().save_pretrained(save_directory, *args, **kwargs)


def _module_name(cls: type) -> str:
    # Under remote code the module is `transformers_modules.<folder>.modeling_x`; auto_map names the file only.
    return cls.__module__.rsplit(".", 1)[-1]


def family_auto_map(model_class: type[PreTrainedModel]) -> dict[str, str]:
    """`auto_map` entries for every class registered for remote code in `model_class`'s modeling file, and its
    config: {"AutoConfig": "configuration_x.Config", "AutoModel": "modeling_x.Model", ...}."""
    auto_map = {}
    config_class = model_class.config_class
    if getattr(config_class, "_auto_class", None) is not None:
        auto_map[config_class._auto_class] = f"{_module_name(config_class)}.{config_class.__name__}"
    for obj in vars(sys.modules[model_class.__module__]).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, PreTrainedModel)
            and obj.config_class is config_class
            and obj.__dict__.get("_auto_class") is not None
        ):
            auto_map[obj._auto_class] = f"{_module_name(obj)}.{obj.__name__}"
    return auto_map


def register_for_auto_classes(config_class: type, auto_classes: dict[str, type[PreTrainedModel]]) -> None:
    """Mark a family's config and model classes for remote code (`auto_map`). Called by each modeling file, so it
    also holds when the file runs as a checkpoint's remote code; `lmblocks.families` registers the same table with
    the Auto classes of this process."""
    config_class.register_for_auto_class()
    for auto_class_name, model_class in auto_classes.items():
        model_class.register_for_auto_class(auto_class_name)


class DecoderModel:
    """The forward of a decoder's base model, the same in every decoder family: check the inputs, embed the tokens,
    create the KV cache, derive the positions, build the causal mask, run the family's blocks (`run_layers`).

    Families with learned absolute positions give `learned_positions` (their number), and a sequence that would
    run past them is refused with a clear error instead of an index error inside the embedding.
    """

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
        inputs_embeds, position_ids, past_key_values, causal_mask = self.decoder_inputs(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache
        )
        hidden_states = self.run_layers(inputs_embeds, causal_mask, position_ids, past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)

    def run_layers(
        self,
        inputs_embeds: torch.Tensor,
        causal_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        past_key_values: Cache | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """The family's part: embeddings (B, T, C) -> final hidden states (B, T, C)."""
        raise NotImplementedError

    def decoder_inputs(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        past_key_values: Cache | None,
        inputs_embeds: torch.Tensor | None,
        use_cache: bool | None,
    ) -> tuple[torch.Tensor, torch.LongTensor, Cache | None, torch.Tensor | None]:
        """Returns (inputs_embeds (B, T, C), position_ids (B or 1, T), the cache, the causal mask)."""
        check_model_inputs(input_ids, inputs_embeds)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, C)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        seq_len = inputs_embeds.shape[1]
        check_cache_capacity(past_key_values, seq_len)

        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past_seen).unsqueeze(0)  # (1, T)
        if self.learned_positions is not None:
            check_positions(position_ids, past_seen, seq_len, self.learned_positions, "n_positions")

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        return inputs_embeds, position_ids, past_key_values, causal_mask

    @property
    def learned_positions(self) -> int | None:
        return None


def check_positions(
    position_ids: torch.Tensor | None, past_seen: int | torch.Tensor | None, seq_len: int, limit: int, field: str
) -> None:
    """Refuses positions past the `limit` learned position embeddings: they would fail inside the embedding with an
    opaque IndexError (a device-side assert on GPU).

    Checked from shapes and Python integers (cached + new tokens), which costs no device read: the longest row of a
    batch, left-padded or not, has exactly those positions. Explicit `position_ids` (packed sequences restart them)
    are checked on their values only on the CPU, where reading them back costs no device sync, and never while
    compiling. `past_seen` is None for encoders, which have no cache.
    """
    if torch.compiler.is_compiling():
        return
    if torch.is_tensor(past_seen):
        past_seen = int(past_seen) if past_seen.device.type == "cpu" else 0
    needed = (past_seen or 0) + seq_len
    explicit = position_ids is not None and position_ids.numel() > 0 and position_ids.device.type == "cpu"
    if explicit:
        needed = int(position_ids.max()) + 1
    if needed > limit:
        detail = f" (cached {past_seen} + new {seq_len})" if past_seen is not None else ""
        raise ValueError(
            f"Sequence length {needed}{detail} exceeds {field}={limit}, the number of "
            f"learned positions: truncate the input (e.g. tokenizer(..., truncation=True, max_length={limit})) or "
            f"generate fewer tokens."
        )


__all__ = [
    "LmbPreTrainedModel",
    "family_auto_map",
    "register_for_auto_classes",
    "DecoderModel",
    "check_positions",
]
