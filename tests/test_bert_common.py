"""transformers' own common tests run against every lmblocks BERT class: the contract for "behaves like any model on
the Hub" (the test class is built from the family's spec, tests/hf_contract.py). The mixins pick inputs and labels per head by looking class names up in
transformers' `MODEL_FOR_*_MAPPING_NAMES` tables (multiple choice expands the inputs, QA gets start/end positions,
base models are skipped by the training tests, ...); `role_tables` enters the lmblocks classes there under their
`model_type` for the duration of the test class (tests/hf_contract.py), so that each head is tested as what it is.
"""

from __future__ import annotations

import unittest

import torch

from families import BERT
from hf_contract import LmbConfigTestMixin, common_model_test
from lmblocks import LmbBertConfig, LmbBertForMaskedLM, LmbBertForPreTraining


class LmbBertModelTest(common_model_test(BERT)):
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
