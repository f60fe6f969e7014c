"""Train the tokenizers of lmblocks' three families on the Rust ``tokenizers`` library.

``train_tokenizer(corpus, kind)`` returns the family's transformers tokenizer, configured exactly as that class
rebuilds itself when it loads (transformers 5 tokenizer classes build their own normaliser, pre-tokeniser and decoder
and take only the vocabulary, merges and post-processor from ``tokenizer.json``), so the tokenizer you train is the
tokenizer you load:

=====  ==============================================================  =====================  ==================
kind   model                                                           special tokens         loads as
=====  ==============================================================  =====================  ==================
gpt2   byte-level BPE, GPT-2's pre-tokenisation regex; lossless        ``<|endoftext|>``      GPT2TokenizerFast
llama  BPE on ``▁``-marked words (SentencePiece style), byte fallback  ``<unk> <s> </s>``     LlamaTokenizerFast
bert   WordPiece (``##``), BERT normalisation, ``[CLS] A [SEP] B``     ``[PAD] [UNK] [CLS]``  BertTokenizerFast
                                                                       ``[SEP] [MASK]``
=====  ==============================================================  =====================  ==================

The corpus is streamed: files are read by Rust, and iterators and ``datasets`` datasets are consumed once, so a corpus
larger than memory trains in bounded memory (only the word counts are held).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE, WordPiece
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

from .tokenization_classes import BertTokenizer, GPT2Tokenizer, save_vocabulary_files
from .tokenization_wordpiece import CRITERIA, count_words, train_wordpiece


Kind = Literal["gpt2", "llama", "bert"]  # the keys of TOKENIZER_KINDS (defined after the trainers)
# A path or glob, a list of them, an iterable of texts, or a `datasets.Dataset` / `datasets.IterableDataset`.
Corpus = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Iterable[str], Any]

GPT2_SPECIAL_TOKENS = ("<|endoftext|>",)
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
LLAMA_BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))

# Chosen by bench/bench_tokenizer_quality.py (README, "Tokenizers").
DEFAULT_WORDPIECE_CRITERION = "frequency"
# Rows per batch when reading a `datasets` dataset.
_DATASET_BATCH = 1000


# ----------------------------------------------------------------------------------------------------------------------
# Corpus


@dataclass
class _Corpus:
    """A resolved corpus: either files (read by Rust) or a one-pass stream of texts."""

    files: list[str] | None = None
    texts: Iterable[str] | None = None
    length: int | None = None  # number of texts, for the progress bar, when known
    saw_text: bool = False  # set while streaming `texts`: the corpus had some non-blank text

    def iter_texts(self) -> Iterator[str]:
        """Yield the corpus as strings (files as chunks of whole lines), checking types and noting non-blank text."""
        if self.files is not None:
            for path in self.files:
                with open(path, encoding="utf-8") as handle:
                    try:
                        while lines := handle.readlines(1 << 16):
                            yield "".join(lines)
                    except UnicodeDecodeError as err:
                        raise ValueError(f"corpus file {path!r} is not UTF-8 text: {err}") from None
            return
        for text in self.texts:
            if not isinstance(text, str):
                raise TypeError(f"corpus texts must be str, got {type(text).__name__}: {text!r:.80}")
            if not self.saw_text and text and not text.isspace():
                self.saw_text = True
            yield text


def _resolve_corpus(corpus: Corpus, text_column: str) -> _Corpus:
    if isinstance(corpus, (str, os.PathLike)):
        return _Corpus(files=_resolve_files([corpus]))
    if isinstance(corpus, (list, tuple)):
        _check_not_texts(corpus)
        return _Corpus(files=_resolve_files(corpus))
    if _is_hf_dataset(corpus):
        return _Corpus(texts=_iter_dataset(corpus, text_column), length=_dataset_length(corpus))
    if isinstance(corpus, Iterable):
        return _Corpus(texts=corpus, length=len(corpus) if hasattr(corpus, "__len__") else None)
    raise TypeError(
        f"corpus must be a path, a glob, a list of paths, an iterable of str or a datasets Dataset, "
        f"got {type(corpus).__name__}"
    )


def _resolve_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    if not paths:
        raise ValueError("corpus is empty: no files given")
    files: list[str] = []
    for path in map(os.fspath, paths):
        if not isinstance(path, str):
            raise TypeError(f"corpus paths must be str or os.PathLike, got {type(path).__name__}")
        if glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise FileNotFoundError(f"corpus glob {path!r} matches no file")
            files.extend(matches)
        else:
            files.append(path)
    if not any(map(_check_file, files)):
        raise ValueError(f"corpus is empty: {_describe(files)} contain no text")
    return files


def _check_not_texts(paths: Sequence[str | os.PathLike]) -> None:
    """A list or tuple names files; if none of its strings is a file or a matching glob, it is a list of texts."""
    if not paths or not all(isinstance(path, str) for path in paths):
        return  # empty (reported as such), or a Path among them: files meant, a missing one is reported by name
    if any(os.path.exists(path) or (glob.has_magic(path) and glob.glob(path, recursive=True)) for path in paths):
        return
    raise FileNotFoundError(
        f"no string in the corpus {type(paths).__name__} names a file or a glob that matches one ({len(paths)} given, "
        f"first: {_shorten(paths[0])!r}); a list or tuple names files: to train on in-memory texts, pass iter(texts)"
    )


def _shorten(text: str, head: int = 50, tail: int = 40) -> str:
    """``text`` cut in the middle if long, keeping the end, where a path keeps its file name."""
    return text if len(text) <= head + tail + 1 else f"{text[:head]}…{text[-tail:]}"


def _check_file(path: str) -> bool:
    """Raise a clear error if ``path`` cannot be read as UTF-8 text; return whether it has non-blank text."""
    if not os.path.exists(path):
        hint = " (to train on in-memory texts, pass an iterator such as iter(texts))" if " " in path else ""
        raise FileNotFoundError(f"corpus file {path!r} does not exist{hint}")
    if os.path.isdir(path):
        raise ValueError(f"corpus path {path!r} is a directory; pass a glob such as {os.path.join(path, '*.txt')!r}")
    try:
        with open(path, encoding="utf-8") as handle:
            # Usually stops at the first chunk; a blank file is read to its end.
            while chunk := handle.read(1 << 16):
                if not chunk.isspace():
                    return True
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus file {path!r} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise ValueError(f"cannot read corpus file {path!r}: {err}") from None
    return False


def _first_undecodable(files: Sequence[str]) -> str | None:
    """The first file that is not valid UTF-8 throughout (only called after Rust failed to read the corpus)."""
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                while handle.read(1 << 20):
                    pass
        except UnicodeDecodeError:
            return path
    return None


def _describe(files: Sequence[str]) -> str:
    return repr(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]!r}, ...)"


def _is_hf_dataset(corpus: object) -> bool:
    # If `datasets` was never imported, the corpus cannot be one of its datasets.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(corpus, (datasets.Dataset, datasets.IterableDataset))


def _dataset_length(dataset: Any) -> int | None:
    return len(dataset) if hasattr(dataset, "__len__") else None


def _iter_dataset(dataset: Any, text_column: str) -> Iterator[str]:
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"dataset has no column {text_column!r} (columns: {columns}); set text_column")
    for batch in dataset.iter(batch_size=_DATASET_BATCH):
        yield from (text for text in batch[text_column] if text)


# ----------------------------------------------------------------------------------------------------------------------
# Training


def _train_rust(backend: Tokenizer, trainer: trainers.Trainer, corpus: _Corpus) -> None:
    """Run a Rust trainer over the corpus, turning its failures into errors that name the problem."""
    if corpus.files is not None:
        try:
            backend.train(corpus.files, trainer)
        except Exception as err:  # Rust reports a bad file without naming it
            bad = _first_undecodable(corpus.files)
            if bad is not None:
                raise ValueError(f"corpus file {bad!r} is not UTF-8 text") from err
            raise
    else:
        backend.train_from_iterator(corpus.iter_texts(), trainer, length=corpus.length)
        _check_saw_text(corpus)


def _check_saw_text(corpus: _Corpus) -> None:
    if corpus.files is None and not corpus.saw_text:
        raise ValueError("corpus is empty: the texts contain no non-blank text")


def _check_size(kind: str, vocab_size: int, trained_size: int, base: str) -> None:
    if trained_size > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than {base} of the {kind} tokenizer ({trained_size} tokens); "
            f"raise vocab_size or set limit_alphabet"
        )


def _bpe_vocab_and_merges(backend: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def _bpe_trainer(options: _Options, vocab_size: int, **kwargs: Any) -> trainers.BpeTrainer:
    # BpeTrainer rejects None for the optional limits: pass them only when set.
    for name in ("limit_alphabet", "max_token_length"):
        if getattr(options, name) is not None:
            kwargs[name] = getattr(options, name)
    return trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=options.min_frequency,
        special_tokens=list(options.special_tokens),
        show_progress=options.show_progress,
        **kwargs,
    )


def _train_gpt2(corpus: _Corpus, options: _Options) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if options.vocab_size < len(alphabet) + len(options.special_tokens):
        raise ValueError(
            f"vocab_size={options.vocab_size} is smaller than the {len(alphabet)}-byte alphabet plus "
            f"{len(options.special_tokens)} special tokens ({len(alphabet) + len(options.special_tokens)})"
        )
    backend = Tokenizer(BPE())
    # What GPT2TokenizerFast builds: the GPT-2 regex inside ByteLevel, no normaliser, no prefix space.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    # All 256 bytes are in the alphabet, seen or not: this is what makes it lossless.
    trainer = _bpe_trainer(options, options.vocab_size, initial_alphabet=alphabet)
    _train_rust(backend, trainer, corpus)
    return backend


def _train_llama(corpus: _Corpus, options: _Options) -> Tokenizer:
    reserved = len(options.special_tokens) + len(LLAMA_BYTE_TOKENS)
    if options.vocab_size <= reserved:
        raise ValueError(
            f"vocab_size={options.vocab_size} is not larger than the {len(options.special_tokens)} special tokens "
            f"plus the {len(LLAMA_BYTE_TOKENS)} byte-fallback tokens ({reserved})"
        )
    backend = Tokenizer(BPE(unk_token="<unk>"))
    # Training splits words at `▁` as SentencePiece does, and isolates line breaks (files reach the trainer line by
    # line, newline included), so no merge crosses a word boundary or a line break. The saved tokenizer does not
    # split, like LlamaTokenizerFast, and encodes identically since no merge joins across those boundaries.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\r?\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        ]
    )
    trainer = _bpe_trainer(options, options.vocab_size - len(LLAMA_BYTE_TOKENS))
    _train_rust(backend, trainer, corpus)
    trained, merges = _bpe_vocab_and_merges(backend)
    size = len(trained) + len(LLAMA_BYTE_TOKENS)
    _check_size("llama", options.vocab_size, size, "the special, byte and alphabet tokens")

    # LLaMA's layout: special tokens, the 256 byte tokens, then the learnt pieces.
    vocab: dict[str, int] = {}
    for token in [*options.special_tokens, *LLAMA_BYTE_TOKENS, *sorted(trained, key=trained.get)]:
        vocab.setdefault(token, len(vocab))
    backend.model = BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    return backend


def _bert_pipeline(backend: Tokenizer, options: _Options) -> None:
    """Set BertTokenizerFast's normaliser, pre-tokeniser, decoder and pair template on ``backend``."""
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=options.strip_accents, lowercase=options.lowercase
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")


def _bert_post_processor(vocab: dict[str, int]) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )


def _train_bert(corpus: _Corpus, options: _Options) -> Tokenizer:
    if options.vocab_size <= len(options.special_tokens):
        raise ValueError(
            f"vocab_size={options.vocab_size} is not larger than the {len(options.special_tokens)} special tokens"
        )
    # Both criteria run lmblocks' own merge loop (deterministic; tokenizers' WordPieceTrainer is not, tokenizers#1794)
    # on words counted by the very normaliser and pre-tokeniser the tokenizer encodes with.
    scratch = Tokenizer(WordPiece(unk_token="[UNK]"))
    _bert_pipeline(scratch, options)
    word_counts = count_words(
        corpus.iter_texts(), scratch.normalizer, scratch.pre_tokenizer, show_progress=options.show_progress
    )
    _check_saw_text(corpus)
    if not word_counts:
        raise ValueError("corpus is empty: it contains no words")
    vocab = train_wordpiece(
        word_counts,
        vocab_size=options.vocab_size,
        criterion=options.wordpiece_criterion,
        special_tokens=options.special_tokens,
        min_frequency=options.min_frequency,
        limit_alphabet=options.limit_alphabet,
        max_token_length=options.max_token_length,
        show_progress=options.show_progress,
    )
    backend = Tokenizer(WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    _bert_pipeline(backend, options)
    backend.post_processor = _bert_post_processor(vocab)
    backend.add_special_tokens(list(options.special_tokens))
    return backend


@dataclass(frozen=True)
class _Options:
    vocab_size: int
    min_frequency: int
    special_tokens: tuple[str, ...]
    lowercase: bool
    strip_accents: bool
    limit_alphabet: int | None
    max_token_length: int | None
    wordpiece_criterion: str | None
    show_progress: bool


@dataclass(frozen=True)
class TokenizerKind:
    """One kind of tokenizer (the table in the module docstring): how it trains, the transformers class it loads as
    (writing the classic vocabulary files on save, see tokenization_classes), its own special tokens, and what it
    supports."""

    train: Callable[[_Corpus, _Options], Tokenizer]
    tokenizer_class: type[PreTrainedTokenizerFast]
    special_tokens: tuple[str, ...]
    normalises: bool = False  # lowercase / strip_accents / wordpiece_criterion apply (WordPiece with BERT's normaliser)
    byte_alphabet: bool = False  # the alphabet is always the 256 bytes: limit_alphabet does not apply
    init_kwargs: dict[str, Any] = field(default_factory=dict)  # for `tokenizer_class.from_pretrained`
    vocabulary_files: bool = True  # has classic vocabulary files (`save_tokenizer` writes them)


TOKENIZER_KINDS: dict[str, TokenizerKind] = {
    "gpt2": TokenizerKind(_train_gpt2, GPT2Tokenizer, GPT2_SPECIAL_TOKENS, byte_alphabet=True),
    "llama": TokenizerKind(_train_llama, LlamaTokenizerFast, LLAMA_SPECIAL_TOKENS, vocabulary_files=False,
                           init_kwargs=dict(add_bos_token=True, add_eos_token=False, legacy=False,
                                            add_prefix_space=True)),
    "bert": TokenizerKind(_train_bert, BertTokenizer, BERT_SPECIAL_TOKENS, normalises=True),
}
KINDS: tuple[str, ...] = tuple(TOKENIZER_KINDS)


def _check_options(
    kind: str,
    vocab_size: int,
    min_frequency: int,
    lowercase: bool | None,
    strip_accents: bool | None,
    limit_alphabet: int | None,
    max_token_length: int | None,
    wordpiece_criterion: str | None,
) -> tuple[bool, bool, str | None]:
    """Validate the options for ``kind``; return the effective (lowercase, strip_accents, wordpiece_criterion)."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}")
    spec = TOKENIZER_KINDS[kind]
    sizes = {"vocab_size": vocab_size, "limit_alphabet": limit_alphabet, "max_token_length": max_token_length}
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(f"min_frequency must be a non-negative int, got {min_frequency!r}")
    if wordpiece_criterion is not None and wordpiece_criterion not in CRITERIA:
        raise ValueError(f"wordpiece_criterion must be 'frequency' or 'likelihood', got {wordpiece_criterion!r}")
    if spec.normalises:
        lowercase = True if lowercase is None else lowercase
        strip_accents = lowercase if strip_accents is None else strip_accents
        return lowercase, strip_accents, wordpiece_criterion or DEFAULT_WORDPIECE_CRITERION
    cls_name = spec.tokenizer_class.__name__
    if lowercase or strip_accents:
        raise ValueError(
            f"{kind} tokenizers have no normaliser ({cls_name} rebuilds its pipeline without one when loaded), so "
            f"lowercase/strip_accents cannot be saved; normalise the text yourself"
        )
    if wordpiece_criterion is not None:
        raise ValueError(f"wordpiece_criterion applies to kind='bert' only, not {kind!r}")
    if spec.byte_alphabet and limit_alphabet is not None:
        raise ValueError(f"limit_alphabet does not apply to {kind}: its alphabet is always the 256 bytes")
    return False, False, None


def _check_model_max_length(model_max_length: int | None) -> None:
    if model_max_length is not None and (not isinstance(model_max_length, int) or model_max_length < 1):
        raise ValueError(f"model_max_length must be a positive int, got {model_max_length!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Public API


def train_tokenizer(
    corpus: Corpus,
    kind: Kind,
    *,
    vocab_size: int = 32000,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (),
    lowercase: bool | None = None,
    strip_accents: bool | None = None,
    limit_alphabet: int | None = None,
    max_token_length: int | None = None,
    wordpiece_criterion: Literal["frequency", "likelihood"] | None = None,
    text_column: str = "text",
    show_progress: bool = True,
    model_max_length: int | None = None,
    output_dir: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Train a ``kind`` tokenizer on ``corpus`` and return it as the family's transformers class.

    Args:
        corpus: a path or glob (``"data/*.txt"``), a list or tuple of them (files are UTF-8 text read by Rust, one
            line per text), any other iterable of strings (consumed once, so a generator streams), or a
            ``datasets.Dataset`` / ``IterableDataset`` (its ``text_column``). A list or tuple always names files; to
            train on a list of texts, pass ``iter(texts)`` (a list none of whose strings is a file is an error that
            says so).
        kind: ``"gpt2"`` (byte-level BPE), ``"llama"`` (SentencePiece-style BPE with byte fallback) or ``"bert"``
            (WordPiece).
        vocab_size: the size of the vocabulary, special (and for llama the 256 byte) tokens included. Training stops
            earlier when no pair occurs ``min_frequency`` times.
        min_frequency: how often a pair must occur to be merged.
        special_tokens: extra special tokens, after the family's own (``<|endoftext|>``; ``<unk> <s> </s>``;
            ``[PAD] [UNK] [CLS] [SEP] [MASK]``); they are never split and are registered as extra special tokens.
        lowercase: bert only (default True); gpt2 and llama have no normaliser and reject True.
        strip_accents: bert only (default: same as ``lowercase``).
        limit_alphabet: keep only this many of the most frequent characters (llama falls back to bytes for the others;
            bert encodes words with them as ``[UNK]``). Not for gpt2, whose alphabet is the 256 bytes.
        max_token_length: longest token the merges may create, in characters: it keeps long runs (``=====``, spaces)
            from crowding the vocabulary and the trainer.
        wordpiece_criterion: bert only: ``"frequency"`` (merge the most frequent pair, as tokenizers'
            WordPieceTrainer does) or ``"likelihood"`` (true WordPiece: the pair whose parts most rarely occur
            apart); see :mod:`lmblocks.tokenization_wordpiece`. Both are deterministic. The default,
            ``DEFAULT_WORDPIECE_CRITERION``, was chosen by ``bench/bench_tokenizer_quality.py``.
        text_column: the text column of a ``datasets`` corpus.
        show_progress: show progress bars.
        model_max_length: the context of the model the tokenizer serves (its ``max_position_embeddings``), so that
            ``truncation=True`` and pipelines cut inputs there; saved in ``tokenizer_config.json``. Default: no limit
            (transformers' 1e30); it can also be set later as ``tokenizer.model_max_length = n``.
        output_dir: if given, save the tokenizer there with :func:`save_tokenizer`.

    Returns:
        A ``GPT2TokenizerFast`` or ``BertTokenizerFast`` that also writes the classic vocabulary files when saved
        (:mod:`lmblocks.tokenization_classes`; a saved folder names transformers' own class), or a
        ``LlamaTokenizerFast``.

    Raises:
        ValueError: unknown kind, bad option, empty corpus, unreadable or non-UTF-8 file, or a vocab_size too small for
            the alphabet and special tokens.
        FileNotFoundError: a corpus file or glob that does not exist.

    Example:
        >>> tok = train_tokenizer(iter(["Hello world!"] * 100), "gpt2", vocab_size=300, show_progress=False)
        >>> tok.decode(tok("Hello world!")["input_ids"])
        'Hello world!'
    """
    lowercase, strip_accents, wordpiece_criterion = _check_options(
        kind, vocab_size, min_frequency, lowercase, strip_accents, limit_alphabet, max_token_length, wordpiece_criterion
    )
    _check_model_max_length(model_max_length)
    spec = TOKENIZER_KINDS[kind]
    family_tokens = spec.special_tokens
    options = _Options(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=tuple(dict.fromkeys([*family_tokens, *special_tokens])),
        lowercase=lowercase,
        strip_accents=strip_accents,
        limit_alphabet=limit_alphabet,
        max_token_length=max_token_length,
        wordpiece_criterion=wordpiece_criterion,
        show_progress=show_progress,
    )
    backend = spec.train(_resolve_corpus(corpus, text_column), options)

    init_kwargs: dict[str, Any] = dict(spec.init_kwargs)
    extra_tokens = [token for token in options.special_tokens if token not in family_tokens]
    if extra_tokens:
        init_kwargs["extra_special_tokens"] = extra_tokens
    if spec.normalises:
        init_kwargs.update(do_lower_case=lowercase, strip_accents=strip_accents, tokenize_chinese_chars=True)
    # Load through from_pretrained, as AutoTokenizer will, so that what is returned is what a saved copy loads as.
    with tempfile.TemporaryDirectory() as scratch:
        backend.save(os.path.join(scratch, "tokenizer.json"))
        tokenizer = spec.tokenizer_class.from_pretrained(scratch, **init_kwargs)
    tokenizer.name_or_path = ""
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    if output_dir is not None:
        save_tokenizer(tokenizer, output_dir)
    return tokenizer


def save_tokenizer(
    tokenizer: PreTrainedTokenizerFast, output_dir: str | os.PathLike, *, model_max_length: int | None = None
) -> list[Path]:
    """Save ``tokenizer`` with ``save_pretrained`` plus its family's vocabulary files; return the files written.

    ``tokenizer.json`` and ``tokenizer_config.json`` are all that transformers needs; the classic files are for other
    tools: ``vocab.json`` and ``merges.txt`` for GPT-2, ``vocab.txt`` for BERT (LLaMA's would be a SentencePiece
    ``tokenizer.model``, which a ``tokenizers`` BPE cannot produce). Tokenizers from :func:`train_tokenizer` write them
    in ``save_pretrained`` already; this also writes them for a GPT-2 or BERT tokenizer loaded from disk.
    ``model_max_length``, if given, is set on ``tokenizer`` first (the model's context, see :func:`train_tokenizer`).

    >>> tok = train_tokenizer(iter(["some text"] * 10), "bert", vocab_size=40, show_progress=False)
    >>> sorted(path.name for path in save_tokenizer(tok, tempfile.mkdtemp(), model_max_length=128))
    ['tokenizer.json', 'tokenizer_config.json', 'vocab.txt']
    """
    _check_model_max_length(model_max_length)
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    files = [Path(name) for name in tokenizer.save_pretrained(output_dir)]
    if not isinstance(tokenizer, (GPT2Tokenizer, BertTokenizer)):
        files += [Path(name) for name in save_vocabulary_files(tokenizer, output_dir, None)]
    return files


def config_kwargs_from_tokenizer(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The model-config fields a tokenizer fixes: ``vocab_size`` and the special token ids it defines.

    ``vocab_size`` is ``len(tokenizer)`` (added tokens included). Ids the tokenizer does not define (GPT-2 and LLaMA
    have no pad token) are left out, so the config keeps its default.

    >>> tok = train_tokenizer(iter(["some text"] * 10), "gpt2", vocab_size=300, show_progress=False)
    >>> config_kwargs_from_tokenizer(tok)
    {'vocab_size': 264, 'bos_token_id': 0, 'eos_token_id': 0}
    """
    kwargs = {"vocab_size": len(tokenizer)}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            kwargs[name] = value
    return kwargs


__all__ = [
    "DEFAULT_WORDPIECE_CRITERION",
    "KINDS",
    "TOKENIZER_KINDS",
    "TokenizerKind",
    "config_kwargs_from_tokenizer",
    "save_tokenizer",
    "train_tokenizer",
]
