"""`lmblocks.losses` against the losses it replaces: `F.cross_entropy` and transformers' `ForCausalLMLoss` /
`ForMaskedLMLoss` — same values and gradients on both of its paths (dense, and gathered labelled rows), under
gradient accumulation, in bf16, under torch.compile — and a clear error for labels it cannot take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss, ForMaskedLMLoss

from lmblocks.losses import causal_lm_loss, cross_entropy_sum, masked_lm_loss

VOCAB = 97


def _batch(labelled_fraction: float, seed: int = 0, shape=(3, 11)):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(*shape, VOCAB, generator=g)).requires_grad_()
    labels = torch.randint(0, VOCAB, shape, generator=g)
    labels[torch.rand(shape, generator=g) >= labelled_fraction] = -100
    return logits, labels


def _value_and_grad(loss_fn, logits, *args, **kwargs):
    logits = logits.detach().clone().requires_grad_()
    loss = loss_fn(logits, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


@pytest.mark.parametrize("labelled_fraction", [1.0, 0.8, 0.15, 0.0])
def test_cross_entropy_sum_matches_torch(labelled_fraction):
    """1.0 and 0.8 take the dense path, 0.15 (a BERT batch) the gathered one, 0.0 has nothing to sum."""
    logits, labels = _batch(labelled_fraction)
    flat_logits, flat_labels = logits.view(-1, VOCAB), labels.view(-1)
    ours = _value_and_grad(cross_entropy_sum, flat_logits, flat_labels)
    torch_ = _value_and_grad(lambda x, y: F.cross_entropy(x, y, reduction="sum"), flat_logits, flat_labels)
    torch.testing.assert_close(ours[0], torch_[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ours[1], torch_[1], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("num_items_in_batch", [None, 50, torch.tensor(50)])
@pytest.mark.parametrize("labelled_fraction", [1.0, 0.15])
def test_lm_losses_match_transformers(labelled_fraction, num_items_in_batch):
    logits, labels = _batch(labelled_fraction)
    for ours_fn, theirs_fn in ((causal_lm_loss, ForCausalLMLoss), (masked_lm_loss, ForMaskedLMLoss)):
        ours = _value_and_grad(ours_fn, logits, labels, VOCAB, num_items_in_batch=num_items_in_batch)
        theirs = _value_and_grad(theirs_fn, logits, labels, VOCAB, num_items_in_batch=num_items_in_batch)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_causal_lm_loss_takes_shift_labels():
    logits, labels = _batch(1.0)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    torch.testing.assert_close(causal_lm_loss(logits, None, VOCAB, shift_labels=shifted),
                               ForCausalLMLoss(logits, None, VOCAB, shift_labels=shifted))


def test_nothing_labelled_is_nan_as_in_torch():
    logits, labels = _batch(0.0)
    assert torch.isnan(masked_lm_loss(logits, labels, VOCAB))
    assert torch.isnan(ForMaskedLMLoss(logits, labels, VOCAB))


@pytest.mark.parametrize("labelled_fraction", [1.0, 0.15])
def test_bf16_logits_match_transformers_upcast(labelled_fraction):
    """transformers upcasts the logits to float32 first; the gradient comes back in the logits' dtype."""
    logits, labels = _batch(labelled_fraction)
    logits = logits.detach().to(torch.bfloat16).requires_grad_()
    ours = _value_and_grad(masked_lm_loss, logits, labels, VOCAB)
    theirs = _value_and_grad(ForMaskedLMLoss, logits, labels, VOCAB)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_compiled_loss_matches_eager():
    logits, labels = _batch(0.5)
    compiled = torch.compile(causal_lm_loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(_value_and_grad(compiled, logits, labels, VOCAB),
                               _value_and_grad(causal_lm_loss, logits, labels, VOCAB), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad_label", [VOCAB, -1])
def test_label_outside_vocabulary_is_a_clear_error(bad_label):
    logits, labels = _batch(1.0)
    labels[1, 3] = bad_label
    with pytest.raises(ValueError, match=rf"Labels must be in \[0, {VOCAB}\).*-100"):
        causal_lm_loss(logits, labels, VOCAB)


def test_wrong_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="logits \\(N, V\\) and labels \\(N,\\)"):
        cross_entropy_sum(torch.randn(4, VOCAB), torch.zeros(5, dtype=torch.long))


def test_second_backward_is_refused_not_wrong():
    """The gradient is built in the saved buffer; autograd's version check turns a second backward into an error."""
    logits, labels = _batch(1.0)
    loss = causal_lm_loss(logits, labels, VOCAB)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_models_use_it_and_can_be_overridden():
    from lmblocks import LmbBertConfig, LmbBertForMaskedLM, LmbGPT2Config, LmbGPT2LMHeadModel

    model = LmbGPT2LMHeadModel(LmbGPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                             bos_token_id=0, eos_token_id=0)).eval()
    assert model.loss_function is causal_lm_loss
    bert = LmbBertForMaskedLM(LmbBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64))
    assert bert.loss_function is masked_lm_loss
    ids = torch.randint(0, VOCAB, (2, 8))
    expected = ForCausalLMLoss(model(ids).logits, ids, VOCAB)
    torch.testing.assert_close(model(ids, labels=ids).loss, expected)
    model.loss_function = lambda *args, **kwargs: torch.tensor(42.0)
    assert model(ids, labels=ids).loss.item() == 42.0
