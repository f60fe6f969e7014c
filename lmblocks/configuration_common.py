"""What every lmblocks config shares: strict with what a user types, lenient with the files it reads; derived fields
that follow their sources; named presets.

Two kinds of input reach a config, and they deserve opposite treatment:
- **Keywords a user types** (`LmbLlamaConfig(n_heads=8)`, `from_preset("tiny", n_layers=3)`): an unknown keyword is
  a typo, and a typo silently giving the default is worse than an error, so it is refused with the known options.
- **`config.json` files** written by transformers or found on the Hub (`from_pretrained`, `from_dict`): they carry
  keys of their own all the time (`_name_or_path`, `unk_token_id`, `task_specific_params`, `transformers.js_config`,
  ...). Those load, are kept through save → load, and are logged once as unused. Only a key that would change the
  computation in a way lmblocks does not implement is refused (`fixed_keys` below).

A family declares how a foreign file translates (the `model_type` of transformers' own class, keys fixed at one
value, renamed keys); `from_dict` applies it. Derived fields (`head_dim`, `n_inner`, ...) are declared too, and are
recomputed when a field they derive from changes after construction, unless they were set explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Callable
from typing import Any, ClassVar

from transformers import PreTrainedConfig
from transformers.utils import logging

from .compat import default_generation_params

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

# Passed by `from_dict` to the constructor: the keys come from a file, so unknown ones are kept, not refused. A keyword
# rather than module state: vLLM pickles remote-code classes with the globals their methods use, and a ContextVar or
# thread-local would not pickle.
_FROM_FILE = "_lmblocks_from_file"
# Set by `get_config_dict` on a file of transformers' own class for this family, whose `model_type` it rewrites so
# that transformers does not warn about instantiating one model type from another.
_FOREIGN = "_lmblocks_foreign_model_type"


class LmbPretrainedConfig(PreTrainedConfig):
    """Base of the lmblocks configs. A family declares, as class attributes:

    - `presets`: named configs, built with `from_preset(name, **overrides)`;
    - `foreign_model_type`: the `model_type` of transformers' built-in class whose `config.json` files load here;
    - `fixed_keys`: keys of those files that change the computation, with the only value lmblocks implements;
    - `renamed_keys`: keys of those files that lmblocks spells differently (foreign name -> lmblocks name);
    - `derived_fields`: field -> (fields it derives from, function of the config), e.g. `head_dim`.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    foreign_model_type: ClassVar[str | None] = None
    fixed_keys: ClassVar[dict[str, Any]] = {}
    renamed_keys: ClassVar[dict[str, str]] = {}
    derived_fields: ClassVar[dict[str, tuple[tuple[str, ...], Callable[[Any], Any]]]] = {}
    # Legacy keys a family accepts from users too and converts itself (e.g. `rope_scaling` for LLaMA).
    extra_accepted_keys: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self, **kwargs):
        from_file = kwargs.pop(_FROM_FILE, False)
        unknown = sorted(key for key in kwargs if not self._is_known_key(key))
        if unknown and not from_file:
            raise ValueError(
                f"{type(self).__name__} got unknown option(s) {unknown}. Known options: {', '.join(self._options())}."
            )
        if unknown:
            # A warning, not info: lmblocks' loggers sit outside transformers' logger tree, so at the default level
            # (Python's WARNING) an info line never shows, whatever transformers' verbosity.
            named = ", ".join(f"{key!r}{self._did_you_mean(key)}" for key in unknown)
            logger.warning_once(f"{type(self).__name__}: keys of this config.json that lmblocks does not use (kept "
                                f"as they are, and saved again): {named}.")
        self._derive(initial=True)
        super().__post_init__(**kwargs)

    # --- derived fields --------------------------------------------------------------------------------------------

    def _derive(self, initial: bool = False, changed: str | None = None) -> None:
        """Fill derived fields. At construction a derived field counts as derived when it is missing or equal to what
        its sources give (so a saved config.json, which spells it out, still follows its sources); afterwards only
        fields still marked derived are recomputed when one of their sources changes."""
        derived = self.__dict__.setdefault("_derived", set())
        for name, (sources, derive) in self.derived_fields.items():
            if initial:
                value = self.__dict__.get(name)
                if value is None or value == _safe(derive, self):
                    derived.add(name)
            elif changed not in sources:
                continue
            if name in derived:
                object.__setattr__(self, name, _safe(derive, self))

    def __setattr__(self, key: str, value: Any) -> None:
        super().__setattr__(key, value)
        if not self.__dict__.get("_post_init_done"):
            return
        key = self.attribute_map.get(key, key)
        if key in self.derived_fields:
            self.__dict__.get("_derived", set()).discard(key)  # set explicitly: no longer follows its sources
        elif any(key in sources for sources, _ in self.derived_fields.values()):
            self._derive(changed=key)
        elif not key.startswith("_") and key not in self._field_names() and not self._is_known_key(key):
            # Tools (transformers, peft, TRL, accelerate) set attributes of their own on configs at run time, so an
            # unknown attribute cannot be refused; one that looks like a misspelt field is most likely a typo.
            if hint := self._did_you_mean(key):
                logger.warning_once(
                    f"{type(self).__name__} has no option {key!r}{hint}: the attribute is set, but the model does not "
                    f"read it."
                )

    # --- strict keywords, lenient files -----------------------------------------------------------------------------

    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def _options(cls) -> list[str]:
        return sorted(name for name in cls._field_names() if not name.startswith("_"))

    @classmethod
    def _did_you_mean(cls, key: str) -> str:
        """` (did you mean 'x'?)` when `key` looks like a misspelt option, else ''."""
        nearest = difflib.get_close_matches(key, cls._options(), n=1, cutoff=0.7)
        return f" (did you mean {nearest[0]!r}?)" if nearest else ""

    def _is_known_key(self, key: str) -> bool:
        return (
            key in _TRANSFORMERS_KEYS
            or key in self.extra_accepted_keys
            or key in default_generation_params()
        )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """Builds the config from a `config.json` dict: lmblocks' own, or one of transformers' built-in class for
        this family (`foreign_model_type`), translated. Keys lmblocks does not use are kept; keys that would change
        the computation are refused unless they hold the value lmblocks implements."""
        return super().from_dict({**cls._translate(config_dict), _FROM_FILE: True}, **kwargs)

    @classmethod
    def get_config_dict(cls, *args, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' `get_config_dict`, with the `model_type` of a file written by transformers' own class for
        this family (`gpt2`, `llama`, `bert`) read as lmblocks': loading such a file is supported, not a mismatch."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if cls.foreign_model_type is not None and config_dict.get("model_type") == cls.foreign_model_type:
            config_dict = {**config_dict, "model_type": cls.model_type, _FOREIGN: cls.foreign_model_type}
        return config_dict, kwargs

    @classmethod
    def _translate(cls, config_dict: dict[str, Any]) -> dict[str, Any]:
        config_dict = dict(config_dict)
        for key, supported in cls.fixed_keys.items():
            if key in config_dict and config_dict[key] != supported:
                raise ValueError(
                    f"This checkpoint's config sets {key}={config_dict[key]!r}, which changes the computation in a "
                    f"way {cls.__name__} does not implement (it supports only {key}={supported!r})."
                )
            config_dict.pop(key, None)
        foreign = config_dict.pop(_FOREIGN, None) or config_dict.get("model_type")
        if cls.foreign_model_type is not None and foreign == cls.foreign_model_type:
            for theirs, ours in cls.renamed_keys.items():
                if theirs in config_dict:
                    config_dict.setdefault(ours, config_dict.pop(theirs))
            config_dict["model_type"] = cls.model_type
            # transformers' class names (`GPT2LMHeadModel`) would make `architectures` point at the wrong classes.
            config_dict.pop("architectures", None)
        return config_dict

    def to_dict(self) -> dict[str, Any]:
        config_dict = super().to_dict()
        config_dict.pop("_derived", None)  # bookkeeping, not an option
        return config_dict

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LmbPretrainedConfig":
        """Build the config of a named preset; keyword arguments override single fields (strictly: an unknown
        keyword is an error). Example: `LmbGPT2Config.from_preset("124M", n_layer=6)`."""
        if name not in cls.presets:
            raise ValueError(f"Unknown {cls.model_type} preset {name!r}. Available presets: {', '.join(cls.presets)}.")
        # Deep copy: configs normalise some values in place (`rope_parameters`), which must not leak into the table.
        return cls(**{**copy.deepcopy(cls.presets[name]), **overrides})


def _safe(derive: Callable[[Any], Any], config: Any) -> Any:
    """A derived value, or None where the sources cannot give one (e.g. zero heads, caught by validation later)."""
    try:
        return derive(config)
    except (TypeError, ZeroDivisionError):
        return None


__all__ = ["LmbPretrainedConfig"]
