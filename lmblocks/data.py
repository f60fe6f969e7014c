"""Text in, training examples out: what the scripts share for reading a corpus and packing it into blocks.

A corpus is either plain-text files (one document per file) or a `datasets` dataset (one document per row of a text
column). Causal-LM pretraining tokenises every document, joins them with an end-of-text token and cuts the stream
into blocks of `block_size` tokens: no padding, every token is trained on. The last `eval_fraction` of the stream is
held out for perplexity.

Example:
    >>> texts = read_text_files(["book.txt"])                       # doctest: +SKIP
    >>> train, held_out = pack_causal_lm(texts, tokenizer, block_size=128)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


class CorpusError(ValueError):
    """A corpus that cannot be trained on: missing files, an empty text column, too little text for one block."""


def read_text_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Read each file as one document (UTF-8, undecodable bytes replaced). Raises `CorpusError` naming every missing
    or empty file."""
    if not paths:
        raise CorpusError("No corpus files given.")
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise CorpusError(f"Corpus file(s) not found: {', '.join(missing)}")
    texts = [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]
    empty = [str(p) for p, text in zip(paths, texts) if not text.strip()]
    if empty:
        raise CorpusError(f"Corpus file(s) are empty: {', '.join(empty)}")
    return texts


def load_text_dataset(
    name_or_path: str, config_name: str | None = None, split: str = "train", text_column: str = "text"
) -> list[str]:
    """The `text_column` of a `datasets` dataset: a folder written by `Dataset.save_to_disk`, or anything
    `datasets.load_dataset(name_or_path, config_name, split=split)` accepts (a Hub name, a local script or data dir)."""
    import datasets

    path = Path(name_or_path)
    try:
        if path.is_dir() and any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise CorpusError(f"Dataset {name_or_path} has splits {list(dataset)}, not {split!r}.")
                dataset = dataset[split]
        else:
            check_hub_reachable(name_or_path)
            dataset = datasets.load_dataset(name_or_path, config_name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        if isinstance(error, CorpusError):
            raise
        raise CorpusError(f"Could not load dataset {name_or_path!r}: {error}") from error
    if text_column not in dataset.column_names:
        raise CorpusError(
            f"Dataset {name_or_path!r} has no column {text_column!r} (columns: {dataset.column_names}); "
            f"pick one with --text_column."
        )
    texts = [t for t in dataset[text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise CorpusError(f"Column {text_column!r} of dataset {name_or_path!r} holds no text.")
    return texts


def check_hub_reachable(name: str, timeout: float = 5.0) -> None:
    """Before `datasets.load_dataset(name)` asks the Hub for a dataset that is not on this machine: fail at once, with
    the way out, when the Hub cannot be reached (datasets itself retries for half a minute, then raises a
    traceback). Offline mode (`HF_HUB_OFFLINE=1` / `HF_DATASETS_OFFLINE=1`, cached datasets) is left alone."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if Path(name).exists() or constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as error:
        raise CorpusError(
            f"Dataset {name!r} is not a local folder and the Hub ({constants.ENDPOINT}) cannot be reached ({error}). "
            "Give a folder written by Dataset.save_to_disk or text files, or set HF_DATASETS_OFFLINE=1 to use a "
            "copy in the datasets cache."
        ) from error


def load_corpus(
    files: Sequence[str] | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    dataset_split: str = "train",
    text_column: str = "text",
) -> list[str]:
    """One of: text files, or a `datasets` dataset. Returns the documents."""
    if bool(files) == bool(dataset_name):
        raise CorpusError("Give exactly one corpus: text files (--train_files) or a dataset (--dataset_name).")
    if files:
        return read_text_files(files)
    return load_text_dataset(dataset_name, dataset_config_name, dataset_split, text_column)


def tokenize_documents(texts: Sequence[str], tokenizer, separator_id: int | None) -> list[int]:
    """Token ids of all documents, joined by `separator_id` (usually end-of-text) when one is given."""
    stream: list[int] = []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for ids in encoded:
        stream.extend(ids)
        if separator_id is not None:
            stream.append(separator_id)
    return stream


def split_into_blocks(stream: Sequence[int], block_size: int) -> torch.Tensor:
    """(n_blocks, block_size); the tail shorter than one block is dropped."""
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def pack_causal_lm(
    texts: Sequence[str], tokenizer, block_size: int, eval_fraction: float = 0.05
) -> tuple["datasets.Dataset", "datasets.Dataset | None"]:  # noqa: F821
    """Train and held-out datasets of packed blocks, columns `input_ids` and `labels` (the same ids: the model
    shifts them). The held-out part is the end of the token stream, at least one block when `eval_fraction > 0`.

    Raises `CorpusError` when the corpus holds fewer tokens than one training block (plus one held-out block)."""
    import datasets

    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream = tokenize_documents(texts, tokenizer, separator)
    blocks = split_into_blocks(stream, block_size)
    n_eval = 0
    if eval_fraction > 0:
        n_eval = max(1, int(round(len(blocks) * eval_fraction)))
    if len(blocks) - n_eval < 1:
        need = (1 + n_eval) * block_size if n_eval else block_size
        raise CorpusError(
            f"The corpus has {len(stream)} tokens, fewer than the {need} needed for one training block"
            f"{' and one held-out block' if n_eval else ''} of block_size={block_size}. Give more text or a smaller "
            f"--block_size."
        )
    train_blocks, eval_blocks = blocks[: len(blocks) - n_eval], blocks[len(blocks) - n_eval :]

    def to_dataset(tensor: torch.Tensor) -> datasets.Dataset:
        ids = tensor.tolist()
        return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})

    return to_dataset(train_blocks), (to_dataset(eval_blocks) if n_eval else None)


__all__ = [
    "CorpusError",
    "read_text_files",
    "load_text_dataset",
    "check_hub_reachable",
    "load_corpus",
    "tokenize_documents",
    "split_into_blocks",
    "pack_causal_lm",
]
