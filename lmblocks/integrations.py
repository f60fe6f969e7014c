"""Registrations that make a family work out of the box with the rest of the ecosystem.

They run when a modeling file is imported, so they also hold for a checkpoint loaded with `trust_remote_code=True`
where lmblocks is not installed (transformers copies this file next to the modeling file).
"""

from __future__ import annotations

from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming


def register_weight_conversions(model_type: str, conversions: list[WeightConverter | WeightRenaming]) -> None:
    """Declare how checkpoint tensors map to this family's parameters; transformers applies the conversions on load
    and their reverse on save."""
    register_checkpoint_conversion_mapping(model_type, conversions, overwrite=True)


def register_lora_target_modules(model_type: str, target_modules: list[str]) -> None:
    """Give peft default LoRA targets for `model_type`, so `LoraConfig()` without `target_modules` works."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:  # peft is optional at run time
        return
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, target_modules)


__all__ = ["register_weight_conversions", "register_lora_target_modules"]
