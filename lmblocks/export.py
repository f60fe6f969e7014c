"""Export an lmblocks checkpoint to transformers' own classes (`GPT2LMHeadModel`, `LlamaForCausalLM`,
`BertForPreTraining`, ...), loadable where lmblocks is not installed and with no remote code.

Nothing here names a family. Each family says, as data, how it translates:
- its config class: the `model_type` of transformers' class (`foreign_model_type`), keys spelled differently there
  (`renamed_keys`) and keys with the only value lmblocks implements (`fixed_keys`) — the same tables that let
  transformers' files load into lmblocks, read the other way;
- its modeling file, `TRANSFORMERS_EXPORT`: the transformers class each lmblocks class becomes, the weights that
  class stores transposed (GPT-2's Conv1D), the lmblocks options it cannot express (exported only at the one value
  it has), those it has no counterpart for (left out, and said so in the export's notes), and config values a class
  needs there (`config_for_class`).

`scripts/export.py` is the command line (`--format transformers`); GGUF for llama.cpp is `lmblocks.gguf`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

import torch
import transformers
from transformers import CONFIG_MAPPING, PreTrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

# Keys of an lmblocks config.json that belong to lmblocks' own loading, never to transformers' class.
_LMBLOCKS_ONLY_KEYS = ("model_type", "auto_map", "architectures", "transformers_version", "_name_or_path")


class ExportError(ValueError):
    """The model cannot be written in transformers' format (the message says which option and why)."""


def export_table(model_or_config: PreTrainedModel | PreTrainedConfig) -> dict[str, Any]:
    """The family's `TRANSFORMERS_EXPORT` table, found in the modeling file of its registered classes."""
    from .families import FAMILY_OF_MODEL_TYPE

    config = getattr(model_or_config, "config", model_or_config)
    spec = FAMILY_OF_MODEL_TYPE.get(config.model_type)
    if spec is None:
        raise ExportError(f"{config.model_type!r} is not an lmblocks model type; known: "
                          f"{', '.join(FAMILY_OF_MODEL_TYPE)}.")
    table = getattr(importlib.import_module(spec.base_class.__module__), "TRANSFORMERS_EXPORT", None)
    if table is None:
        raise ExportError(f"The {spec.name} family declares no export to transformers' classes (TRANSFORMERS_EXPORT "
                          f"in {spec.base_class.__module__}).")
    return table


def transformers_class_name(model: PreTrainedModel) -> str:
    """The transformers class an lmblocks model exports to (`LmbLlamaForCausalLM` -> `LlamaForCausalLM`)."""
    classes = export_table(model)["classes"]
    for cls in type(model).__mro__:
        if cls in classes:
            return classes[cls]
    raise ExportError(f"{type(model).__name__} has no counterpart among transformers' classes; these export: "
                      f"{', '.join(c.__name__ for c in classes)}.")


def transformers_config(config: PreTrainedConfig, notes: list[str] | None = None) -> PreTrainedConfig:
    """The config of transformers' own class for `config` (its `foreign_model_type`), with renamed keys spelled as
    transformers spells them and `fixed_keys` at the value lmblocks implements. Options transformers' class cannot
    express are an `ExportError` unless they hold its one value; options with no counterpart are left out and, when
    set away from their default, said in `notes`. Keys of the file lmblocks does not use are kept as they are."""
    table = export_table(config)
    foreign_class = CONFIG_MAPPING[config.foreign_model_type]
    foreign_fields = {field.name for field in dataclasses.fields(foreign_class)}
    values = config.to_dict()
    for key in _LMBLOCKS_ONLY_KEYS:
        values.pop(key, None)
    for key, only_value in table.get("required", {}).items():
        value = values.pop(key, only_value)
        if value != only_value:
            raise ExportError(f"{key}={value!r}: transformers' {foreign_class.__name__[:-6]} has no such option (it "
                              f"always computes as {key}={only_value!r}), so this model cannot be exported to it.")
    defaults = type(config)()
    for key, what in table.get("dropped", {}).items():
        value = values.pop(key, None)
        if notes is not None and value != getattr(defaults, key, None):
            notes.append(f"not exported: {key}={value!r} — {what}")
    for theirs, ours in config.renamed_keys.items():
        if ours in values:
            values[theirs] = values.pop(ours)
    values.update({key: value for key, value in config.fixed_keys.items() if key in foreign_fields})
    return foreign_class(**values)


def transformers_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """`model`'s tensors under transformers' names and layout (the declared ones transposed)."""
    transposed = tuple(export_table(model).get("transposed", ()))
    return {name: tensor.t() if transposed and name.endswith(transposed) else tensor
            for name, tensor in model.state_dict().items()}


def to_transformers(model: PreTrainedModel, notes: list[str] | None = None) -> PreTrainedModel:
    """`model` as an instance of transformers' own class, sharing its tensors (the transposed ones are views).

    Every tensor must find its place and every place its tensor (a strict `load_state_dict`), so nothing is lost
    or left random on the way."""
    class_name = transformers_class_name(model)
    config = transformers_config(model.config, notes)
    for cls, values in export_table(model).get("config_for_class", {}).items():
        if isinstance(model, cls):
            for key, value in values.items():
                setattr(config, key, value)
    config.architectures = [class_name]
    with no_init_weights():  # every parameter is assigned below; buffers (RoPE frequencies, ...) are built as usual
        exported = getattr(transformers, class_name)._from_config(config, dtype=model.dtype)
    missing, unexpected = exported.load_state_dict(transformers_state_dict(model), strict=False, assign=True)
    # Tied copies are the same tensor as another one: not lost when one side has no place for them.
    missing = [key for key in missing if key not in (exported.all_tied_weights_keys or {})]
    unexpected = [key for key in unexpected if key not in (model.all_tied_weights_keys or {})]
    if missing or unexpected:
        raise ExportError(f"The weights do not map onto {class_name}: missing {missing[:8]}, unexpected "
                          f"{unexpected[:8]}.")
    exported.tie_weights()
    if model.can_generate() and model.generation_config is not None:
        exported.generation_config = model.generation_config
    return exported.eval()


def export_to_transformers(
    model: PreTrainedModel, save_directory: str | os.PathLike, max_shard_size: str | int = "5GB"
) -> list[str]:
    """Save `model` as transformers' own class (config, safetensors weights, generation config); returns the notes
    on what transformers' class has no place for."""
    notes: list[str] = []
    exported = to_transformers(model, notes)
    exported.config.use_cache = True  # the Trainer saves False; an exported model should decode with its cache
    exported.save_pretrained(save_directory, max_shard_size=max_shard_size)
    return notes


__all__ = [
    "ExportError",
    "export_table",
    "transformers_class_name",
    "transformers_config",
    "transformers_state_dict",
    "to_transformers",
    "export_to_transformers",
]
