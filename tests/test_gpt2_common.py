"""transformers' own common tests run against every lmblocks GPT-2 class: the contract for "behaves like any model
on the Hub" (the test class is built from the family's spec, tests/hf_contract.py)."""

from __future__ import annotations

import unittest

from families import GPT2
from hf_contract import LmbConfigTestMixin, common_model_test


class LmbGPT2ModelTest(common_model_test(GPT2, n_inner=37)):
    # Learned absolute positions (wpe), resizable like the token embeddings.
    test_resize_position_embeddings = True

    def test_tester_ties_embeddings(self) -> None:
        """The common tied-weights tests only exercise GPT-2's tied LM head if the tiny config ties it."""
        assert self.model_tester.get_config().tie_word_embeddings


class LmbGPT2ConfigTest(LmbConfigTestMixin, unittest.TestCase):
    config_class = GPT2.config_class
    config_kwargs = dict(n_embd=37, n_head=1, vocab_size=99, bos_token_id=98, eos_token_id=98)
