"""transformers' own common tests run against every lmblocks LLaMA class: the contract for "behaves like any model on
the Hub".

`ModelTesterMixin`, `ConfigTester` and `TrainingTesterMixin` come from the sdist of the installed transformers
(fetched by `scripts/fetch_assets.py` into `.cache/hf_tests/hf_common_tests`). Every test we skip names its reason in
`skips`; tests that transformers itself gates (GPU, multi-GPU, flash-attention, deepspeed, slow) skip with
transformers' own reason.
"""

from __future__ import annotations

import unittest

from hf_common_tests.generation.test_utils import GenerationTesterMixin
from hf_common_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
from hf_common_tests.test_training_mixin import TrainingTesterMixin
from hf_contract import LmbConfigTestMixin, LmbModelTestMixin
from lmblocks import LmbLlamaConfig, LmbLlamaForCausalLM, LmbLlamaForSequenceClassification, LmbLlamaModel


class LmbLlamaModelTester:
    """Builds the tiny configs and inputs the mixins ask for (the attribute names are the ones they read).

    Grouped-query attention on (4 query heads, 2 key-value heads), so every common test exercises `repeat_kv`.
    """

    def __init__(
        self,
        parent: unittest.TestCase,
        batch_size: int = 13,
        seq_length: int = 7,
        is_training: bool = True,
        use_attention_mask: bool = True,
        use_labels: bool = True,
        vocab_size: int = 99,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        intermediate_size: int = 37,
        max_position_embeddings: int = 512,
        num_labels: int = 3,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
    ) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_attention_mask = use_attention_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        # The classes TrainingTesterMixin trains.
        self.causal_lm_class = LmbLlamaForCausalLM
        self.sequence_classification_class = LmbLlamaForSequenceClassification
        self.base_model_class = LmbLlamaModel

    def get_config(self) -> LmbLlamaConfig:
        return LmbLlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            num_labels=self.num_labels,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def prepare_config_and_inputs(self):
        # Tokens avoid the pad id, so sequence classification pools the true last token.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1) + 1
        attention_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_attention_mask else None
        labels = ids_tensor([self.batch_size], self.num_labels) if self.use_labels else None
        return self.get_config(), input_ids, attention_mask, labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, _ = self.prepare_config_and_inputs()
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return config, inputs


# GenerationTesterMixin is the stand-in (tests/hf_standins/generation/test_utils.py): the generation suite runs for
# LLaMA in tests/test_generation.py (LLaMA is in tests/families.py), and greedy decoding with dynamic and static caches
# is compared with transformers' LlamaForCausalLM in tests/test_llama.py. No common test is skipped by us.
class LmbLlamaModelTest(
    LmbModelTestMixin, ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin, unittest.TestCase
):
    model_type = LmbLlamaConfig.model_type
    model_tester_class = LmbLlamaModelTester
    all_model_classes = (LmbLlamaModel, LmbLlamaForCausalLM, LmbLlamaForSequenceClassification)
    role_tables = {
        "MODEL_MAPPING_NAMES": LmbLlamaModel,
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": LmbLlamaForCausalLM,
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": LmbLlamaForSequenceClassification,
    }


    def test_tester_uses_grouped_query_attention(self) -> None:
        """The common tests above only exercise `repeat_kv` if the tiny config has fewer key-value heads than heads."""
        config = self.model_tester.get_config()
        assert config.num_key_value_heads < config.num_attention_heads


class LmbLlamaConfigTest(LmbConfigTestMixin, unittest.TestCase):
    config_class = LmbLlamaConfig
    config_kwargs = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=99)
