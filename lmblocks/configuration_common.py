"""What every lmblocks config shares: refusing options it does not know, and named presets.

transformers' `PreTrainedConfig` keeps any unknown keyword as an attribute, for backwards compatibility with old
checkpoints. For a model people write and study, a typo such as `n_heads=8` silently giving the default 12 heads is
worse than an error, so lmblocks configs reject keywords that are neither fields nor keys transformers itself adds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from transformers import GenerationConfig, PreTrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Keys that transformers writes into config.json or passes while loading, consumed by `PreTrainedConfig.__post_init__`.
_TRANSFORMERS_KEYS = frozenset(
    {
        "auto_map",
        "model_type",
        "name_or_path",
        "_name_or_path",
        "_commit_hash",
        "torch_dtype",
        "num_labels",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
        "quantization_config",
        "transformers_version",
    }
)


class LmbPretrainedConfig(PreTrainedConfig):
    """Base of the lmblocks configs: strict about unknown options, with named presets.

    Subclasses declare `presets: ClassVar[dict[str, dict]]`; `from_preset(name, **overrides)` builds one.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Legacy keys a family accepts and converts itself (e.g. `rope_scaling` for LLaMA).
    extra_accepted_keys: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self, **kwargs):
        unknown = sorted(key for key in kwargs if not self._is_known_key(key))
        if unknown:
            known = sorted(f.name for f in dataclasses.fields(self) if not f.name.startswith("_"))
            raise ValueError(
                f"{type(self).__name__} got unknown option(s) {unknown}. Known options: {', '.join(known)}."
            )
        super().__post_init__(**kwargs)

    def _is_known_key(self, key: str) -> bool:
        return (
            key in _TRANSFORMERS_KEYS
            or key in self.extra_accepted_keys
            or key in GenerationConfig._get_default_generation_params()
        )

    def to_dict(self) -> dict[str, Any]:
        return self._drop_non_options(super().to_dict())

    def to_diff_dict(self) -> dict[str, Any]:
        return self._drop_non_options(super().to_diff_dict())

    def _drop_non_options(self, config_dict: dict[str, Any]) -> dict[str, Any]:
        """Leaves attributes set after construction that are not options (e.g. `config.foo = 1`) out of
        `config.json`: this config would refuse them when loading, and a config that saves must load again."""
        fields = {f.name for f in dataclasses.fields(self)}
        unsaved = sorted(key for key in config_dict if key not in fields and not self._is_known_key(key))
        if unsaved:
            logger.warning_once(f"{type(self).__name__}: attributes {unsaved} are not options and are not saved.")
        return {key: value for key, value in config_dict.items() if key not in unsaved}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LmbPretrainedConfig":
        """Build the config of a named preset; keyword arguments override single fields.

        Example: `LmbGPT2Config.from_preset("124M", n_layer=6)`.
        """
        if name not in cls.presets:
            raise ValueError(f"Unknown {cls.model_type} preset {name!r}. Available presets: {', '.join(cls.presets)}.")
        return cls(**{**cls.presets[name], **overrides})


__all__ = ["LmbPretrainedConfig"]
