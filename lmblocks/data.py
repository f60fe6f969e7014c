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

import codecs
import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets
    import torch


class CorpusError(ValueError):
    """A corpus that cannot be trained on: missing files, an empty text column, too little text for one block."""


# --- reading text files: one policy for every script ---------------------------------------------------------------
# Text is UTF-8 unless the user names another encoding (`--encoding latin-1`). A file that is not valid UTF-8 is
# refused with the file, line and byte where decoding failed: replacing the bytes would train on '\ufffd' tokens
# without a word, and guessing an encoding would be wrong as often as right.

_CHUNK = 1 << 20


def check_encoding(encoding: str | None) -> str:
    """The codec name to read text with: UTF-8 by default, or `encoding` when Python knows it (else `CorpusError`)."""
    if encoding is None:
        return "utf-8"
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise CorpusError(f"--encoding {encoding}: Python knows no such text encoding (try utf-8, latin-1, cp1252, "
                          "utf-16).") from None


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """`paths` with globs expanded (sorted), each checked to be an existing file: a missing file, a glob that matches
    nothing and a directory are `CorpusError`s naming them."""
    if not paths:
        raise CorpusError("No corpus files given.")
    files: list[str] = []
    missing: list[str] = []
    for path in map(os.fspath, paths):
        literal = Path(path).exists() or not glob.has_magic(path)
        matches = [path] if literal else sorted(glob.glob(path, recursive=True))
        if not matches:
            missing.append(f"{path} (a glob that matches no file)")
        files.extend(matches)
    directories = [p for p in files if Path(p).is_dir()]
    if directories:
        raise CorpusError(f"{', '.join(directories)} {'is a directory' if len(directories) == 1 else 'are directories'}"
                          f", not a text file; give the files in it, e.g. {os.path.join(directories[0], '*.txt')!r} "
                          "(quoted, the script expands the glob).")
    missing += [p for p in files if not Path(p).is_file()]
    if missing:
        raise CorpusError(f"Corpus file(s) not found: {', '.join(missing)}")
    return files


def read_text_file(path: str | os.PathLike, encoding: str | None = None) -> str:
    """The text of one file, decoded strictly (UTF-8 unless `encoding` is given); see `check_encoding`."""
    codec = check_encoding(encoding)
    data = Path(path).read_bytes()
    try:
        return data.decode(codec)
    except UnicodeDecodeError as error:
        raise _decode_error(path, offset=0, lines_before=0, error=error, codec=codec) from None


def iter_text_lines(paths: Sequence[str | os.PathLike], encoding: str | None = None) -> Iterator[str]:
    """Every line of every file, decoded strictly as it is read (for corpora too large to hold in memory)."""
    codec = check_encoding(encoding)
    for path in paths:
        decoder = codecs.getincrementaldecoder(codec)()
        with open(path, "rb") as handle:
            offset = 0
            line_number = 0
            partial = ""  # the end of a chunk that is not the end of a line
            while chunk := handle.read(_CHUNK):
                try:
                    text = partial + decoder.decode(chunk)
                except UnicodeDecodeError as error:
                    # The decoder's bytes start with what it held back from the last chunk (a split character).
                    raise _decode_error(path, offset + len(chunk) - len(error.object), line_number, error,
                                        codec) from None
                line_number += chunk.count(b"\n")
                offset += len(chunk)
                lines = text.splitlines(keepends=True)
                partial = lines.pop() if lines and lines[-1].splitlines()[0] == lines[-1] else ""
                yield from lines
            try:
                partial += decoder.decode(b"", final=True)
            except UnicodeDecodeError as error:
                raise _decode_error(path, offset - len(error.object), line_number, error, codec) from None
            if partial:
                yield partial


def _decode_error(path, offset: int, lines_before: int, error: UnicodeDecodeError, codec: str) -> CorpusError:
    """The one line that says where `path` stops being `codec` text: line, byte offset and the bytes there.
    `error.object` holds the bytes decoded, which start at byte `offset` of the file and line `lines_before` + 1."""
    data = error.object
    line = lines_before + data.count(b"\n", 0, error.start) + 1
    bad = data[error.start:error.end]
    way_out = "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or name its encoding with --encoding " \
        "(e.g. --encoding latin-1)" if codec == "utf-8" else "check --encoding"
    name = codec.upper() if codec.startswith("utf") else codec
    return CorpusError(f"{path} is not {name} text: line {line}, byte offset {offset + error.start} ({bad!r} cannot "
                       f"be decoded); {way_out}.")


def check_text_files(paths: Sequence[str | os.PathLike], encoding: str | None = None) -> list[str]:
    """Expand and check `paths` (see `expand_paths`), then decode each file through once, so that a file in the wrong
    encoding is refused before any work, with its line and byte. Returns the files."""
    files = expand_paths(paths)
    for _ in iter_text_lines(files, encoding):
        pass
    return files


def read_text_files(paths: Sequence[str | os.PathLike], encoding: str | None = None) -> list[str]:
    """Read each file as one document, UTF-8 unless `encoding` is given; a file that does not decode is refused
    with its line and byte. Raises `CorpusError` naming every missing or empty file, and a directory as such."""
    files = expand_paths(paths)
    texts = [read_text_file(p, encoding) for p in files]
    empty = [str(p) for p, text in zip(files, texts) if not text.strip()]
    if empty:
        raise CorpusError(f"Corpus file(s) are empty: {', '.join(empty)}")
    return texts


DATA_FILE_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv"}


def check_data_file(path: str | os.PathLike, encoding: str | None = None) -> str:
    """A csv / json / jsonl file of rows, checked before `datasets` reads it: it exists, is a file, decodes (UTF-8
    unless `encoding`), and, for JSON, parses, so a bad file is one `CorpusError` naming its line rather than a
    traceback from inside `datasets`. Returns the `datasets` builder name ("json" or "csv")."""
    path = Path(path)
    if path.is_dir():
        raise CorpusError(f"{path} is a directory, not a data file (.csv, .json or .jsonl).")
    builder = DATA_FILE_BUILDERS.get(path.suffix.lstrip(".").lower())
    if builder is None:
        raise CorpusError(f"{path}: data files must be .csv, .json or .jsonl.")
    if not path.is_file():
        raise CorpusError(f"Data file not found: {path}")
    text = read_text_file(path, encoding)
    if builder == "json":
        try:
            json.loads(text)  # one JSON document (a list of rows, or datasets' {"data": [...]})
        except json.JSONDecodeError:
            for number, line in enumerate(text.splitlines(), 1):  # or JSON lines
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as error:
                        raise CorpusError(f"{path} line {number} is not valid JSON ({error.msg}, column "
                                          f"{error.colno}): {line.strip()[:60]!r}") from None
    return builder


def load_data_files(builder: str, files: dict[str, str], **options):
    """`datasets.load_dataset(builder, data_files=files)` (a `DatasetDict` with a split per file), its errors turned
    into one `CorpusError` naming the files and what `datasets` found wrong (for csv, pandas names the line)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    try:
        return datasets.load_dataset(builder, data_files=files, **options)
    except DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__ or error
        reason = " ".join(str(cause).split()) or type(cause).__name__
        raise CorpusError(f"Cannot read {' and '.join(files.values())} as {builder}: {reason}") from None


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
    encoding: str | None = None,
) -> list[str]:
    """One of: text files (UTF-8 unless `encoding` is given), or a `datasets` dataset. Returns the documents."""
    if bool(files) == bool(dataset_name):
        raise CorpusError("Give exactly one corpus: text files (--train_files) or a dataset (--dataset_name).")
    if files:
        return read_text_files(files, encoding)
    if encoding is not None:
        raise CorpusError("--encoding applies to text files (--train_files); a dataset's text is decoded already.")
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


def split_into_blocks(stream: Sequence[int], block_size: int) -> "torch.Tensor":
    """(n_blocks, block_size); the tail shorter than one block is dropped."""
    import torch

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

    def to_dataset(tensor: "torch.Tensor") -> "datasets.Dataset":
        ids = tensor.tolist()
        return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})

    return to_dataset(train_blocks), (to_dataset(eval_blocks) if n_eval else None)


__all__ = [
    "CorpusError",
    "check_encoding",
    "expand_paths",
    "read_text_file",
    "iter_text_lines",
    "check_text_files",
    "read_text_files",
    "check_data_file",
    "load_data_files",
    "load_text_dataset",
    "check_hub_reachable",
    "load_corpus",
    "tokenize_documents",
    "split_into_blocks",
    "pack_causal_lm",
]
