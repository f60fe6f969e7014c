"""BERT pretraining data: sentence-pair examples for next-sentence prediction, and dynamic masking for the MLM.

The recipe is that of the original `create_pretraining_data.py` (Devlin et al. 2019):

1. A corpus is a list of documents, each a list of sentences: the classic text format has one sentence per line and a
   blank line between documents (`read_bert_documents`); a `datasets` dataset gives the same either with one sentence
   per row and empty rows between documents — what `load_dataset("text", ...)` makes of the classic files — or with
   one document per row (`documents_from_dataset`).
2. `create_nsp_examples` walks each document, gathering sentences until a target length is reached, and cuts the
   chunk into segment A (its first sentences) and segment B: with probability 1 − `nsp_probability` the rest of the
   chunk (IsNext, `next_sentence_label` 0), otherwise text from a random other document (label 1; the unused sentences
   go back to the document). The pair becomes `[CLS] A [SEP] B [SEP]` with token_type_ids 0 for `[CLS] A [SEP]` and 1
   for `B [SEP]`, trimmed to `max_seq_length` by dropping tokens at random ends of the longer segment. The target is
   `max_seq_length` − 3, or with probability `short_seq_prob` a random length in [2, max_seq_length − 3], so that the
   model also sees the short sequences of fine-tuning.
3. `DataCollatorForBertPretraining` pads a batch and masks it afresh each time it is drawn (RoBERTa's dynamic
   masking; the original masked once when writing the data): 15 % of the tokens — never special tokens or padding —
   become prediction targets, of which 80 % are replaced by `[MASK]`, 10 % by a random token and 10 % kept. With
   `whole_word_mask=True` all pieces of a word are chosen together (a word is a token plus its `##` continuations,
   or the tokens sharing a `word_ids` entry).

Two deliberate departures from the original script, both to keep the NSP labels at the asked-for 50/50: a chunk of a
single sentence drawn as IsNext is split inside the sentence (the original made every such pair random, which tilts
the labels towards NotNext), and the short target length is drawn per example rather than per document.

Example:
    >>> documents = read_bert_documents(["wiki.txt"])                                   # doctest: +SKIP
    >>> examples = create_nsp_examples(documents, tokenizer, max_seq_length=128)        # doctest: +SKIP
    >>> collator = DataCollatorForBertPretraining(tokenizer)                            # doctest: +SKIP
    >>> model = LmbBertForPreTraining(config)                                            # doctest: +SKIP
    >>> Trainer(model=model, train_dataset=examples, data_collator=collator, args=...)   # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


class BertDataError(ValueError):
    """A corpus or a setting the BERT pretraining recipe cannot use: no text, one document, a pair that cannot fit."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading corpora
# ----------------------------------------------------------------------------------------------------------------------


def _split_documents(lines: Iterable[str]) -> list[list[str]]:
    """Lines -> documents: blank lines end a document; surrounding whitespace is stripped."""
    documents: list[list[str]] = [[]]
    for line in lines:
        line = line.strip()
        if line:
            documents[-1].append(line)
        elif documents[-1]:
            documents.append([])
    return [doc for doc in documents if doc]


def read_bert_documents(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[list[str]]:
    """Read files in the classic BERT format — one sentence per line, a blank line between documents — into a list of
    documents, each a list of sentences. A file boundary also ends a document."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise BertDataError("No corpus files given.")
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise BertDataError(f"Corpus file(s) not found: {', '.join(missing)}")
    documents: list[list[str]] = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            documents.extend(_split_documents(f))
    return documents


def documents_from_dataset(dataset, text_column: str = "text", document_per_row: bool = False) -> list[list[str]]:
    """Documents from a `datasets` dataset (or any iterable of mappings).

    `document_per_row=False` (default): each row is one sentence and empty rows separate documents, which is what
    `load_dataset("text", data_files=...)` yields for files in the classic format. `document_per_row=True`: each row
    is a document whose non-empty lines are its sentences.
    """
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None and text_column not in column_names:
        raise BertDataError(f"The dataset has no column {text_column!r}; its columns are {column_names}.")
    texts = dataset[text_column] if column_names is not None else (row[text_column] for row in dataset)
    if document_per_row:
        return [doc for text in texts if (doc := [s.strip() for s in (text or "").splitlines() if s.strip()])]
    return _split_documents(text or "" for text in texts)


# ----------------------------------------------------------------------------------------------------------------------
# Sentence pairs for next-sentence prediction
# ----------------------------------------------------------------------------------------------------------------------

# A tokenised sentence: token ids and, for whole-word masking by word, the word index of each token.
_Segment = tuple[list[int], list[int]]


def _tokenize_documents(
    documents: Sequence[Sequence[str]], tokenizer: PreTrainedTokenizerBase, with_word_ids: bool
) -> list[list[_Segment]]:
    """Tokenise every sentence without special tokens; drop sentences that tokenise to nothing and documents left
    empty. Word indices are numbered through each document, so a word never spans two sentences."""
    tokenized: list[list[_Segment]] = []
    for document in documents:
        sentences = [s for s in document if s and s.strip()]
        if not sentences:
            continue
        encoding = tokenizer(list(sentences), add_special_tokens=False)
        segments: list[_Segment] = []
        word_offset = 0
        for i, ids in enumerate(encoding["input_ids"]):
            if not ids:
                continue
            if with_word_ids:
                words = [w if w is not None else 0 for w in encoding.word_ids(i)]
                segments.append((list(ids), [word_offset + w for w in words]))
                word_offset += max(words) + 1
            else:
                segments.append((list(ids), []))
        if segments:
            tokenized.append(segments)
    return tokenized


def _concat(segments: Sequence[_Segment]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    words: list[int] = []
    for seg_ids, seg_words in segments:
        ids.extend(seg_ids)
        words.extend(seg_words)
    return ids, words


def _truncate_pair(a: list[int], wa: list[int], b: list[int], wb: list[int], max_tokens: int, rng: random.Random):
    """Trim the longer segment one token at a time, from the front or the back at random (the original's
    `truncate_seq_pair`: always cutting the end would bias where sentences are cut)."""
    while len(a) + len(b) > max_tokens:
        ids, words = (a, wa) if len(a) > len(b) else (b, wb)
        index = 0 if rng.random() < 0.5 else -1
        del ids[index]
        if words:
            del words[index]


def create_nsp_examples(
    documents: Sequence[Sequence[str]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int = 128,
    short_seq_prob: float = 0.1,
    nsp_probability: float = 0.5,
    dupe_factor: int = 1,
    seed: int = 12345,
    return_word_ids: bool = False,
) -> list[dict[str, Any]]:
    """Build `[CLS] A [SEP] B [SEP]` next-sentence-prediction examples from documents (lists of sentences).

    Each example is a dict with `input_ids`, `token_type_ids`, `special_tokens_mask`, `next_sentence_label`
    (0 = B follows A in the document, 1 = B comes from another document) and, with `return_word_ids=True` (fast
    tokenizers only), `word_ids` for whole-word masking. No example is longer than `max_seq_length`. `dupe_factor`
    passes over the corpus that many times (each pass cuts and pairs differently). The examples are shuffled.

    Raises `BertDataError` for a corpus with no text or with a single document: random segments must come from
    another document.
    """
    if max_seq_length < 5:
        raise BertDataError(
            f"max_seq_length={max_seq_length} is too short: a pair needs [CLS], [SEP], [SEP] and one token per segment."
        )
    for name, value in (("short_seq_prob", short_seq_prob), ("nsp_probability", nsp_probability)):
        if not 0.0 <= value <= 1.0:
            raise BertDataError(f"{name} must be in [0, 1], got {value}.")
    if dupe_factor < 1:
        raise BertDataError(f"dupe_factor must be at least 1, got {dupe_factor}.")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise BertDataError(
            f"The tokenizer needs a CLS and a SEP token for sentence pairs (cls_token={tokenizer.cls_token!r}, "
            f"sep_token={tokenizer.sep_token!r})."
        )
    if return_word_ids and not tokenizer.is_fast:
        raise BertDataError("return_word_ids=True needs a fast tokenizer (one that reports word_ids).")

    corpus = _tokenize_documents(documents, tokenizer, with_word_ids=return_word_ids)
    if not corpus:
        raise BertDataError(
            f"The corpus has no text ({len(documents)} document(s), all empty after tokenisation): next-sentence "
            f"prediction needs at least two non-empty documents."
        )
    if len(corpus) < 2:
        raise BertDataError(
            "Next-sentence prediction needs at least two documents, since the random segment B must come from another "
            "document; the corpus has 1 (in the classic format, separate documents with a blank line)."
        )

    rng = random.Random(seed)
    examples: list[dict[str, Any]] = []
    for _ in range(dupe_factor):
        for doc_index in range(len(corpus)):
            examples.extend(
                _examples_from_document(corpus, doc_index, max_seq_length, short_seq_prob, nsp_probability, rng,
                                        cls_id, sep_id, return_word_ids)
            )
    rng.shuffle(examples)
    return examples


def _examples_from_document(
    corpus: list[list[_Segment]],
    doc_index: int,
    max_seq_length: int,
    short_seq_prob: float,
    nsp_probability: float,
    rng: random.Random,
    cls_id: int,
    sep_id: int,
    return_word_ids: bool,
) -> list[dict[str, Any]]:
    document = corpus[doc_index]
    max_tokens = max_seq_length - 3  # room for [CLS], [SEP], [SEP]

    def draw_target() -> int:
        return rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens

    examples = []
    target = draw_target()
    chunk: list[_Segment] = []
    chunk_length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i][0])
        if i == len(document) - 1 or chunk_length >= target:
            is_random_next = rng.random() < nsp_probability
            if len(chunk) == 1 and not is_random_next and len(chunk[0][0]) < 2:
                is_random_next = True  # a one-token chunk cannot be cut into two segments
            if len(chunk) == 1 and not is_random_next:
                # One sentence drawn as IsNext: cut it in two, keeping the label share at 1 − nsp_probability.
                ids, words = chunk[0]
                cut = rng.randint(1, len(ids) - 1)
                a, wa, b, wb = ids[:cut], words[:cut], ids[cut:], words[cut:]
            else:
                a_end = 1 if len(chunk) == 1 else rng.randint(1, len(chunk) - 1)
                a, wa = _concat(chunk[:a_end])
                if is_random_next:
                    b, wb = _random_segment(corpus, doc_index, target - len(a), rng)
                    i -= len(chunk) - a_end  # the unused sentences start the next chunk
                else:
                    b, wb = _concat(chunk[a_end:])
            _truncate_pair(a, wa, b, wb, max_tokens, rng)
            example = {
                "input_ids": [cls_id, *a, sep_id, *b, sep_id],
                "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
                "special_tokens_mask": [1] + [0] * len(a) + [1] + [0] * len(b) + [1],
                "next_sentence_label": int(is_random_next),
            }
            if return_word_ids:
                # Segment B's words are offset past A's, so that no word index is shared across the two segments.
                offset = (max(wa) + 1 - min(wb)) if wa and wb else 0
                example["word_ids"] = [None, *wa, None, *(w + offset for w in wb), None]
            examples.append(example)
            chunk, chunk_length = [], 0
            target = draw_target()
        i += 1
    return examples


def _random_segment(
    corpus: list[list[_Segment]], doc_index: int, target_length: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """Consecutive sentences of a random other document, from a random start, until `target_length` tokens."""
    other = rng.randrange(len(corpus) - 1)
    other += other >= doc_index  # uniform over the documents other than doc_index
    document = corpus[other]
    start = rng.randrange(len(document))
    ids: list[int] = []
    words: list[int] = []
    for seg_ids, seg_words in document[start:]:
        ids.extend(seg_ids)
        words.extend(seg_words)
        if len(ids) >= target_length:
            break
    return ids, words


# ----------------------------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DataCollatorForBertPretraining:
    """Pads a batch of examples and masks it for the MLM (and passes `next_sentence_label` through for NSP).

    Per sequence, round(`mlm_probability` × maskable tokens) positions (at least one, at most
    `max_predictions_per_seq` if set) become targets; special tokens and padding never do. Of the targets,
    `mask_replace_prob` are replaced by the mask token, `random_replace_prob` by a random non-special token, and the
    rest kept. `labels` holds the original ids at the targets and -100 elsewhere.

    `whole_word_mask=True` picks whole words: by the examples' `word_ids` when present (tokens with the same index in
    a row form a word; keep the column with `remove_unused_columns=False` in `TrainingArguments`), else by the
    WordPiece convention that a token starting with `##` continues the previous one.

    `seed` makes the masks reproducible (a generator owned by the collator); without it the global torch RNG is used.
    """

    tokenizer: PreTrainedTokenizerBase
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    whole_word_mask: bool = False
    max_predictions_per_seq: int | None = None
    pad_to_multiple_of: int | None = None
    seed: int | None = None
    _generator: torch.Generator | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_probability < 1.0:
            raise BertDataError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}.")
        if self.mask_replace_prob < 0 or self.random_replace_prob < 0 or \
                self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise BertDataError(
                f"mask_replace_prob ({self.mask_replace_prob}) and random_replace_prob ({self.random_replace_prob}) "
                f"must be non-negative and sum to at most 1."
            )
        if self.tokenizer.mask_token_id is None:
            raise BertDataError("The tokenizer has no mask token; masked language modelling needs one.")
        if self.tokenizer.pad_token_id is None:
            raise BertDataError("The tokenizer has no pad token; batches of different lengths need one.")
        vocab_size = len(self.tokenizer)
        self._special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        is_special = torch.zeros(vocab_size, dtype=torch.bool)
        is_special[self._special_ids[self._special_ids < vocab_size]] = True
        # Random replacements come from the ordinary tokens only: a random [CLS] or [SEP] mid-text is no real word.
        self._random_ids = (~is_special).nonzero().squeeze(-1)
        self._is_continuation: torch.Tensor | None = None
        if self.whole_word_mask:
            tokens = self.tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
            self._is_continuation = torch.tensor([t is not None and t.startswith("##") for t in tokens])
        if self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)

    # -- padding -------------------------------------------------------------------------------------------------

    def _pad(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [list(map(int, e["input_ids"])) for e in examples]
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        token_type_ids = torch.zeros((batch, length), dtype=torch.long)
        special = torch.ones((batch, length), dtype=torch.bool)  # padding counts as special: never masked
        word_ids = torch.full((batch, length), -1, dtype=torch.long)
        has_word_ids = all("word_ids" in e for e in examples)
        for i, (example, row) in enumerate(zip(examples, rows)):
            n = len(row)
            input_ids[i, :n] = torch.tensor(row)
            attention_mask[i, :n] = 1
            if "token_type_ids" in example:
                token_type_ids[i, :n] = torch.as_tensor(example["token_type_ids"])
            if "special_tokens_mask" in example:
                special[i, :n] = torch.as_tensor(example["special_tokens_mask"]).bool()
            else:
                special[i, :n] = torch.isin(input_ids[i, :n], self._special_ids)
            if has_word_ids:
                word_ids[i, :n] = torch.tensor([-1 if w is None else int(w) for w in example["word_ids"]])
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
               "_special": special}
        if has_word_ids:
            out["_word_ids"] = word_ids
        if all("next_sentence_label" in e for e in examples):
            out["next_sentence_label"] = torch.tensor([int(e["next_sentence_label"]) for e in examples])
        return out

    # -- choosing targets ----------------------------------------------------------------------------------------

    def _num_targets(self, maskable: torch.Tensor) -> torch.Tensor:
        """round(p · maskable tokens) per row, at least 1 where anything is maskable, capped if asked."""
        count = maskable.sum(dim=1)
        num = torch.clamp(torch.round(count.double() * self.mlm_probability).long(), min=1)
        if self.max_predictions_per_seq is not None:
            num = num.clamp(max=self.max_predictions_per_seq)
        return torch.minimum(num, count)

    def _token_targets(self, maskable: torch.Tensor) -> torch.Tensor:
        """A uniformly random subset of `num` maskable positions per row, vectorised by ranking random scores."""
        num = self._num_targets(maskable)
        scores = torch.rand(maskable.shape, generator=self._generator)
        scores[~maskable] = 2.0  # after every maskable position
        rank = scores.argsort(dim=1).argsort(dim=1)
        return (rank < num.unsqueeze(1)) & maskable

    def _word_starts(self, input_ids: torch.Tensor, word_ids: torch.Tensor | None) -> torch.Tensor:
        """True where a new word begins (word_ids change, or a token is not a `##` continuation)."""
        if word_ids is not None:
            starts = torch.ones_like(input_ids, dtype=torch.bool)
            starts[:, 1:] = word_ids[:, 1:] != word_ids[:, :-1]
            return starts
        return ~self._is_continuation[input_ids.clamp(max=len(self._is_continuation) - 1)]

    def _whole_word_targets(self, input_ids: torch.Tensor, maskable: torch.Tensor,
                            word_ids: torch.Tensor | None) -> torch.Tensor:
        """Whole words in random order until `num` tokens are targets; a word that would overshoot is skipped (the
        original's rule), so a row may end slightly under its count."""
        num = self._num_targets(maskable)
        starts = self._word_starts(input_ids, word_ids) | ~maskable
        targets = torch.zeros_like(maskable)
        for row in range(input_ids.shape[0]):
            words: list[list[int]] = []
            for pos in maskable[row].nonzero().squeeze(-1).tolist():
                if starts[row, pos] or not words or words[-1][-1] != pos - 1:
                    words.append([pos])
                else:
                    words[-1].append(pos)
            chosen = 0
            for w in torch.randperm(len(words), generator=self._generator).tolist():
                if chosen >= num[row]:
                    break
                if chosen + len(words[w]) > num[row]:
                    continue
                targets[row, words[w]] = True
                chosen += len(words[w])
        return targets

    # -- the collator ----------------------------------------------------------------------------------------------

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._pad(examples)
        special = batch.pop("_special")
        word_ids = batch.pop("_word_ids", None)
        input_ids = batch["input_ids"]
        maskable = ~special
        if self.whole_word_mask:
            targets = self._whole_word_targets(input_ids, maskable, word_ids)
        else:
            targets = self._token_targets(maskable)

        labels = torch.where(targets, input_ids, torch.full_like(input_ids, -100))
        draw = torch.rand(input_ids.shape, generator=self._generator)
        to_mask = targets & (draw < self.mask_replace_prob)
        to_random = targets & (draw >= self.mask_replace_prob) & \
            (draw < self.mask_replace_prob + self.random_replace_prob)
        random_tokens = self._random_ids[
            torch.randint(len(self._random_ids), input_ids.shape, generator=self._generator)
        ]
        input_ids = torch.where(to_mask, torch.full_like(input_ids, self.tokenizer.mask_token_id), input_ids)
        batch["input_ids"] = torch.where(to_random, random_tokens, input_ids)
        batch["labels"] = labels
        return batch


__all__ = [
    "BertDataError",
    "read_bert_documents",
    "documents_from_dataset",
    "create_nsp_examples",
    "DataCollatorForBertPretraining",
]
