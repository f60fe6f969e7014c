"""transformers' own common tests run against every lmblocks BERT class: the contract for "behaves like any model on
the Hub".

`ModelTesterMixin`, `ConfigTester` and `TrainingTesterMixin` come from the sdist of the installed transformers
(`.cache/hf_tests/hf_common_tests`). The mixins pick inputs and labels per head by looking class names up in
transformers' `MODEL_FOR_*_MAPPING_NAMES` tables (multiple choice expands the inputs, QA gets start/end positions,
base models are skipped by the training tests, ...); `role_tables` enters the lmblocks classes there under their
`model_type` for the duration of the test class (tests/hf_contract.py), so that each head is tested as what it is.
No common test is skipped by us; tests that transformers itself gates (GPU, flash-attention, slow, ...) skip with its reason.
"""

from __future__ import annotations

import unittest

import torch

from hf_common_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
from hf_common_tests.test_training_mixin import TrainingTesterMixin
from hf_contract import LmbConfigTestMixin, LmbModelTestMixin
from lmblocks import (
    LmbBertConfig,
    LmbBertForMaskedLM,
    LmbBertForMultipleChoice,
    LmbBertForNextSentencePrediction,
    LmbBertForPreTraining,
    LmbBertForQuestionAnswering,
    LmbBertForSequenceClassification,
    LmbBertForTokenClassification,
    LmbBertModel,
)

class LmbBertModelTester:
    """Builds the tiny configs and inputs the mixins ask for (the attribute names are the ones they read)."""

    def __init__(
        self,
        parent: unittest.TestCase,
        batch_size: int = 13,
        seq_length: int = 7,
        is_training: bool = True,
        vocab_size: int = 99,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 37,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 16,
        num_labels: int = 3,
        num_choices: int = 4,
        pad_token_id: int = 0,
    ) -> None:
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.num_labels = num_labels
        self.num_choices = num_choices
        self.pad_token_id = pad_token_id
        self.base_model_class = LmbBertModel
        self.sequence_classification_class = LmbBertForSequenceClassification

    def get_config(self) -> LmbBertConfig:
        return LmbBertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            # Dropout off: several common tests compare two forward passes of a model in train mode.
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=self.num_labels,
            pad_token_id=self.pad_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        token_type_ids = ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.get_config(), inputs


class LmbBertModelTest(LmbModelTestMixin, ModelTesterMixin, TrainingTesterMixin, unittest.TestCase):
    model_type = LmbBertConfig.model_type
    model_tester_class = LmbBertModelTester
    all_model_classes = (
        LmbBertModel,
        LmbBertForPreTraining,
        LmbBertForMaskedLM,
        LmbBertForNextSentencePrediction,
        LmbBertForSequenceClassification,
        LmbBertForTokenClassification,
        LmbBertForQuestionAnswering,
        LmbBertForMultipleChoice,
    )
    role_tables = {
        "MODEL_MAPPING_NAMES": LmbBertModel,
        "MODEL_FOR_PRETRAINING_MAPPING_NAMES": LmbBertForPreTraining,
        "MODEL_FOR_MASKED_LM_MAPPING_NAMES": LmbBertForMaskedLM,
        "MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES": LmbBertForNextSentencePrediction,
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": LmbBertForSequenceClassification,
        "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": LmbBertForTokenClassification,
        "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": LmbBertForQuestionAnswering,
        "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES": LmbBertForMultipleChoice,
    }
    # Learned absolute positions: transformers' resize_position_embeddings is not implemented for them.
    test_resize_position_embeddings = False

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        # Pretraining takes two labels; the mixin knows only the MLM one.
        if return_labels and model_class is LmbBertForPreTraining:
            batch, seq = self.model_tester.batch_size, self.model_tester.seq_length
            inputs_dict["labels"] = torch.zeros((batch, seq), dtype=torch.long)
            inputs_dict["next_sentence_label"] = torch.zeros(batch, dtype=torch.long)
        return inputs_dict

    def test_pretraining_labels_give_both_loss_terms(self) -> None:
        """The labels `_prepare_for_class` adds for pretraining reach both heads: loss = MLM loss + NSP loss."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = LmbBertForPreTraining(config).eval()
        out = model(**self._prepare_for_class(inputs, LmbBertForPreTraining, return_labels=True))
        assert out.mlm_loss is not None and out.nsp_loss is not None
        torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)

    def _get_trainable_model_class(self):
        # TrainingTesterMixin's batch has token-level labels (labels = input_ids): for BERT, that is the MLM head.
        return LmbBertForMaskedLM


class LmbBertConfigTest(LmbConfigTestMixin, unittest.TestCase):
    config_class = LmbBertConfig
    config_kwargs = dict(hidden_size=37, num_attention_heads=1, vocab_size=99)
