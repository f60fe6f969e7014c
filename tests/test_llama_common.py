"""transformers' own common tests run against every lmblocks LLaMA class: the contract for "behaves like any model on
the Hub" (the test class is built from the family's spec, tests/hf_contract.py). The generation suite runs for LLaMA
in tests/test_generation.py, and greedy decoding with dynamic and static caches is compared with transformers'
LlamaForCausalLM in tests/test_llama.py."""

from __future__ import annotations

import unittest

from families import LLAMA
from hf_contract import LmbConfigTestMixin, common_model_test


class LmbLlamaModelTest(common_model_test(LLAMA)):
    def test_tester_uses_grouped_query_attention(self) -> None:
        """The common tests above only exercise `repeat_kv` if the tiny config has fewer key-value heads than heads."""
        config = self.model_tester.get_config()
        assert config.num_key_value_heads < config.num_attention_heads


class LmbLlamaConfigTest(LmbConfigTestMixin, unittest.TestCase):
    config_class = LLAMA.config_class
    config_kwargs = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=99)
