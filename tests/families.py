"""The shared tiny-config test base: one entry per model family.

Tests that hold for every family (generation, save/load, peft, device_map, Trainer, remote code) are parametrised
over `FAMILIES` / `DECODERS`; each family's own tests add what is specific to it. Add a family by adding an entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lmblocks
from lmblocks.families import FamilySpec


@dataclass(frozen=True)
class Family:
    """A family as the tests use it: lmblocks' own spec (classes, objective, ...) plus the token ids of its tiny
    configs (vocabulary of 99)."""

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
        """The family's "tiny" preset with a vocabulary of 99 and `overrides`: fast on CPU."""
        return self.config_class.from_preset("tiny", **{"vocab_size": 99, **self.token_ids, **overrides})


# LLaMA's tiny preset has grouped-query attention (4 query heads, 2 key-value heads), so the shared tests exercise it;
# Qwen2's adds q/k/v biases and tied embeddings.
GPT2 = Family(lmblocks.FAMILIES["gpt2"], dict(bos_token_id=98, eos_token_id=98, pad_token_id=0))
LLAMA = Family(lmblocks.FAMILIES["llama"], dict(bos_token_id=1, eos_token_id=2, pad_token_id=0))
QWEN2 = Family(lmblocks.FAMILIES["qwen2"], dict(bos_token_id=1, eos_token_id=2, pad_token_id=0))
BERT = Family(lmblocks.FAMILIES["bert"], dict(pad_token_id=0))

FAMILIES: list[Family] = [GPT2, LLAMA, QWEN2, BERT]
DECODERS: list[Family] = [f for f in FAMILIES if f.causal_lm_class is not None]
