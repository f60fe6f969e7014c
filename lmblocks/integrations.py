"""Registrations that make a family work out of the box with the rest of the ecosystem.

They run when a modeling file is imported, so they also hold for a checkpoint loaded with `trust_remote_code=True`
where lmblocks is not installed (transformers copies this file next to the modeling file).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from transformers import conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming

from .compat import forget_checkpoint_conversions


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
        forget_checkpoint_conversions(model_type)


# Which of a family's module tables (`PEFT_TARGET_MODULES` in its modeling file) fills each of peft's per-model-type
# default tables, by the table's name in `peft.utils.constants`. Every other `..._TARGET_MODULES_MAPPING` there (LoRA
# and its many relatives: AdaLoRA, LoHa, LoKr, OFT, BOFT, VeRA, ...) takes the family's "projections".
_PEFT_TABLE_ROLES = {
    "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING": "ia3",
    "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING": "ia3_feedforward",
    "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING": "norms",
}


def peft_default_tables() -> dict[str, dict]:
    """peft's per-model-type default tables, by name (`TRANSFORMERS_MODELS_TO_<METHOD>_TARGET_MODULES_MAPPING`, and
    IA3's feed-forward table); empty without peft. Each tuner reads its table through a class attribute bound to the
    same dict, so adding a model type here reaches it."""
    try:
        from peft.utils import constants
    except ImportError:  # peft is optional at run time
        return {}
    return {
        name: table
        for name, table in vars(constants).items()
        if name.startswith("TRANSFORMERS_MODELS_TO_")
        and (name.endswith("_TARGET_MODULES_MAPPING") or name in _PEFT_TABLE_ROLES)
        and isinstance(table, dict)
    }


def register_peft_target_modules(model_type: str, modules: Mapping[str, Sequence[str]]) -> None:
    """Give every peft method that keeps per-model-type defaults its default targets for `model_type`, so its config
    works without `target_modules` (`LoraConfig()`, `IA3Config()`, `AdaLoraConfig(total_step=...)`, `LoHaConfig()`,
    ...). `modules` is the family's table by role: "projections" (the linear layers LoRA-like methods adapt), "ia3"
    (IA3's keys, values and feed-forward outputs), "ia3_feedforward" (those feed-forward outputs), "norms" (for
    LN tuning). A role the family does not give leaves that method without a default, as for a built-in model. A
    default already registered (by peft or the user) is kept."""
    for name, table in peft_default_tables().items():
        targets = modules.get(_PEFT_TABLE_ROLES.get(name, "projections"))
        if targets:
            table.setdefault(model_type, list(targets))


def register_lora_target_modules(model_type: str, target_modules: list[str]) -> None:
    """Give peft default targets for `model_type` for LoRA and every method that adapts the same projections.
    (Kept for callers from before `register_peft_target_modules`, which also covers IA3 and LN tuning.)"""
    register_peft_target_modules(model_type, {"projections": target_modules})


__all__ = [
    "weight_conversions_while_loading",
    "peft_default_tables",
    "register_peft_target_modules",
    "register_lora_target_modules",
]
