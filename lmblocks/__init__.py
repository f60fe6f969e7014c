"""lmblocks: GPT-2, BERT and LLaMA written out clearly as first-class Hugging Face models, and a tokenizer trainer.

Importing lmblocks registers every family with transformers' Auto classes, and each model class for remote code
(`auto_map`), so `save_pretrained` writes checkpoints that load with `trust_remote_code=True` without lmblocks.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForNextSentencePrediction,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_bert import LmbBertConfig
from .configuration_gpt2 import LmbGPT2Config
from .configuration_llama import LmbLlamaConfig
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
from .tokenization_trainer import config_kwargs_from_tokenizer, save_tokenizer, train_tokenizer

__version__ = "0.1.0"


def _register(config_class, models_by_auto_class) -> None:
    """Register a family with the Auto classes (for this process) and for remote code (written into `auto_map`)."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    for auto_class, model_class in models_by_auto_class.items():
        auto_class.register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)


_register(
    LmbGPT2Config,
    {
        AutoModel: LmbGPT2Model,
        AutoModelForCausalLM: LmbGPT2LMHeadModel,
        AutoModelForSequenceClassification: LmbGPT2ForSequenceClassification,
    },
)
_register(
    LmbLlamaConfig,
    {
        AutoModel: LmbLlamaModel,
        AutoModelForCausalLM: LmbLlamaForCausalLM,
        AutoModelForSequenceClassification: LmbLlamaForSequenceClassification,
    },
)
_register(
    LmbBertConfig,
    {
        AutoModel: LmbBertModel,
        AutoModelForPreTraining: LmbBertForPreTraining,
        AutoModelForMaskedLM: LmbBertForMaskedLM,
        AutoModelForNextSentencePrediction: LmbBertForNextSentencePrediction,
        AutoModelForSequenceClassification: LmbBertForSequenceClassification,
        AutoModelForTokenClassification: LmbBertForTokenClassification,
        AutoModelForQuestionAnswering: LmbBertForQuestionAnswering,
        AutoModelForMultipleChoice: LmbBertForMultipleChoice,
    },
)

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
    "train_tokenizer",
    "save_tokenizer",
    "config_kwargs_from_tokenizer",
]
