"""transformers' common tests run against every lmblocks Qwen2 class (the test class is built from the family's spec,
tests/hf_contract.py). The tiny config keeps Qwen2's q/k/v biases and tied embeddings, and grouped-query attention
(4 query heads, 2 key-value heads). Greedy decoding is compared with transformers' Qwen2ForCausalLM in
tests/test_qwen2.py."""

from __future__ import annotations

import unittest

from families import QWEN2
from hf_contract import LmbConfigTestMixin, common_model_test


class LmbQwen2ModelTest(common_model_test(QWEN2)):
    def test_tester_is_qwen2(self) -> None:
        """The common tests above exercise Qwen2's differences only if the tiny config has them."""
        config = self.model_tester.get_config()
        assert config.attention_bias and config.tie_word_embeddings
        assert config.num_key_value_heads < config.num_attention_heads
        model = QWEN2.base_class(config)
        assert model.layers[0].self_attn.q_proj.bias is not None and model.layers[0].self_attn.o_proj.bias is None


class LmbQwen2ConfigTest(LmbConfigTestMixin, unittest.TestCase):
    config_class = QWEN2.config_class
    config_kwargs = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=99)
