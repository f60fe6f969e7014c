"""The language-modelling losses: transformers' `ForCausalLMLoss` and `ForMaskedLMLoss`, same signatures and same
values, on a cross-entropy that does less memory traffic; and the same losses fused with the LM head, computed chunk
by chunk so that the (tokens × vocab) logits matrix never exists.

`F.cross_entropy` over a (tokens × vocab) logits matrix makes four full passes over it: log-softmax forward, the
NLL backward's zero-filled gradient, the log-softmax backward, and the scatter between them. On CPU that was a sixth
of a small LLaMA's training step. `cross_entropy_sum` below keeps the log-probabilities it computes anyway and turns
them into the gradient in place (softmax − one-hot), and computes nothing for ignored positions (-100): 85 % of the
rows of a BERT masked-LM batch, the last position of every causal-LM sequence, padding.

`causal_lm_head_loss` / `masked_lm_head_loss` take the hidden states and the head instead of the logits. For a plain
`nn.Linear` head, one autograd Function walks the tokens in chunks of a few hundred rows: chunk logits →
log-softmax → loss, and at once the chunk's gradient (softmax − one-hot) → its share of the hidden-state gradient
and of the weight (and bias) gradient, accumulated in place. The same three matmuls as an unfused head, but the
largest buffers are two chunks of logits instead of the whole matrix and its gradient (for GPT-2 at 8 × 1024 tokens:
1.6 GB per copy). On CPU it is also faster than the head plus a cross-entropy (bench/README.md). Any other head (peft's LoRA `Linear`, a hooked or quantised layer) is run per chunk under activation
checkpointing: same memory bound, one extra head forward.

Host reads. On an accelerator, a tensor value read by Python (`.tolist()`, `int(t)`, `nonzero`) waits for the device
to finish everything queued and breaks compiled graphs. So the labelled rows are gathered out (a data-dependent
shape) only when the labels live on the CPU, where that costs nothing; on a GPU ignored rows are computed and masked.
Out-of-range labels get a clear `ValueError` when the labels are on the CPU, or anywhere with `LMBLOCKS_CHECK_LABELS=1`;
on a GPU without it they still never pass silently: the gather into the log-probabilities fails with a device-side
index assertion, as `F.cross_entropy` does.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Below this fraction of positions with a label, the labelled rows are gathered first and the rest skipped; above it,
# copying them out costs more than computing the few ignored rows along with the others.
_GATHER_BELOW = 0.5

# Rows per chunk of the fused head loss: about CHUNK_ELEMENTS logits (2**23: 32 MiB in float32), and at least
# MIN_CHUNK_ROWS. Each chunk streams the head's weight three times (logits, hidden gradient, and the read-modify-write
# of the weight gradient), so fewer rows than ~256 turn the matmuls memory-bound: measured on CPU at a 128,256-token
# vocabulary, 65 rows took 1.15x the time of 128 rows.
CHUNK_ELEMENTS = 2**23
MIN_CHUNK_ROWS = 256

# Check label ranges on every device (one device-to-host read per call); set LMBLOCKS_CHECK_LABELS=1 when debugging.
CHECK_LABELS_ON_DEVICE = os.environ.get("LMBLOCKS_CHECK_LABELS", "") not in ("", "0")


def _on_host(t: torch.Tensor) -> bool:
    """Whether reading `t`'s values from Python is free (no device sync)."""
    return t.device.type == "cpu"


def _check_label_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raises a clear error for labels outside [0, vocab_size) that are not `ignore_index`. Reads the labels only
    where that is free (CPU tensors) or asked for (`CHECK_LABELS_ON_DEVICE`); see the module docstring."""
    if targets.numel() == 0 or torch.compiler.is_compiling():
        return
    if not _on_host(targets) and not CHECK_LABELS_ON_DEVICE:
        return
    labelled = targets[targets != ignore_index]
    if labelled.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(labelled)).tolist()  # one read for both ends
    if not 0 <= low <= high < vocab_size:
        raise ValueError(
            f"Labels must be in [0, {vocab_size}) (the vocabulary) or {ignore_index} (ignored); got values from "
            f"{low} to {high}."
        )


def _gather_labelled(labels: torch.Tensor) -> bool:
    """Whether to gather the labelled rows out before computing (a shape that depends on the labels' values): free
    for CPU tensors, a host read elsewhere and a graph break under `torch.compile`."""
    return _on_host(labels) and not torch.compiler.is_compiling()


class _CrossEntropySum(torch.autograd.Function):
    """Σ over labelled rows of -log softmax(logits)[label], in float32; the gradient is computed in place from the
    saved log-probabilities, so backward runs once (a second backward, e.g. `retain_graph=True`, raises autograd's
    'modified by an inplace operation' error instead of returning a wrong gradient)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        labelled = labels != ignore_index
        _check_label_range(labels, logits.shape[1], ignore_index)
        rows = labelled.nonzero().squeeze(1) if _gather_labelled(labels) else None
        gather = rows is not None and rows.numel() < _GATHER_BELOW * labels.numel()
        if gather:
            logits, labels = logits.index_select(0, rows), labels.index_select(0, rows)
        else:
            rows = labels.new_empty(0)
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        targets = labels.masked_fill(labels == ignore_index, 0).unsqueeze(1)
        picked = log_probs.gather(1, targets).squeeze(1)
        if not gather:
            picked = picked.masked_fill(~labelled, 0.0)
        ctx.save_for_backward(log_probs, targets, rows, labelled)
        ctx.gather, ctx.input_shape, ctx.input_dtype = gather, (labelled.numel(), log_probs.shape[1]), logits.dtype
        return -picked.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        log_probs, targets, rows, labelled = ctx.saved_tensors
        grad = log_probs.exp_()  # softmax, in the buffer of the log-probabilities
        grad.scatter_add_(1, targets, torch.full_like(targets, -1.0, dtype=grad.dtype))  # - one-hot
        if ctx.gather:
            grad.mul_(grad_loss)
            full = grad.new_zeros(ctx.input_shape, dtype=ctx.input_dtype)
            return full.index_copy_(0, rows, grad.to(ctx.input_dtype)), None, None
        grad.mul_(labelled.unsqueeze(1) * grad_loss)  # ignored rows get no gradient
        return grad.to(ctx.input_dtype), None, None


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum of the cross-entropy of `logits` (N, V) against `labels` (N,) over the rows whose label is not
    `ignore_index`, as a float32 scalar. Under `torch.compile` it is plain `F.cross_entropy`, which the compiler fuses
    itself (and whose shapes do not depend on the labels' values)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy_sum takes logits (N, V) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    if torch.compiler.is_compiling():
        return nn.functional.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return _CrossEntropySum.apply(logits, labels, ignore_index)


def _divide(loss: torch.Tensor, labels: torch.Tensor, num_items_in_batch, ignore_index: int) -> torch.Tensor:
    """Mean over the labelled rows, or sum ÷ `num_items_in_batch` when given (Trainer's gradient-accumulation
    contract: it passes the labelled-token count of the whole accumulated batch)."""
    if num_items_in_batch is None:
        return loss / (labels != ignore_index).sum()  # 0 / 0 = nan when nothing is labelled, as F.cross_entropy
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def fixed_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    **kwargs,
) -> torch.Tensor:
    """Mean cross-entropy over the labelled rows, or the sum divided by `num_items_in_batch` when given (Trainer
    passes the labelled-token count of the whole accumulated batch, which makes gradient accumulation exact) —
    transformers' `fixed_cross_entropy`."""
    return _divide(cross_entropy_sum(logits, labels, ignore_index), labels, num_items_in_batch, ignore_index)


def _shift(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Next-token targets: position t predicts labels[t + 1]; the last position predicts nothing."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Next-token loss: position t predicts labels[t + 1] (pass `shift_labels` when already shifted, e.g. under
    sequence parallelism). transformers' `ForCausalLMLoss` with the cross-entropy above."""
    if shift_labels is None:
        shift_labels = _shift(labels, ignore_index)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return fixed_cross_entropy(logits.reshape(-1, vocab_size), shift_labels, num_items_in_batch, ignore_index)


def masked_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    **kwargs,
) -> torch.Tensor:
    """Masked-LM loss: each labelled position predicts its own label. transformers' `ForMaskedLMLoss` with the
    cross-entropy above."""
    labels = labels.reshape(-1).to(logits.device)
    return fixed_cross_entropy(logits.reshape(-1, vocab_size), labels, num_items_in_batch, ignore_index)


# ----------------------------------------------------------------------------------------------------------------
# The LM head fused with the loss, in chunks of tokens.


class _LinearCrossEntropySum(torch.autograd.Function):
    """Σ over rows of the cross-entropy of `hidden @ weight.T + bias` against `targets`, chunk by chunk. Forward
    computes the gradients too (the softmax is at hand; recomputing it in backward would cost a fourth matmul) and
    backward only scales them, so it runs once. Rows where `labelled` is False (when given) contribute nothing.

    The logits of a chunk are upcast to float32 before the softmax (as transformers' losses do); the gradient goes
    back to the matmul dtype for the two gradient matmuls, whose products are summed over chunks in float32. Two
    chunk-sized float32 buffers (logits, log-probabilities → gradient) are allocated once and reused: a fresh
    allocation per chunk would page-fault its way through tens of MB each time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, labelled, chunk_rows, needs):
        need_hidden, need_weight, need_bias = needs
        n, vocab = hidden.shape[0], weight.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        rows = min(chunk_rows, n)
        logits_buf = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
        log_probs_buf = torch.empty_like(logits_buf)
        # float32 weights, no autocast: the matmuls write straight into the buffers.
        direct = weight.dtype == torch.float32 and hidden.dtype == torch.float32 and not torch.is_autocast_enabled(
            hidden.device.type)
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            h, y = hidden[start:end], targets[start:end].unsqueeze(1)  # (n_c, C), (n_c, 1)
            logits, log_probs = logits_buf[: end - start], log_probs_buf[: end - start]  # (n_c, V)
            if direct and bias is None:
                torch.mm(h, weight.t(), out=logits)
            elif direct:
                torch.addmm(bias, h, weight.t(), out=logits)
            else:
                low = nn.functional.linear(h, weight, bias)  # the weights' dtype (or autocast's)
                logits.copy_(low)
            torch.log_softmax(logits, dim=1, out=log_probs)
            row_loss = log_probs.gather(1, y)
            if labelled is not None:
                row_loss = row_loss * labelled[start:end].unsqueeze(1)
            loss -= row_loss.sum()
            if not any(needs):
                continue
            grad = log_probs.exp_()  # softmax, in place
            grad.scatter_add_(1, y, torch.full_like(y, -1.0, dtype=grad.dtype))  # - one-hot
            if labelled is not None:
                grad.mul_(labelled[start:end].unsqueeze(1))  # ignored rows get no gradient
            if need_bias:
                grad_bias += grad.sum(0)
            if not direct:
                grad = grad.to(low.dtype)
            if need_hidden:
                if direct:
                    torch.mm(grad, weight, out=grad_hidden[start:end])
                else:
                    grad_hidden[start:end] = torch.mm(grad, weight)
            if need_weight:
                if direct:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += torch.mm(grad.t(), h).float()
        ctx.grads = grad_hidden, grad_weight, grad_bias
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(grad_loss).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _is_plain_linear(head: nn.Module) -> bool:
    """A bare `nn.Linear` whose forward is `F.linear`: no subclass (quantised layers), no hooks, no forward replaced
    on the instance (accelerate's device hooks), plain tensors as weights (not DTensor shards)."""
    return (
        type(head) is nn.Linear
        and not head._forward_hooks
        and not head._forward_pre_hooks
        and "forward" not in head.__dict__
        and type(head.weight.data) is torch.Tensor
    )


def _generic_head_loss_sum(hidden, head, targets, chunk_rows, vocab_size, ignore_index):
    """Any head module, per chunk, under activation checkpointing when gradients are needed: the chunk's logits are
    freed after its forward and recomputed in its backward (RNG state restored, so dropout in a LoRA layer is the
    same both times)."""

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if logits.shape[-1] != vocab_size:
            raise ValueError(f"The head maps to {logits.shape[-1]} outputs, but vocab_size is {vocab_size}.")
        # A head placed on another device (accelerate's device_map hooks move `h`) gets the labels there too.
        y = y.to(logits.device)
        return nn.functional.cross_entropy(logits.float(), y, ignore_index=ignore_index, reduction="sum")

    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        h, y = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        chunk = checkpoint(chunk_loss, h, y, use_reentrant=False) if grad else chunk_loss(h, y)
        loss = loss + chunk.to(loss.device)
    return loss


def linear_cross_entropy_sum(
    hidden_states: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    vocab_size: int,
    ignore_index: int = -100,
    transform: nn.Module | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Σ over labelled rows of cross-entropy(head(transform(hidden_states)), labels), float32, without the full
    logits matrix: `hidden_states` (N, C), `labels` (N,). `transform` (optional, e.g. BERT's dense → GELU →
    LayerNorm) runs on the rows that are computed (only the labelled ones when the labels are on the CPU).
    `chunk_size`: rows per chunk (default: about `CHUNK_ELEMENTS` logits, at least `MIN_CHUNK_ROWS`)."""
    if hidden_states.dim() != 2 or labels.shape != hidden_states.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy_sum takes hidden states (N, C) and labels (N,), got "
            f"{tuple(hidden_states.shape)} and {tuple(labels.shape)}."
        )
    labels = labels.to(hidden_states.device)
    _check_label_range(labels, vocab_size, ignore_index)
    labelled = None
    if not _gather_labelled(labels):  # computed and masked: no host read
        labelled = labels != ignore_index
    elif bool((labels == ignore_index).any()):  # CPU: the ignored rows never reach the transform or the head
        rows = (labels != ignore_index).nonzero().squeeze(1)
        hidden_states, labels = hidden_states.index_select(0, rows), labels.index_select(0, rows)
    if transform is not None:
        hidden_states = transform(hidden_states)
    chunk_rows = chunk_size or max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size)
    if torch.compiler.is_compiling():  # the compiler fuses the plain path itself (see cross_entropy_sum)
        logits = head(hidden_states).float()
        return nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if not _is_plain_linear(head):
        return _generic_head_loss_sum(hidden_states, head, labels, chunk_rows, vocab_size, ignore_index)
    if head.out_features != vocab_size:
        raise ValueError(f"The head maps to {head.out_features} outputs, but vocab_size is {vocab_size}.")
    targets = labels if labelled is None else labels.masked_fill(~labelled, 0)
    grad = torch.is_grad_enabled()
    needs = (grad and hidden_states.requires_grad, grad and head.weight.requires_grad,
             grad and head.bias is not None and head.bias.requires_grad)
    return _LinearCrossEntropySum.apply(hidden_states, head.weight, head.bias, targets, labelled, chunk_rows, needs)


def trains_without_logits(model: nn.Module, labels: torch.Tensor | None, default_loss) -> bool:
    """The heads' rule for fusing the LM head with its loss: the model is in training mode, has `labels`, and uses
    its default loss `default_loss` (a `model.loss_function = f` set by the user receives the logits as before).
    Then `logits` is None in the output; in eval mode (`generate`, `Trainer.evaluate`, metrics) nothing changes."""
    return labels is not None and model.training and model.loss_function is default_loss


def causal_lm_head_loss(
    hidden_states: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """`causal_lm_loss(head(hidden_states), labels, ...)` without the logits matrix: same value and gradients (for
    the hidden states and the head's parameters) to float32 rounding, memory of one chunk of logits.

    `hidden_states` (B, T, C) or (T, C), `labels` of shape (B, T) / (T,), shifted inside (position t predicts
    labels[t + 1]; pass `shift_labels` when already shifted). `head`: the module mapping (..., C) -> (..., vocab),
    an `nn.Linear` (tied or not, with or without bias) on the fast path, anything else (peft's LoRA layer)
    recomputed per chunk. Mean over labelled tokens, or sum ÷ `num_items_in_batch` when given (Trainer)."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_head_loss needs `labels` or `shift_labels`.")
        shift_labels = _shift(labels, ignore_index)
    if shift_labels.shape != hidden_states.shape[:-1]:
        raise ValueError(
            f"Labels of shape {tuple(shift_labels.shape)} do not match hidden states of shape "
            f"{tuple(hidden_states.shape)} (expected labels of shape {tuple(hidden_states.shape[:-1])})."
        )
    flat_labels = shift_labels.reshape(-1).to(hidden_states.device)
    loss = linear_cross_entropy_sum(hidden_states.reshape(-1, hidden_states.shape[-1]), head, flat_labels, vocab_size,
                                    ignore_index, chunk_size=chunk_size)
    return _divide(loss, flat_labels, num_items_in_batch, ignore_index)


def masked_lm_head_loss(
    hidden_states: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    transform: nn.Module | None = None,
    chunk_size: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """`masked_lm_loss(head(transform(hidden_states)), labels, ...)` without the logits matrix, each labelled
    position predicting its own label. For BERT pass the decoder as `head` and the prediction-head transform as
    `transform`: with labels on the CPU both then run on the labelled rows only (~15 % of a pretraining batch)."""
    if labels.shape != hidden_states.shape[:-1]:
        raise ValueError(
            f"Labels of shape {tuple(labels.shape)} do not match hidden states of shape "
            f"{tuple(hidden_states.shape)} (expected labels of shape {tuple(hidden_states.shape[:-1])})."
        )
    flat_labels = labels.reshape(-1).to(hidden_states.device)
    loss = linear_cross_entropy_sum(hidden_states.reshape(-1, hidden_states.shape[-1]), head, flat_labels, vocab_size,
                                    ignore_index, transform=transform, chunk_size=chunk_size)
    return _divide(loss, flat_labels, num_items_in_batch, ignore_index)


__all__ = [
    "cross_entropy_sum",
    "fixed_cross_entropy",
    "causal_lm_loss",
    "masked_lm_loss",
    "linear_cross_entropy_sum",
    "trains_without_logits",
    "causal_lm_head_loss",
    "masked_lm_head_loss",
]
