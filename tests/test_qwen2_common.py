"""transformers' common tests run against every lmblocks Qwen2 class (see tests/test_llama_common.py, whose tester this
one reuses: Qwen2 is LLaMA's differences, and so is its tester). The tiny config keeps Qwen2's q/k/v biases and tied
embeddings, and grouped-query attention (4 query heads, 2 key-value heads)."""

from __future__ import annotations

import unittest

from hf_common_tests.generation.test_utils import GenerationTesterMixin
from hf_common_tests.test_modeling_common import ModelTesterMixin
from hf_common_tests.test_training_mixin import TrainingTesterMixin
from hf_contract import LmbConfigTestMixin, LmbModelTestMixin
from lmblocks import LmbQwen2Config, LmbQwen2ForCausalLM, LmbQwen2ForSequenceClassification, LmbQwen2Model
from test_llama_common import LmbLlamaModelTester

_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "intermediate_size", "max_position_embeddings", "num_labels", "pad_token_id", "bos_token_id", "eos_token_id")


class LmbQwen2ModelTester(LmbLlamaModelTester):
    """LLaMA's tester (shapes, inputs) building Qwen2 configs and classes."""

    def __init__(self, parent: unittest.TestCase, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.causal_lm_class = LmbQwen2ForCausalLM
        self.sequence_classification_class = LmbQwen2ForSequenceClassification
        self.base_model_class = LmbQwen2Model

    def get_config(self) -> LmbQwen2Config:
        return LmbQwen2Config(**{name: getattr(self, name) for name in _FIELDS}, tie_word_embeddings=True)


# The generation suite runs for Qwen2 in tests/test_generation.py (Qwen2 is in tests/families.py), and greedy decoding
# is compared with transformers' Qwen2ForCausalLM in tests/test_qwen2.py. No common test is skipped by us.
class LmbQwen2ModelTest(
    LmbModelTestMixin, ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin, unittest.TestCase
):
    model_type = LmbQwen2Config.model_type
    model_tester_class = LmbQwen2ModelTester
    all_model_classes = (LmbQwen2Model, LmbQwen2ForCausalLM, LmbQwen2ForSequenceClassification)
    role_tables = {
        "MODEL_MAPPING_NAMES": LmbQwen2Model,
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": LmbQwen2ForCausalLM,
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": LmbQwen2ForSequenceClassification,
    }

    def test_tester_is_qwen2(self) -> None:
        """The common tests above exercise Qwen2's differences only if the tiny config has them."""
        config = self.model_tester.get_config()
        assert config.attention_bias and config.tie_word_embeddings
        assert config.num_key_value_heads < config.num_attention_heads
        model = LmbQwen2Model(config)
        assert model.layers[0].self_attn.q_proj.bias is not None and model.layers[0].self_attn.o_proj.bias is None


class LmbQwen2ConfigTest(LmbConfigTestMixin, unittest.TestCase):
    config_class = LmbQwen2Config
    config_kwargs = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=99)
