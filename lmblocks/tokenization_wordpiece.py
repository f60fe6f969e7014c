"""WordPiece training by the likelihood or the frequency criterion, deterministic for both.

Two ways to grow a WordPiece vocabulary from a count of words, both starting from the characters of the
words (``h ##u ##g`` for ``hug``) and merging one adjacent pair of symbols per step:

* **frequency** (what ``tokenizers.trainers.WordPieceTrainer`` does: it is the BPE trainer underneath) merges the pair
  that occurs most often, ``freq(a, b)``. It learns the fragments shared by many words first, so at small vocabulary
  sizes it cuts text into far fewer pieces (``bench/bench_tokenizer_quality.py``).
* **likelihood** (WordPiece as defined by Schuster & Nakajima and used for BERT) merges the pair that most increases
  the likelihood of the corpus under a unigram model of the symbols, which is the pair with the highest
  ``freq(a, b) / (freq(a) * freq(b))``. It prefers pairs whose parts rarely occur apart, so it learns the whole of a
  rare but cohesive word before the frequent fragments shared by many words.

Example (the corpus ``hug``×10, ``pug``×5, ``pun``×12, ``bun``×4, ``hugs``×5): frequency merges ``##u ##g`` (20
occurrences) first; likelihood merges ``##g ##s`` first, since ``5 / (20 * 5) = 1/20`` beats the ``1/36`` of every other
pair.

This module holds both. Words are counted by the Rust normaliser and pre-tokeniser (:func:`count_words`); the merge
loop (:func:`train_wordpiece`) runs in Python on those counts and keeps its pair statistics up to date incrementally:
a merge only revisits the words that contain the merged pair and only re-scores the pairs whose score it changed, with
a lazily invalidated heap to find the best pair. Ties go to the pair of older symbols, so the same counts always give
the same vocabulary (``tokenizers``' own trainer breaks ties in hash order, tokenizers#1794). The resulting vocabulary
goes into a ``tokenizers.models.WordPiece`` model, so encoding runs in Rust.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any, Literal

from tokenizers import normalizers, pre_tokenizers
from tqdm.auto import tqdm


# Texts are joined into chunks of about this many characters before each call into Rust: one call per line costs
# more in Python overhead than the normalisation itself.
_CHUNK_CHARS = 1 << 16


def count_words(
    texts: Iterable[str],
    normalizer: normalizers.Normalizer | None,
    pre_tokenizer: pre_tokenizers.PreTokenizer,
    show_progress: bool = False,
) -> Counter[str]:
    """Count the words of ``texts`` as the given Rust normaliser and pre-tokeniser split them.

    Texts are joined with newlines into chunks before being split, so the pre-tokeniser must treat a newline as a word
    boundary (BERT's does).

    >>> from tokenizers import normalizers, pre_tokenizers
    >>> count_words(["Hug hug", "pug"], normalizers.BertNormalizer(), pre_tokenizers.BertPreTokenizer())
    Counter({'hug': 2, 'pug': 1})
    """
    counts: Counter[str] = Counter()
    first = itemgetter(0)

    def count_chunk(chunk: list[str]) -> None:
        text = "\n".join(chunk)
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        counts.update(map(first, pre_tokenizer.pre_tokenize_str(text)))

    chunk: list[str] = []
    chunk_chars = 0
    with tqdm(desc="Counting words", unit="MB", unit_scale=1e-6, disable=not show_progress) as progress:
        for text in texts:
            chunk.append(text)
            chunk_chars += len(text)
            if chunk_chars >= _CHUNK_CHARS:
                count_chunk(chunk)
                progress.update(chunk_chars)
                chunk, chunk_chars = [], 0
        if chunk:
            count_chunk(chunk)
            progress.update(chunk_chars)
    return counts


Criterion = Literal["likelihood", "frequency"]
CRITERIA: tuple[str, ...] = ("likelihood", "frequency")


def train_wordpiece(
    word_counts: dict[str, int],
    vocab_size: int,
    criterion: Criterion = "likelihood",
    special_tokens: Sequence[str] = (),
    min_frequency: int = 0,
    limit_alphabet: int | None = None,
    max_token_length: int | None = None,
    prefix: str = "##",
    show_progress: bool = False,
) -> dict[str, int]:
    """Grow a WordPiece vocabulary from ``word_counts`` by ``criterion`` (see the module docstring).

    The vocabulary is the special tokens, then the alphabet (each character, and ``prefix`` + each character that
    continues a word, sorted), then the merged symbols in the order they were learnt. Merging stops at
    ``vocab_size`` tokens or when no pair occurs at least ``min_frequency`` times. With ``limit_alphabet``, only the
    most frequent characters are kept, and words with other characters are left out (WordPiece encodes them as unknown).
    ``max_token_length`` bounds the length of a merged symbol in characters, not counting ``prefix``. Ties in score go
    to the pair of older symbols (the sorted alphabet, then the merge order), so the result is deterministic.

    >>> corpus = {"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5}
    >>> [list(train_wordpiece(corpus, 12, criterion))[-1] for criterion in ("likelihood", "frequency")]
    ['##gs', '##ug']

    Raises:
        ValueError: if ``criterion`` is unknown or ``vocab_size`` cannot hold the special tokens and the alphabet.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(map(repr, CRITERIA))}, got {criterion!r}")
    words, counts, initial = _split_words(word_counts, _alphabet(word_counts, limit_alphabet), prefix)
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *initial]:
        vocab.setdefault(token, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {len(special_tokens)} special tokens plus the "
            f"{len(initial)}-symbol alphabet ({len(vocab)}); raise vocab_size or set limit_alphabet"
        )

    merger = _Merger(words, counts, initial, criterion, min_frequency)
    with tqdm(total=vocab_size - len(vocab), desc="WordPiece merges", disable=not show_progress) as progress:
        while len(vocab) < vocab_size and (pair := merger.pop_best()) is not None:
            new_string = merger.symbols[pair[0]] + merger.symbols[pair[1]].removeprefix(prefix)
            if max_token_length is not None and len(new_string.removeprefix(prefix)) > max_token_length:
                continue  # dropped until a change in its counts pushes it again
            merger.merge(pair, new_string)
            if new_string not in vocab:
                vocab[new_string] = len(vocab)
                progress.update(1)
    return vocab


def train_wordpiece_likelihood(word_counts: dict[str, int], vocab_size: int, **kwargs: Any) -> dict[str, int]:
    """:func:`train_wordpiece` with ``criterion="likelihood"`` (kept for callers of the earlier name)."""
    return train_wordpiece(word_counts, vocab_size, "likelihood", **kwargs)


def _alphabet(word_counts: dict[str, int], limit_alphabet: int | None) -> set[str]:
    """The characters of the words, weighted by how often their words occur; the ``limit_alphabet`` most frequent."""
    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count
    return set(sorted(char_counts, key=lambda c: (-char_counts[c], c))[:limit_alphabet])


def _split_words(
    word_counts: dict[str, int], alphabet: set[str], prefix: str
) -> tuple[list[list[str]], list[int], list[str]]:
    """Split each word into characters (``h ##u ##g``); return the words, their counts and the sorted initial symbols.

    Like tokenizers' trainer, every character of the alphabet is a symbol as a word start, and prefixed where it
    continues a word. Words with characters outside the alphabet are left out.
    """
    split_words: list[list[str]] = []
    counts: list[int] = []
    initial: set[str] = set(alphabet)
    for word in sorted(word_counts):
        if not word or not set(word) <= alphabet:
            continue
        pieces = [word[0]] + [prefix + char for char in word[1:]]
        initial.update(pieces)
        split_words.append(pieces)
        counts.append(word_counts[word])
    return split_words, counts, sorted(initial)


class _Merger:
    """The symbols of every word and the pair statistics, kept up to date merge by merge.

    Symbols are interned as ints in order of age (the sorted alphabet, then the merges), which is also the tie-break.
    A merge only revisits the words that contain the merged pair. Scores live in a lazily invalidated heap: when a
    pair's score changes a fresh entry is pushed, and a popped entry counts only if it is still the pair's score.
    """

    def __init__(
        self, words: list[list[str]], counts: list[int], initial: list[str], criterion: str, min_frequency: int
    ) -> None:
        self.symbols: list[str] = list(initial)
        self.symbol_ids = {symbol: index for index, symbol in enumerate(self.symbols)}
        self.words = [[self.symbol_ids[piece] for piece in pieces] for pieces in words]
        self.counts = counts
        self.likelihood = criterion == "likelihood"
        self.min_frequency = min_frequency
        self.symbol_freq = [0] * len(self.symbols)
        self.pair_freq: dict[tuple[int, int], int] = {}
        self.pair_words: dict[tuple[int, int], set[int]] = {}  # which words contain the pair
        self.symbol_pairs: dict[int, set[tuple[int, int]]] = {}  # which pairs contain the symbol
        for index, (word, count) in enumerate(zip(self.words, counts)):
            for symbol in word:
                self.symbol_freq[symbol] += count
            for pair in zip(word, word[1:]):
                self.pair_freq[pair] = self.pair_freq.get(pair, 0) + count
                self.pair_words.setdefault(pair, set()).add(index)
        for pair in self.pair_freq:
            self._link(pair)
        self._rebuild_heap()

    def score(self, pair: tuple[int, int]) -> float:
        """Lower is better: minus the frequency, or minus ``freq(a, b) / (freq(a) * freq(b))`` for likelihood."""
        frequency = self.pair_freq[pair]
        if self.likelihood:
            return -frequency / (self.symbol_freq[pair[0]] * self.symbol_freq[pair[1]])
        return -frequency

    def pop_best(self) -> tuple[int, int] | None:
        """Remove and return the best pair that occurs at least ``min_frequency`` times, or None if there is none."""
        while self.heap:
            score, pair = heapq.heappop(self.heap)
            if pair in self.pair_freq and score == self.score(pair) and self.pair_freq[pair] >= self.min_frequency:
                return pair
            # else stale, or too rare (a later rise in its frequency pushes it again)
        return None

    def merge(self, pair: tuple[int, int], new_string: str) -> None:
        """Replace ``pair`` by the symbol ``new_string`` in every word that contains it, updating the statistics."""
        first, second = pair
        if new_string not in self.symbol_ids:
            self.symbol_ids[new_string] = len(self.symbols)
            self.symbols.append(new_string)
            self.symbol_freq.append(0)
        new = self.symbol_ids[new_string]
        delta: Counter[tuple[int, int]] = Counter()  # the net change of each pair's frequency
        for index in list(self.pair_words[pair]):
            self._rewrite(index, first, second, new, delta)

        changed = {p for p, d in delta.items() if d}
        for p in changed:
            frequency = self.pair_freq.get(p, 0) + delta[p]
            if frequency > 0:
                self.pair_freq[p] = frequency
                self._link(p)
            else:
                del self.pair_freq[p], self.pair_words[p]
                self.symbol_pairs[p[0]].discard(p)
                self.symbol_pairs[p[1]].discard(p)
        if self.likelihood:
            # The symbol frequencies changed too: fewer `first` and `second` raise the score of the pairs they are
            # part of; more `new` (when its string already existed) lowers the score of its older pairs.
            for symbol in (first, second, new):
                changed.update(self.symbol_pairs.get(symbol, ()))
        for p in changed:
            # Pairs rarer than min_frequency need no entry: only a rise in frequency can make them eligible.
            if self.pair_freq.get(p, 0) >= max(self.min_frequency, 1):
                heapq.heappush(self.heap, (self.score(p), p))
        if len(self.heap) > 4 * len(self.pair_freq) + 1024:  # drop stale entries before they dominate the heap
            self._rebuild_heap()

    def _rewrite(self, index: int, first: int, second: int, new: int, delta: Counter[tuple[int, int]]) -> None:
        word, count = self.words[index], self.counts[index]
        for old in zip(word, word[1:]):
            delta[old] -= count
            self.pair_words[old].discard(index)
        merged: list[int] = []
        position = 0
        while position < len(word):
            if position + 1 < len(word) and word[position] == first and word[position + 1] == second:
                merged.append(new)
                self.symbol_freq[first] -= count
                self.symbol_freq[second] -= count
                self.symbol_freq[new] += count
                position += 2
            else:
                merged.append(word[position])
                position += 1
        self.words[index] = merged
        for added in zip(merged, merged[1:]):
            delta[added] += count
            self.pair_words.setdefault(added, set()).add(index)

    def _link(self, pair: tuple[int, int]) -> None:
        self.symbol_pairs.setdefault(pair[0], set()).add(pair)
        self.symbol_pairs.setdefault(pair[1], set()).add(pair)

    def _rebuild_heap(self) -> None:
        self.heap = [(self.score(p), p) for p, frequency in self.pair_freq.items() if frequency >= self.min_frequency]
        heapq.heapify(self.heap)


__all__ = ["CRITERIA", "count_words", "train_wordpiece", "train_wordpiece_likelihood"]
