"""The shared tiny-config test base: one entry per model family.

Tests that hold for every family (generation, save/load, peft, device_map, Trainer, remote code) are parametrised
over `FAMILIES` / `DECODERS`; each family's own tests add what is specific to it. Add a family by adding an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lmblocks
from lmblocks.families import FamilySpec


@dataclass(frozen=True)
class Family:
    """A family as the tests use it: lmblocks' own spec (classes, objective, ...) plus a tiny config."""

    spec: FamilySpec
    tiny_config: Callable[..., Any]  # tiny_config(**overrides) -> config, fast on CPU

    def __getattr__(self, name: str) -> Any:  # name, config_class, base_class, causal_lm_class, ...
        return getattr(self.spec, name)

    @property
    def all_classes(self) -> tuple[type, ...]:
        """Every model class of the family, the base model first."""
        return self.spec.model_classes


def _gpt2_tiny(**overrides):
    return lmblocks.LmbGPT2Config.from_preset(
        "tiny", **{"vocab_size": 99, "bos_token_id": 98, "eos_token_id": 98, "pad_token_id": 0, **overrides}
    )


GPT2 = Family(lmblocks.FAMILIES["gpt2"], _gpt2_tiny)


def _llama_tiny(**overrides):
    # Grouped-query attention (4 query heads, 2 key-value heads), so the shared tests exercise it too.
    return lmblocks.LmbLlamaConfig.from_preset(
        "tiny", **{"vocab_size": 99, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides}
    )


LLAMA = Family(lmblocks.FAMILIES["llama"], _llama_tiny)


def _qwen2_tiny(**overrides):
    # LLaMA's tiny shapes with Qwen2's q/k/v biases and tied embeddings.
    return lmblocks.LmbQwen2Config.from_preset(
        "tiny", **{"vocab_size": 99, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides}
    )


QWEN2 = Family(lmblocks.FAMILIES["qwen2"], _qwen2_tiny)

def _bert_tiny(**overrides):
    return lmblocks.LmbBertConfig.from_preset("tiny", **{"vocab_size": 99, "pad_token_id": 0, **overrides})


BERT = Family(lmblocks.FAMILIES["bert"], _bert_tiny)

FAMILIES: list[Family] = [GPT2, LLAMA, QWEN2, BERT]
DECODERS: list[Family] = [f for f in FAMILIES if f.causal_lm_class is not None]
