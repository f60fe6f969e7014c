"""What every lmblocks config shares: refusing options it does not know, and named presets.

transformers' `PreTrainedConfig` keeps any unknown keyword as an attribute, for backwards compatibility with old
checkpoints. For a model people write and study, a typo such as `n_heads=8` silently giving the default 12 heads is
worse than an error, so lmblocks configs reject keywords that are neither fields nor keys transformers itself adds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from transformers import GenerationConfig, PreTrainedConfig

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
        generation_keys = GenerationConfig._get_default_generation_params().keys()
        unknown = sorted(
            key
            for key in kwargs
            if key not in _TRANSFORMERS_KEYS and key not in generation_keys and key not in self.extra_accepted_keys
        )
        if unknown:
            known = sorted(f.name for f in dataclasses.fields(self) if not f.name.startswith("_"))
            raise ValueError(
                f"{type(self).__name__} got unknown option(s) {unknown}. Known options: {', '.join(known)}."
            )
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LmbPretrainedConfig":
        """Build the config of a named preset; keyword arguments override single fields.

        Example: `LmbGPT2Config.from_preset("124M", n_layer=6)`.
        """
        if name not in cls.presets:
            raise ValueError(f"Unknown {cls.model_type} preset {name!r}. Available presets: {', '.join(cls.presets)}.")
        return cls(**{**cls.presets[name], **overrides})


__all__ = ["LmbPretrainedConfig"]
