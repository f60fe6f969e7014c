"""Registrations that make a family work out of the box with the rest of the ecosystem.

They run when a modeling file is imported, so they also hold for a checkpoint loaded with `trust_remote_code=True`
where lmblocks is not installed (transformers copies this file next to the modeling file).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transformers import conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming


@contextmanager
def weight_conversions_while_loading(
    model_type: str, conversions: list[WeightConverter | WeightRenaming]
) -> Iterator[None]:
    """Apply `conversions` to checkpoints loaded by `from_pretrained` inside this block, and only there.

    A conversion registered for good would also be reversed on every save, so lmblocks' own checkpoints would be
    written in the foreign layout, and whatever reads them without transformers' loader (Trainer's resume uses a
    plain `load_state_dict`) would get transposed weights. Scoped to one load, a foreign layout is converted on the
    way in and lmblocks' checkpoints stay plain state dicts.
    """
    conversion_mapping.register_checkpoint_conversion_mapping(model_type, conversions, overwrite=True)
    try:
        yield
    finally:
        # transformers has no public way to unregister; these are the two places registration writes to.
        conversion_mapping._checkpoint_conversion_mapping_cache.pop(model_type, None)
        conversion_mapping.USER_REGISTERED_MAPPINGS.discard(model_type)


def register_lora_target_modules(model_type: str, target_modules: list[str]) -> None:
    """Give peft default LoRA targets for `model_type`, so `LoraConfig()` without `target_modules` works."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:  # peft is optional at run time
        return
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, target_modules)


__all__ = ["weight_conversions_while_loading", "register_lora_target_modules"]
