"""transformers' own common tests run against every lmblocks GPT-2 class: the contract for "behaves like any model
on the Hub".

`ModelTesterMixin`, `ConfigTester` and `TrainingTesterMixin` come from the sdist of the installed transformers
(fetched by `scripts/fetch_assets.py` into `.cache/hf_tests/hf_common_tests`). No common test is skipped by us; tests that transformers itself gates (GPU, multi-GPU, flash-attention, deepspeed, slow) skip with
transformers' own reason.
"""

from __future__ import annotations

import unittest

from hf_common_tests.generation.test_utils import GenerationTesterMixin
from hf_common_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
from hf_common_tests.test_training_mixin import TrainingTesterMixin
from hf_contract import LmbConfigTestMixin, LmbModelTestMixin
from lmblocks import LmbGPT2Config, LmbGPT2ForSequenceClassification, LmbGPT2LMHeadModel, LmbGPT2Model


class LmbGPT2ModelTester:
    """Builds the tiny configs and inputs the mixins ask for (the attribute names are the ones they read)."""

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
        intermediate_size: int = 37,
        max_position_embeddings: int = 512,
        num_labels: int = 3,
        pad_token_id: int = 0,
        bos_token_id: int = 98,
        eos_token_id: int = 98,
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
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        # The classes TrainingTesterMixin trains.
        self.causal_lm_class = LmbGPT2LMHeadModel
        self.sequence_classification_class = LmbGPT2ForSequenceClassification
        self.base_model_class = LmbGPT2Model

    def get_config(self) -> LmbGPT2Config:
        return LmbGPT2Config(
            vocab_size=self.vocab_size,
            n_embd=self.hidden_size,
            n_layer=self.num_hidden_layers,
            n_head=self.num_attention_heads,
            n_inner=self.intermediate_size,
            n_positions=self.max_position_embeddings,
            # Dropout off: several common tests compare two forward passes of a model in train mode.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
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


# GenerationTesterMixin is the stand-in (tests/hf_standins/generation/test_utils.py): the generation suite itself is
# tests/test_generation.py; inheriting it tells `test_generation_tester_mixin_inheritance` that generation is tested.
class LmbGPT2ModelTest(
    LmbModelTestMixin, ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin, unittest.TestCase
):
    model_type = LmbGPT2Config.model_type
    model_tester_class = LmbGPT2ModelTester
    all_model_classes = (LmbGPT2Model, LmbGPT2LMHeadModel, LmbGPT2ForSequenceClassification)
    role_tables = {
        "MODEL_MAPPING_NAMES": LmbGPT2Model,
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": LmbGPT2LMHeadModel,
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": LmbGPT2ForSequenceClassification,
    }
    # Learned absolute positions (wpe), resizable like the token embeddings.
    test_resize_position_embeddings = True

    def test_tester_ties_embeddings(self) -> None:
        """The common tied-weights tests only exercise GPT-2's tied LM head if the tiny config ties it."""
        assert self.model_tester.get_config().tie_word_embeddings


class LmbGPT2ConfigTest(LmbConfigTestMixin, unittest.TestCase):
    config_class = LmbGPT2Config
    config_kwargs = dict(n_embd=37, n_head=1, vocab_size=99, bos_token_id=98, eos_token_id=98)
