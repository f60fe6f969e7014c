"""lmblocks.evaluation.bits_per_byte: windowed scoring equals one full-context pass where the text fits, every token
is scored once when it does not, and the number is the loss in bits over the text's bytes."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import lmblocks
    from lmblocks.tokenization_trainer import train_tokenizer

    text = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 20
    tokenizer = train_tokenizer(iter([text]), "gpt2", vocab_size=300, show_progress=False)
    config = lmblocks.LmbGPT2Config.from_preset("tiny", vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                                n_positions=128)
    return lmblocks.LmbGPT2LMHeadModel(config).eval(), tokenizer


TEXT = "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do."


def test_one_window_equals_the_full_context_loss(model_and_tokenizer):
    from lmblocks.evaluation import bits_per_byte

    model, tokenizer = model_and_tokenizer
    ids = torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # mean nats over tokens 1..n-1
    result = bits_per_byte(model, tokenizer, TEXT, window=128)
    assert result["tokens"] == ids.shape[1] - 1
    assert result["nats_per_token"] == pytest.approx(loss, rel=1e-5)
    first_bytes = len(tokenizer.decode(ids[0, :1]).encode())
    assert result["bytes"] == len(TEXT.encode()) - first_bytes
    assert result["bits_per_byte"] == pytest.approx(loss * result["tokens"] / math.log(2) / result["bytes"], rel=1e-5)


@pytest.mark.parametrize("window, batch_size", [(8, 1), (9, 3), (16, 4)])
def test_windows_score_every_token_once(model_and_tokenizer, window, batch_size):
    from lmblocks.evaluation import bits_per_byte

    model, tokenizer = model_and_tokenizer
    n_tokens = len(tokenizer(TEXT * 3, add_special_tokens=False)["input_ids"])
    result = bits_per_byte(model, tokenizer, TEXT * 3, window=window, batch_size=batch_size)
    assert result["tokens"] == n_tokens - 1
    # Less context per token than the full pass, so never much better than it; an untrained model is near uniform.
    assert result["nats_per_token"] == pytest.approx(math.log(len(tokenizer)), rel=0.1)


def test_too_short_text_is_an_error(model_and_tokenizer):
    from lmblocks.evaluation import bits_per_byte

    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="at least two"):
        bits_per_byte(model, tokenizer, "A", window=8)
