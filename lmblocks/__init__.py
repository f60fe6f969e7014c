"""lmblocks: GPT-2, BERT, LLaMA and Qwen2 written out clearly as first-class Hugging Face models, and a tokenizer
trainer.

Importing lmblocks registers every family (`lmblocks.families.FAMILIES`) with transformers' Auto classes; each
modeling file marks its classes for remote code (`auto_map`), so `save_pretrained` writes checkpoints that load with
`trust_remote_code=True` without lmblocks, through every Auto class of the family.
"""

from .configuration_bert import LmbBertConfig
from .configuration_gpt2 import LmbGPT2Config
from .configuration_llama import LmbLlamaConfig
from .configuration_qwen2 import LmbQwen2Config
from .modeling_bert import (
    LmbBertForMaskedLM,
    LmbBertForMultipleChoice,
    LmbBertForNextSentencePrediction,
    LmbBertForPreTraining,
    LmbBertForQuestionAnswering,
    LmbBertForSequenceClassification,
    LmbBertForTokenClassification,
    LmbBertModel,
    LmbBertPreTrainedModel,
)
from .modeling_gpt2 import (
    LmbGPT2ForSequenceClassification,
    LmbGPT2LMHeadModel,
    LmbGPT2Model,
    LmbGPT2PreTrainedModel,
)
from .modeling_llama import (
    LmbLlamaForCausalLM,
    LmbLlamaForSequenceClassification,
    LmbLlamaModel,
    LmbLlamaPreTrainedModel,
)
from .modeling_qwen2 import (
    LmbQwen2ForCausalLM,
    LmbQwen2ForSequenceClassification,
    LmbQwen2Model,
    LmbQwen2PreTrainedModel,
)
from .families import FAMILIES, FamilySpec, register_all
from .tokenization_trainer import config_kwargs_from_tokenizer, save_tokenizer, train_tokenizer

__version__ = "0.1.0"


register_all()

__all__ = [
    "LmbGPT2Config",
    "LmbGPT2PreTrainedModel",
    "LmbGPT2Model",
    "LmbGPT2LMHeadModel",
    "LmbGPT2ForSequenceClassification",
    "LmbLlamaConfig",
    "LmbLlamaPreTrainedModel",
    "LmbLlamaModel",
    "LmbLlamaForCausalLM",
    "LmbLlamaForSequenceClassification",
    "LmbQwen2Config",
    "LmbQwen2PreTrainedModel",
    "LmbQwen2Model",
    "LmbQwen2ForCausalLM",
    "LmbQwen2ForSequenceClassification",
    "LmbBertConfig",
    "LmbBertPreTrainedModel",
    "LmbBertModel",
    "LmbBertForPreTraining",
    "LmbBertForMaskedLM",
    "LmbBertForNextSentencePrediction",
    "LmbBertForSequenceClassification",
    "LmbBertForTokenClassification",
    "LmbBertForQuestionAnswering",
    "LmbBertForMultipleChoice",
    "FAMILIES",
    "FamilySpec",
    "train_tokenizer",
    "save_tokenizer",
    "config_kwargs_from_tokenizer",
]
