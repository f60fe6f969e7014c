"""Sentence embeddings from a BERT encoder, the way sentence-transformers computes them, and nearest-passage search.

A sentence-transformers folder (all-MiniLM-L6-v2, for instance) is a BERT checkpoint plus a few small files that
say what to do with its hidden states: `1_Pooling/config.json` names the pooling (mean over the real tokens,
the [CLS] token, or the maximum), `modules.json` lists a `Normalize` step when embeddings are unit length, and
`sentence_bert_config.json` holds the longest input. `pooling_of` reads those files; `embed` runs any
`AutoModel`-style encoder (lmblocks' `LmbBertModel` or transformers' `BertModel`) and pools; `nearest` ranks
passages by cosine similarity. No sentence-transformers import is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

POOLING_MODES = ("mean", "cls", "max")


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector: `mode` (mean / cls / max), unit-length or not, input length limit."""

    mode: str = "mean"
    normalize: bool = False
    max_length: int = 512


def pooling_of(folder: str | Path) -> Pooling:
    """The pooling a sentence-transformers folder declares; a plain BERT folder gets mean pooling, unnormalised.
    Files written by others are read leniently: missing files fall back to the defaults."""
    folder = Path(folder)
    modules = _read_json(folder / "modules.json") or []
    pooling_dir = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Pooling")), "1_Pooling")
    config = _read_json(folder / pooling_dir / "config.json") or {}
    modes = [mode for mode, key in (("mean", "pooling_mode_mean_tokens"), ("cls", "pooling_mode_cls_token"),
                                    ("max", "pooling_mode_max_tokens")) if config.get(key)]
    if len(modes) > 1:
        raise ValueError(f"{folder}: pooling concatenates {modes}; only one pooling mode is supported.")
    if config.get("pooling_mode_mean_sqrt_len_tokens"):
        raise ValueError(f"{folder}: pooling_mode_mean_sqrt_len_tokens is not supported (mean, cls or max are).")
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    max_length = (_read_json(folder / "sentence_bert_config.json") or {}).get("max_seq_length", 512)
    return Pooling(mode=modes[0] if modes else "mean", normalize=normalize, max_length=int(max_length))


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """(B, T, H) token states and a (B, T) mask -> (B, H), ignoring padding."""
    if mode not in POOLING_MODES:
        raise ValueError(f"Unknown pooling mode {mode!r}; choose one of {', '.join(POOLING_MODES)}.")
    mask = attention_mask[..., None].to(hidden_states.dtype)  # (B, T, 1)
    if mode == "cls":
        return hidden_states[:, 0]
    if mode == "max":
        return hidden_states.masked_fill(mask == 0, torch.finfo(hidden_states.dtype).min).amax(1)
    return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], pooling: Pooling = Pooling(), batch_size: int = 32,
          show_progress: bool = False) -> torch.Tensor:
    """One embedding per text, (len(texts), H), in fp32 on CPU. Texts longer than `pooling.max_length` tokens are
    cut there, as sentence-transformers does."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding", disable=not show_progress):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                          max_length=pooling.max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        vectors = pool(hidden, batch["attention_mask"], pooling.mode).float()
        if pooling.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        out.append(vectors.cpu())
    return torch.cat(out) if out else torch.empty(0)


def nearest(queries: torch.Tensor, passages: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Indices (len(queries), k) of the passages most similar to each query by cosine similarity."""
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(passages, dim=-1).T
    return scores.topk(min(k, passages.shape[0]), dim=-1).indices


__all__ = ["Pooling", "pooling_of", "pool", "embed", "nearest"]
