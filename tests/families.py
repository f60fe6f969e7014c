"""The shared tiny-config test base: one entry per model family.

Tests that hold for every family (generation, save/load, peft, device_map, Trainer, remote code) are parametrised
over `FAMILIES` / `DECODERS`; each family's own tests add what is specific to it. A family of `lmblocks.FAMILIES` is
here with no edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lmblocks
from lmblocks.families import FamilySpec


@dataclass(frozen=True)
class Family:
    """A family as the tests use it: lmblocks' own spec (classes, objective, ...) plus the token ids of its tiny
    configs (vocabulary of `TINY_VOCAB`)."""

    spec: FamilySpec
    token_ids: dict[str, int]

    def __getattr__(self, name: str) -> Any:  # name, config_class, base_class, causal_lm_class, ...
        return getattr(self.spec, name)

    @property
    def all_classes(self) -> tuple[type, ...]:
        """Every model class of the family, the base model first."""
        return self.spec.model_classes

    @property
    def no_dropout(self) -> dict[str, float]:
        """Every dropout probability of the family's config at 0 (whatever its fields are called)."""
        fields = self.config_class.__dataclass_fields__
        return {name: 0.0 for name, f in fields.items() if "drop" in name and isinstance(f.default, float)}

    def tiny_config(self, **overrides: Any):
        """The family's "tiny" preset with a vocabulary of `TINY_VOCAB` and `overrides`: fast on CPU."""
        return self.config_class.from_preset("tiny", **{"vocab_size": TINY_VOCAB, **self.token_ids, **overrides})


TINY_VOCAB = 99


def _tiny_token_ids(spec: FamilySpec) -> dict[str, int]:
    """The tiny preset's bos / eos ids in a vocabulary of `TINY_VOCAB` (one at the end of the preset's vocabulary, as
    GPT-2's `<|endoftext|>`, stays at the end), and padding on id 0."""
    preset = spec.config_class.from_preset("tiny")
    ids = {key: min(getattr(preset, key), TINY_VOCAB - 1) for key in ("bos_token_id", "eos_token_id")
           if getattr(preset, key, None) is not None}
    return {**ids, "pad_token_id": 0}


# Every family of lmblocks.FAMILIES, in its order. LLaMA's tiny preset has grouped-query attention (4 query heads,
# 2 key-value heads), so the shared tests exercise it; Qwen2's adds q/k/v biases and tied embeddings.
FAMILIES: list[Family] = [Family(spec, _tiny_token_ids(spec)) for spec in lmblocks.FAMILIES.values()]
DECODERS: list[Family] = [f for f in FAMILIES if f.causal_lm_class is not None]
# The families some tests take by name, for what is specific to them.
GPT2, LLAMA, QWEN2, BERT = (next(f for f in FAMILIES if f.name == name) for name in ("gpt2", "llama", "qwen2", "bert"))
