"""Held-out measures that compare language models across tokenizers.

Perplexity is per token of a model's own vocabulary, so a model with a bigger vocabulary (fewer, longer tokens) is
not comparable with one whose tokens are short. Bits per byte is: the held-out loss summed over all tokens (in
nats), converted to bits, divided by the UTF-8 bytes of the text. It measures how well the model compresses the
text, whatever its tokenizer.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def bits_per_byte(model, tokenizer, text: str, window: int = 256, batch_size: int = 4,
                  show_progress: bool = False) -> dict[str, float]:
    """Bits per byte of `text` under a causal LM: `-Σ log2 p(token | previous tokens) / len(text.encode())`.

    The text is tokenized once, without special tokens, and scored in windows of `window` tokens that overlap by
    half, each token scored once with at least half a window of context (the first window scores all of its
    tokens but the first, which has no context: its bytes are left out of the count). Returns `bits_per_byte`,
    `nats_per_token`, `tokens` and `bytes`."""
    from tqdm.auto import tqdm

    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}.")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long texts are windowed below
    if len(ids) < 2:
        raise ValueError(f"The text is {len(ids)} token(s) long; bits per byte needs at least two.")
    model.eval()
    device = next(model.parameters()).device
    stride = window // 2
    # (start, first scored position) per window: every token from position 1 on is scored exactly once.
    spans = [(0, 1)] + [(start, start + window - stride) for start in range(stride, len(ids) - window + stride, stride)
                        if start + window - stride < len(ids)]
    total_nats, n_scored = 0.0, 0
    for first in tqdm(range(0, len(spans), batch_size), desc="bits per byte", disable=not show_progress):
        batch = spans[first:first + batch_size]
        rows = [ids[start:start + window] for start, _ in batch]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), 0, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row)
            attention_mask[i, :len(row)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_log_probs = log_probs.gather(-1, input_ids[:, 1:, None].to(device))[..., 0].cpu()
        for i, (start, scored_from) in enumerate(batch):
            end = start + len(rows[i])
            # Position p (absolute) is predicted at row index p - start - 1.
            lo = max(scored_from, start + 1) - start - 1
            hi = end - start - 1
            total_nats -= token_log_probs[i, lo:hi].sum().item()
            n_scored += hi - lo
    n_bytes = len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return {"bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1), "nats_per_token": total_nats / n_scored,
            "tokens": n_scored, "bytes": n_bytes}


__all__ = ["bits_per_byte"]
