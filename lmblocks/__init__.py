"""lmblocks: GPT-2, BERT and LLaMA written out clearly as first-class Hugging Face models, and a tokenizer trainer.

Importing lmblocks registers every family with transformers' Auto classes, and each model class for remote code
(`auto_map`), so `save_pretrained` writes checkpoints that load with `trust_remote_code=True` without lmblocks.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_gpt2 import LmbGPT2Config
from .modeling_gpt2 import (
    LmbGPT2ForSequenceClassification,
    LmbGPT2LMHeadModel,
    LmbGPT2Model,
    LmbGPT2PreTrainedModel,
)

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

__all__ = [
    "LmbGPT2Config",
    "LmbGPT2PreTrainedModel",
    "LmbGPT2Model",
    "LmbGPT2LMHeadModel",
    "LmbGPT2ForSequenceClassification",
]

# LLaMA family (issue #5).
from .configuration_llama import LmbLlamaConfig  # noqa: E402
from .modeling_llama import (  # noqa: E402
    LmbLlamaForCausalLM,
    LmbLlamaForSequenceClassification,
    LmbLlamaModel,
    LmbLlamaPreTrainedModel,
)

_register(
    LmbLlamaConfig,
    {
        AutoModel: LmbLlamaModel,
        AutoModelForCausalLM: LmbLlamaForCausalLM,
        AutoModelForSequenceClassification: LmbLlamaForSequenceClassification,
    },
)
__all__ += [
    "LmbLlamaConfig",
    "LmbLlamaPreTrainedModel",
    "LmbLlamaModel",
    "LmbLlamaForCausalLM",
    "LmbLlamaForSequenceClassification",
]

# BERT family (issue #6).
from transformers import (  # noqa: E402
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForNextSentencePrediction,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForTokenClassification,
)

from .configuration_bert import LmbBertConfig  # noqa: E402
from .modeling_bert import (  # noqa: E402
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
__all__ += [
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
]
