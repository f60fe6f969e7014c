"""Held-out measures that compare language models across tokenizers.

Perplexity is per token of a model's own vocabulary, so a model with a bigger vocabulary (fewer, longer tokens) is
not comparable with one whose tokens are short. Bits per byte is: the held-out loss summed over all tokens (in
nats), converted to bits, divided by the UTF-8 bytes of the text. It measures how well the model compresses the
text, whatever its tokenizer.
"""

from __future__ import annotations

import math
import re

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


# --- measures the main job reports, each with what chance would score --------------------------------------------

def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % (z = 1.96) Wilson score interval of a proportion: sound at small n and near 0 or 1, where the
    normal approximation is not."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def word_share(texts: list[str], vocabulary: set[str]) -> tuple[int, int]:
    """(words found in `vocabulary`, words) over the whitespace-separated words of `texts`, compared lower-cased
    with the punctuation around them stripped; tokens that are only punctuation are not words and not counted."""
    found = total = 0
    for text in texts:
        for raw in text.split():
            word = _WORD_EDGES.sub("", raw.lower())
            if word:
                total += 1
                found += word in vocabulary
    return found, total


def corpus_vocabulary(texts: list[str]) -> set[str]:
    """Every word of `texts`, as `word_share` compares them."""
    return {w for text in texts for w in (_WORD_EDGES.sub("", raw.lower()) for raw in text.split()) if w}


_WORD_EDGES = re.compile(r"^[\W_]+|[\W_]+$")


@torch.no_grad()
def masked_token_accuracy(model, tokenizer, text: str, block_size: int = 128, mask_fraction: float = 0.15,
                          seed: int = 0) -> dict[str, float]:
    """A masked LM on held-out `text`: blocks of `block_size` tokens, `mask_fraction` of the ordinary tokens in each
    replaced by the mask token (the same positions for every model, from `seed`); the share predicted exactly.
    `majority_accuracy` is what always answering the most frequent masked token would score, the chance level."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    body = block_size - 2  # [CLS] ... [SEP]
    blocks = [ids[i:i + body] for i in range(0, len(ids) - body + 1, body)] or [ids]
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    correct = total = 0
    targets: list[int] = []
    model.eval()
    for block in blocks:
        input_ids = torch.tensor([[tokenizer.cls_token_id, *block, tokenizer.sep_token_id]])
        n_mask = max(1, round(len(block) * mask_fraction))
        positions = torch.randperm(len(block), generator=generator)[:n_mask] + 1
        labels = input_ids[0, positions].clone()
        input_ids[0, positions] = tokenizer.mask_token_id
        logits = model(input_ids=input_ids.to(device)).logits[0, positions.to(device)]
        correct += int((logits.argmax(-1).cpu() == labels).sum())
        total += len(labels)
        targets += labels.tolist()
    majority = max(targets.count(t) for t in set(targets)) if targets else 0
    return {"accuracy": correct / max(total, 1), "correct": correct, "masked": total,
            "majority_accuracy": majority / max(total, 1)}


@torch.no_grad()
def answer_log_likelihoods(model, tokenizer, prompt: str, answers: list[str]) -> list[tuple[float, int]]:
    """(log p(answer | prompt) summed over the answer's tokens, its token count) for each candidate answer. The
    tokens all candidates share (the prompt's) run once; their KV cache is copied to every candidate, whose own
    tokens then run as one padded batch. Where an answer's first characters merge with the prompt's last token, that
    token counts as the answer's: the comparison between candidates stays on the same footing."""
    sequences = [tokenizer(prompt + answer, add_special_tokens=False, verbose=False)["input_ids"]
                 for answer in answers]
    shared = len(tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])
    for ids in sequences:
        shared = next((i for i, (a, b) in enumerate(zip(ids[:shared], sequences[0][:shared])) if a != b),
                      min(shared, len(ids) - 1))
    shared = max(shared, 1)
    answer_ids = [ids[shared:] for ids in sequences]
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([sequences[0][:shared]], device=device), use_cache=True)
    first = out.logits[0, -1].float().log_softmax(-1).cpu()
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(answers))
    width = max(len(a) for a in answer_ids)
    input_ids = torch.zeros(len(answers), width, dtype=torch.long)
    mask = torch.zeros(len(answers), shared + width, dtype=torch.long)
    mask[:, :shared] = 1
    for i, ids in enumerate(answer_ids):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, shared:shared + len(ids)] = 1
    log_probs = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
                      use_cache=False).logits.float().log_softmax(-1).cpu()
    scores = []
    for i, ids in enumerate(answer_ids):
        total = first[ids[0]].item() + sum(log_probs[i, j - 1, ids[j]].item() for j in range(1, len(ids)))
        scores.append((total, len(ids)))
    return scores
