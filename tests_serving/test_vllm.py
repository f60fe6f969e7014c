"""vLLM's offline engine (`vllm.LLM`, Transformers backend, trust_remote_code) on lmblocks checkpoints: decoders
give transformers' greedy tokens for a batch of prompts, BERT gives `LmbBertModel`'s embeddings."""

from __future__ import annotations

import pytest
import torch

from conftest import run_vllm_offline


def test_greedy_tokens_equal_transformers_generate(family, checkpoints, expected, tmp_path):
    want = expected[family]
    request = {"prompts": want["prompts"], "max_tokens": len(want["tokens"][0])}
    got = run_vllm_offline("generate", checkpoints / family, request, tmp_path)["tokens"]
    agree = [g == w for g, w in zip(got, want["tokens"])]
    assert all(agree), f"prompts whose tokens agree: {agree}\nvLLM:         {got}\ntransformers: {want['tokens']}"


def test_encoder_embeddings_equal_lmblocks_base_model(checkpoints, expected, encoder, tmp_path):
    """vLLM's pooling runner: the encoder's last hidden state at [CLS], normalised (its defaults)."""
    want = expected[encoder]
    got = run_vllm_offline("embed", checkpoints / encoder, {"texts": want["texts"]}, tmp_path)["embeddings"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want["cls_embeddings"]), atol=1e-5, rtol=1e-4)
