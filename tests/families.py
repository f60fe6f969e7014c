"""The shared tiny-config test base: one entry per model family.

Tests that hold for every family (generation, save/load, peft, device_map, Trainer, remote code) are parametrised
over `FAMILIES` / `DECODERS`; each family's own tests add what is specific to it. Add a family by adding an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lmblocks


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    tiny_config: Callable[..., Any]  # tiny_config(**overrides) -> config, fast on CPU
    base_class: type
    causal_lm_class: type | None = None  # decoders only
    masked_lm_class: type | None = None  # encoders only
    extra_classes: tuple[type, ...] = field(default_factory=tuple)

    @property
    def all_classes(self) -> tuple[type, ...]:
        heads = tuple(c for c in (self.causal_lm_class, self.masked_lm_class) if c is not None)
        return (self.base_class, *heads, *self.extra_classes)


def _gpt2_tiny(**overrides):
    return lmblocks.LmbGPT2Config.from_preset(
        "tiny", **{"vocab_size": 99, "bos_token_id": 98, "eos_token_id": 98, "pad_token_id": 0, **overrides}
    )


GPT2 = Family(
    name="gpt2",
    config_class=lmblocks.LmbGPT2Config,
    tiny_config=_gpt2_tiny,
    base_class=lmblocks.LmbGPT2Model,
    causal_lm_class=lmblocks.LmbGPT2LMHeadModel,
    extra_classes=(lmblocks.LmbGPT2ForSequenceClassification,),
)


def _llama_tiny(**overrides):
    # Grouped-query attention (4 query heads, 2 key-value heads), so the shared tests exercise it too.
    return lmblocks.LmbLlamaConfig.from_preset(
        "tiny", **{"vocab_size": 99, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides}
    )


LLAMA = Family(
    name="llama",
    config_class=lmblocks.LmbLlamaConfig,
    tiny_config=_llama_tiny,
    base_class=lmblocks.LmbLlamaModel,
    causal_lm_class=lmblocks.LmbLlamaForCausalLM,
    extra_classes=(lmblocks.LmbLlamaForSequenceClassification,),
)

def _bert_tiny(**overrides):
    return lmblocks.LmbBertConfig.from_preset("tiny", **{"vocab_size": 99, "pad_token_id": 0, **overrides})


BERT = Family(
    name="bert",
    config_class=lmblocks.LmbBertConfig,
    tiny_config=_bert_tiny,
    base_class=lmblocks.LmbBertModel,
    masked_lm_class=lmblocks.LmbBertForMaskedLM,
    extra_classes=(
        lmblocks.LmbBertForPreTraining,
        lmblocks.LmbBertForNextSentencePrediction,
        lmblocks.LmbBertForSequenceClassification,
        lmblocks.LmbBertForTokenClassification,
        lmblocks.LmbBertForQuestionAnswering,
        lmblocks.LmbBertForMultipleChoice,
    ),
)

FAMILIES: list[Family] = [GPT2, LLAMA, BERT]
DECODERS: list[Family] = [f for f in FAMILIES if f.causal_lm_class is not None]
