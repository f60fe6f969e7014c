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


# ----------------------------------------------------------------------------------------------------------------
# The LM head fused with the loss: against F.cross_entropy on the full logits, values and every gradient.

import lmblocks.losses as losses_module  # noqa: E402
from lmblocks.losses import causal_lm_head_loss, masked_lm_head_loss  # noqa: E402

WIDTH = 16


def _head_batch(labelled_fraction: float, bias: bool = False, tied: bool = False, seed: int = 0, dtype=torch.float32):
    """Hidden states computed from a token embedding (so a tied head gets gradient from both uses), the head, the
    labels, and the list of tensors to differentiate."""
    g = torch.Generator().manual_seed(seed)
    embed = torch.nn.Embedding(VOCAB, WIDTH).to(dtype)
    head = torch.nn.Linear(WIDTH, VOCAB, bias=bias).to(dtype)
    with torch.no_grad():
        embed.weight.copy_(torch.randn(VOCAB, WIDTH, generator=g))
        head.weight.copy_(torch.randn(VOCAB, WIDTH, generator=g))
        if bias:
            head.bias.copy_(torch.randn(VOCAB, generator=g))
    if tied:
        head.weight = embed.weight
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    labels = ids.clone()
    labels[torch.rand(3, 11, generator=g) >= labelled_fraction] = -100
    mix = torch.randn(WIDTH, WIDTH, generator=g).to(dtype).requires_grad_()
    hidden = lambda: embed(ids) @ mix  # noqa: E731
    params = [mix, *dict.fromkeys([embed.weight, *head.parameters()])]
    return hidden, head, labels, params


def _reference(kind, hidden, head, labels, num_items_in_batch=None, transform=None):
    """What the models compute today: the full logits, upcast, then transformers' loss."""
    h = hidden()
    logits = head(h if transform is None else transform(h)).float()
    loss_fn = ForCausalLMLoss if kind == "causal" else ForMaskedLMLoss
    return loss_fn(logits, labels, VOCAB, num_items_in_batch=num_items_in_batch)


def _fused(kind, hidden, head, labels, **kwargs):
    loss_fn = causal_lm_head_loss if kind == "causal" else masked_lm_head_loss
    return loss_fn(hidden(), head, labels, VOCAB, **kwargs)


def _assert_same(ours, theirs, params, atol=1e-5, rtol=1e-5):
    ours_grads = torch.autograd.grad(ours, params)
    theirs_grads = torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.fixture(params=["host", "device"])
def rows(request, monkeypatch):
    """`host`: labels on the CPU, ignored rows gathered out. `device`: the accelerator path (ignored rows computed and
    masked, no host read), taken on the CPU by saying the labels are not on the host."""
    if request.param == "device":
        monkeypatch.setattr(losses_module, "_on_host", lambda t: False)
    return request.param


@pytest.mark.parametrize("kind", ["causal", "masked"])
@pytest.mark.parametrize("bias,tied", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("labelled_fraction", [1.0, 0.15])
@pytest.mark.parametrize("chunk_size", [None, 4])  # one chunk; uneven chunks (33 rows in chunks of 4)
def test_head_loss_matches_full_logits(kind, bias, tied, labelled_fraction, chunk_size, rows):
    hidden, head, labels, params = _head_batch(labelled_fraction, bias, tied)
    ours = _fused(kind, hidden, head, labels, chunk_size=chunk_size)
    _assert_same(ours, _reference(kind, hidden, head, labels), params)


@pytest.mark.parametrize("num_items_in_batch", [7, torch.tensor(50)])
def test_head_loss_takes_num_items_in_batch(num_items_in_batch, rows):
    """Sum ÷ count, Trainer's gradient-accumulation contract."""
    hidden, head, labels, params = _head_batch(0.8, tied=True)
    for kind in ("causal", "masked"):
        ours = _fused(kind, hidden, head, labels, num_items_in_batch=num_items_in_batch, chunk_size=5)
        _assert_same(ours, _reference(kind, hidden, head, labels, num_items_in_batch), params)


def test_causal_head_loss_takes_shift_labels():
    hidden, head, labels, params = _head_batch(1.0)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    ours = causal_lm_head_loss(hidden(), head, None, VOCAB, shift_labels=shifted, chunk_size=8)
    theirs = ForCausalLMLoss(head(hidden()), None, VOCAB, shift_labels=shifted)
    _assert_same(ours, theirs, params)


def test_masked_head_loss_runs_the_transform_on_labelled_rows(rows):
    """BERT: transform (dense → GELU → LayerNorm) then the biased decoder; with labels on the host the transform only
    sees the ~15 % labelled rows."""
    hidden, head, labels, params = _head_batch(0.15, bias=True, tied=True)
    torch.manual_seed(0)
    transform = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU(), torch.nn.LayerNorm(WIDTH))
    seen = []
    transform.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    params = params + list(transform.parameters())
    ours = masked_lm_head_loss(hidden(), head, labels, VOCAB, transform=transform, chunk_size=3)
    _assert_same(ours, _reference("masked", hidden, head, labels, transform=transform), params)
    labelled = int((labels != -100).sum())
    assert seen[0] == (labelled if rows == "host" else labels.numel())


@pytest.mark.parametrize("kind,labelled_fraction,dropout,chunk_size", [
    ("causal", 0.6, 0.0, 4), ("masked", 0.15, 0.0, 4),
    # With dropout, one chunk of all the rows draws the same mask as the unfused head, and its recomputation in
    # backward must replay it.
    ("masked", 1.0, 0.3, None),
])
def test_head_loss_with_lora_on_the_head(kind, labelled_fraction, dropout, chunk_size, rows):
    """peft wraps the head in its LoRA `Linear`: the generic path (per chunk, recomputed in backward) gives the
    same loss and the same gradients for the adapter and the hidden states."""
    from peft import LoraConfig, get_peft_model

    hidden, head, labels, _ = _head_batch(labelled_fraction)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = head

    torch.manual_seed(0)
    model = get_peft_model(Head(), LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=dropout,
                                              init_lora_weights=False))
    lora_head = model.base_model.model.lm_head
    assert not losses_module._is_plain_linear(lora_head)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2  # lora_A, lora_B; the base weight is frozen
    h = hidden().detach().requires_grad_()
    torch.manual_seed(1)
    ours = _fused(kind, lambda: h, lora_head, labels, chunk_size=chunk_size)
    ours_grads = torch.autograd.grad(ours, params + [h])
    torch.manual_seed(1)
    theirs = _reference(kind, lambda: h, lora_head, labels)
    theirs_grads = torch.autograd.grad(theirs, params + [h])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_grads, theirs_grads, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["causal", "masked"])
@pytest.mark.parametrize("labelled_fraction", [1.0, 0.15])
def test_head_loss_bf16_upcasts_the_logits(kind, labelled_fraction, rows):
    """bf16 head and hidden states: the logits of each chunk are upcast to float32 for the softmax, as the models'
    `logits.float()` does; gradients come back in bf16, to bf16 rounding of the unfused ones."""
    hidden, head, labels, params = _head_batch(labelled_fraction, bias=True, tied=True, dtype=torch.bfloat16)
    ours = _fused(kind, hidden, head, labels, chunk_size=4)
    theirs = _reference(kind, hidden, head, labels)
    assert ours.dtype == torch.float32
    ours_grads, theirs_grads = torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_grads, theirs_grads):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_head_loss_nothing_labelled_is_nan_as_in_torch(rows):
    hidden, head, labels, _ = _head_batch(0.0)
    assert torch.isnan(_fused("masked", hidden, head, labels))
    assert torch.isnan(_reference("masked", hidden, head, labels))


def test_head_loss_without_grad_gives_the_value():
    hidden, head, labels, _ = _head_batch(0.5, bias=True)
    with torch.no_grad():
        torch.testing.assert_close(_fused("causal", hidden, head, labels, chunk_size=4),
                                   _reference("causal", hidden, head, labels))


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op and the largest tensor any of them returns."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest = set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_head_loss_never_holds_the_logits_matrix(kind, rows):
    """Forward and backward: no tensor as large as the (tokens × vocab) logits, only chunks of them."""
    hidden, head, labels, params = _head_batch(1.0, bias=True)
    recorder = _Recorder()
    with recorder:
        loss = _fused(kind, hidden, head, labels, chunk_size=4)
        torch.autograd.grad(loss, params)
    assert recorder.largest <= max(4 * VOCAB, VOCAB * WIDTH) < labels.numel() * VOCAB  # a chunk, or the weight


def test_head_loss_on_the_device_path_reads_nothing_back(monkeypatch):
    """The accelerator path: no host read (`.item()`, `.tolist()`, `nonzero`), so no device sync per step."""
    monkeypatch.setattr(losses_module, "_on_host", lambda t: False)
    hidden, head, labels, params = _head_batch(0.15, bias=True, tied=True)
    recorder = _Recorder()
    with recorder:
        loss = _fused("masked", hidden, head, labels, chunk_size=4)
        torch.autograd.grad(loss, params)
        cross_entropy_sum(torch.randn(6, VOCAB, requires_grad=True), labels.view(-1)[:6]).backward()
    assert not recorder.ops & {"_local_scalar_dense", "nonzero", "nonzero_static", "item"}, recorder.ops


@pytest.mark.parametrize("bad_label", [VOCAB, -1])
def test_head_loss_label_outside_vocabulary_is_a_clear_error(bad_label):
    hidden, head, labels, _ = _head_batch(1.0)
    labels[1, 3] = bad_label
    with pytest.raises(ValueError, match=rf"Labels must be in \[0, {VOCAB}\).*-100"):
        _fused("masked", hidden, head, labels)


def test_head_loss_wrong_shapes_are_a_clear_error():
    hidden, head, labels, _ = _head_batch(1.0)
    with pytest.raises(ValueError, match=r"Labels of shape \(3, 10\) do not match hidden states"):
        causal_lm_head_loss(hidden(), head, labels[:, 1:], VOCAB)
    with pytest.raises(ValueError, match="vocab_size is 50"):
        masked_lm_head_loss(hidden(), head, labels % 50, 50)


def test_compiled_head_loss_matches_eager():
    hidden, head, labels, params = _head_batch(0.5, bias=True)
    compiled = torch.compile(causal_lm_head_loss, backend="eager", fullgraph=True)
    _assert_same(compiled(hidden(), head, labels, VOCAB), causal_lm_head_loss(hidden(), head, labels, VOCAB), params)


# ----------------------------------------------------------------------------------------------------------------
# The models: in training mode with labels the heads use the fused loss and return no logits.

from families import FAMILIES  # noqa: E402


def _lm_classes():
    for family in FAMILIES:
        for cls in (family.causal_lm_class, family.masked_lm_class, getattr(family, "pretraining_class", None)):
            if cls is not None:
                yield pytest.param(family, cls, id=cls.__name__)


@pytest.mark.parametrize("family,model_class", list(_lm_classes()))
def test_models_train_through_the_fused_loss(family, model_class):
    """Same loss and gradients as the head + loss on the full logits (forced by setting `loss_function`), dropout on
    (same seed, same masks); `logits` None in training, computed as before in eval mode."""
    torch.manual_seed(0)
    model = model_class(family.tiny_config()).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (2, 12), generator=g)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) > 0.5, -100)
    extra = {"next_sentence_label": torch.tensor([0, 1])} if "PreTraining" in model_class.__name__ else {}

    def run():
        torch.manual_seed(1)
        out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(9), **extra)
        grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
        return out, grads

    fused, fused_grads = run()
    assert fused.get("logits", fused.get("prediction_logits")) is None
    default = model.loss_function
    model.loss_function = lambda *args, **kwargs: default(*args, **kwargs)  # not the default: the full logits
    unfused, unfused_grads = run()
    assert unfused.get("logits", unfused.get("prediction_logits")) is not None
    torch.testing.assert_close(fused.loss, unfused.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused_grads, unfused_grads, atol=1e-6, rtol=1e-5)
    del model.loss_function
    assert model.eval()(input_ids=ids, labels=labels, **extra).loss is not None


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.causal_lm_class is not None], ids=lambda f: f.name)
def test_lora_on_the_lm_head_trains_through_the_fused_loss(family):
    """peft's LoRA on `lm_head` (the generic, recomputing path): the adapter's gradients equal the unfused ones."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = family.causal_lm_class(family.tiny_config())
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False,
                                             lora_dropout=0.0)).train()
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        torch.manual_seed(1)
        out = model(input_ids=ids, labels=ids)
        return out.loss, torch.autograd.grad(out.loss, params)

    fused = run()
    inner = model.get_base_model()
    default = inner.loss_function
    inner.loss_function = lambda *args, **kwargs: default(*args, **kwargs)
    torch.testing.assert_close(fused, run(), atol=1e-6, rtol=1e-5)


def test_head_loss_under_cpu_autocast():
    """Trainer's `bf16=True` on CPU: float32 weights, bf16 matmuls under autocast; same loss and gradients as the
    unfused head under the same autocast, to bf16 rounding, and gradients in the parameters' float32."""
    hidden, head, labels, params = _head_batch(0.5, bias=True, tied=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _fused("causal", hidden, head, labels, chunk_size=4)
        theirs = _reference("causal", hidden, head, labels)
    ours_grads, theirs_grads = torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)
    for a, b in zip(ours_grads, theirs_grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
