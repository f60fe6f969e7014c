"""The language-modelling losses: transformers' `ForCausalLMLoss` and `ForMaskedLMLoss`, same signatures and same
values, on a cross-entropy that does less memory traffic.

`F.cross_entropy` over a (tokens × vocab) logits matrix makes four full passes over it: log-softmax forward, the
NLL backward's zero-filled gradient, the log-softmax backward, and the scatter between them. On CPU that was a sixth
of a small LLaMA's training step. `cross_entropy_sum` below keeps the log-probabilities it computes anyway and turns
them into the gradient in place (softmax − one-hot), and computes nothing for ignored positions (-100): 85 % of the
rows of a BERT masked-LM batch, the last position of every causal-LM sequence, padding.
"""

from __future__ import annotations

import torch
from torch import nn

# Below this fraction of positions with a label, the labelled rows are gathered first and the rest skipped; above it,
# copying them out costs more than computing the few ignored rows along with the others.
_GATHER_BELOW = 0.5


class _CrossEntropySum(torch.autograd.Function):
    """Σ over labelled rows of -log softmax(logits)[label], in float32; the gradient is computed in place from the
    saved log-probabilities, so backward runs once (a second backward, e.g. `retain_graph=True`, raises autograd's
    'modified by an inplace operation' error instead of returning a wrong gradient)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        labelled = labels != ignore_index
        rows = labelled.nonzero().squeeze(1)
        gather = rows.numel() < _GATHER_BELOW * labels.numel()
        if gather:
            logits, labels = logits.index_select(0, rows), labels.index_select(0, rows)
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        targets = labels.masked_fill(labels == ignore_index, 0).unsqueeze(1)
        # One host read for both ends of the range (each read is a device sync on a GPU).
        low, high = torch.stack(torch.aminmax(targets)).tolist() if targets.numel() else (0, 0)
        if not 0 <= low <= high < log_probs.shape[1]:
            raise ValueError(
                f"Labels must be in [0, {log_probs.shape[1]}) (the vocabulary) or {ignore_index} (ignored); got "
                f"values from {int(labels.min())} to {int(labels.max())}."
            )
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
    loss = cross_entropy_sum(logits, labels, ignore_index)
    if num_items_in_batch is None:
        return loss / (labels != ignore_index).sum()  # 0 / 0 = nan when nothing is labelled, as F.cross_entropy
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


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
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
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


__all__ = ["cross_entropy_sum", "fixed_cross_entropy", "causal_lm_loss", "masked_lm_loss"]
