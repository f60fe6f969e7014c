"""WordPiece training by the likelihood criterion.

Two ways to grow a WordPiece vocabulary from a count of words, both starting from the characters of the
words (``h ##u ##g`` for ``hug``) and merging one adjacent pair of symbols per step:

* **frequency** (what ``tokenizers.trainers.WordPieceTrainer`` does: it is the BPE trainer underneath) merges the pair
  that occurs most often, ``freq(a, b)``.
* **likelihood** (WordPiece as defined by Schuster & Nakajima and used for BERT) merges the pair that most increases
  the likelihood of the corpus under a unigram model of the symbols, which is the pair with the highest
  ``freq(a, b) / (freq(a) * freq(b))``. It prefers pairs whose parts rarely occur apart, so it learns the whole of a
  rare but cohesive word before the frequent fragments shared by many words.

Example (the corpus ``hug``×10, ``pug``×5, ``pun``×12, ``bun``×4, ``hugs``×5): frequency merges ``##u ##g`` (20
occurrences) first; likelihood merges ``##g ##s`` first, since ``5 / (20 * 5) = 1/20`` beats the ``1/36`` of every other
pair.

This module holds the likelihood trainer. Words are counted by the Rust normaliser and pre-tokeniser
(:func:`count_words`); the merge loop (:func:`train_wordpiece_likelihood`) runs in Python on those counts and keeps its
pair statistics up to date incrementally: a merge only revisits the words that contain the merged pair and only
re-scores the pairs that touch the merged symbols, with a lazily invalidated heap to find the best pair. The resulting
vocabulary goes into a ``tokenizers.models.WordPiece`` model, so encoding runs in Rust.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Sequence
from operator import itemgetter

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


def train_wordpiece_likelihood(
    word_counts: dict[str, int],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    min_frequency: int = 0,
    limit_alphabet: int | None = None,
    max_token_length: int | None = None,
    prefix: str = "##",
    show_progress: bool = False,
) -> dict[str, int]:
    """Grow a WordPiece vocabulary from ``word_counts`` by the likelihood criterion (see the module docstring).

    The vocabulary is the special tokens, then the alphabet (each character, and ``prefix`` + each character that
    continues a word, sorted), then the merged symbols in the order they were learnt. Merging stops at
    ``vocab_size`` tokens or when no pair occurs at least ``min_frequency`` times. With ``limit_alphabet``, only the
    most frequent characters are kept, and words with other characters are left out (WordPiece encodes them as unknown).
    ``max_token_length`` bounds the length of a merged symbol in characters, not counting ``prefix``. Ties in score go
    to the pair whose symbols sort first, so the result is deterministic.

    >>> vocab = train_wordpiece_likelihood({"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5}, vocab_size=12)
    >>> list(vocab)[-1]
    '##gs'

    Raises:
        ValueError: if ``vocab_size`` cannot hold the special tokens and the alphabet.
    """
    # The alphabet: characters weighted by how often their words occur.
    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count
    kept = sorted(char_counts, key=lambda c: (-char_counts[c], c))[:limit_alphabet]
    alphabet = set(kept)

    # Symbols are interned as ints; `symbols` maps id -> string, `symbol_ids` the reverse.
    symbols: list[str] = []
    symbol_ids: dict[str, int] = {}

    def intern(symbol: str) -> int:
        if symbol not in symbol_ids:
            symbol_ids[symbol] = len(symbols)
            symbols.append(symbol)
        return symbol_ids[symbol]

    # Like tokenizers' trainer: every character as a word start, and prefixed where it continues a word.
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
    for symbol in sorted(initial):
        intern(symbol)
    words_ids = [[symbol_ids[piece] for piece in pieces] for pieces in split_words]

    vocab: dict[str, int] = {}
    for token in [*special_tokens, *sorted(initial)]:
        vocab.setdefault(token, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {len(special_tokens)} special tokens plus the "
            f"{len(initial)}-symbol alphabet ({len(vocab)}); raise vocab_size or set limit_alphabet"
        )

    symbol_freq = [0] * len(symbols)
    pair_freq: dict[tuple[int, int], int] = {}
    pair_words: dict[tuple[int, int], set[int]] = {}  # which words contain the pair
    symbol_pairs: dict[int, set[tuple[int, int]]] = {}  # which pairs contain the symbol
    for index, (word, count) in enumerate(zip(words_ids, counts)):
        for symbol in word:
            symbol_freq[symbol] += count
        for pair in zip(word, word[1:]):
            pair_freq[pair] = pair_freq.get(pair, 0) + count
            pair_words.setdefault(pair, set()).add(index)
    for a, b in pair_freq:
        symbol_pairs.setdefault(a, set()).add((a, b))
        symbol_pairs.setdefault(b, set()).add((a, b))

    def heap_entry(pair: tuple[int, int]) -> tuple[float, tuple[int, int]]:
        # Ties go to the pair of older symbols (ids follow the sorted alphabet, then the merge order).
        return (-pair_freq[pair] / (symbol_freq[pair[0]] * symbol_freq[pair[1]]), pair)

    # Entries go stale when a pair's score changes: a fresh entry is pushed then, and a popped entry counts only if
    # it is still the pair's current entry.
    heap = [heap_entry(pair) for pair, frequency in pair_freq.items() if frequency >= min_frequency]
    heapq.heapify(heap)

    progress = tqdm(total=vocab_size - len(vocab), desc="WordPiece merges", disable=not show_progress)
    while len(vocab) < vocab_size and heap:
        entry = heapq.heappop(heap)
        pair = entry[1]
        if pair not in pair_freq or entry != heap_entry(pair) or pair_freq[pair] < min_frequency:
            continue  # stale, or too rare (a later increase in its frequency pushes it again)
        new_string = symbols[pair[0]] + symbols[pair[1]].removeprefix(prefix)
        if max_token_length is not None and len(new_string.removeprefix(prefix)) > max_token_length:
            continue
        first, second = pair
        new = intern(new_string)
        if new == len(symbol_freq):
            symbol_freq.append(0)
        if new_string not in vocab:
            vocab[new_string] = len(vocab)
            progress.update(1)

        # Rewrite every word that contains the pair, collecting the net change of each pair's frequency.
        delta: Counter[tuple[int, int]] = Counter()
        for index in list(pair_words[pair]):
            word, count = words_ids[index], counts[index]
            for old in zip(word, word[1:]):
                delta[old] -= count
                pair_words[old].discard(index)
            merged: list[int] = []
            position = 0
            while position < len(word):
                if position + 1 < len(word) and word[position] == first and word[position + 1] == second:
                    merged.append(new)
                    symbol_freq[first] -= count
                    symbol_freq[second] -= count
                    symbol_freq[new] += count
                    position += 2
                else:
                    merged.append(word[position])
                    position += 1
            words_ids[index] = merged
            for added in zip(merged, merged[1:]):
                delta[added] += count
                pair_words.setdefault(added, set()).add(index)

        changed = {p for p, d in delta.items() if d}
        for p in changed:
            frequency = pair_freq.get(p, 0) + delta[p]
            if frequency > 0:
                pair_freq[p] = frequency
                symbol_pairs.setdefault(p[0], set()).add(p)
                symbol_pairs.setdefault(p[1], set()).add(p)
            else:
                del pair_freq[p], pair_words[p]
                symbol_pairs[p[0]].discard(p)
                symbol_pairs[p[1]].discard(p)
        # The symbol frequencies changed too: fewer `first` and `second` raise the score of the pairs they are part of;
        # more `new` (when its string already existed) lowers the score of its older pairs.
        # Pairs rarer than min_frequency need no entry: only a rise in frequency, pushed above, can make them eligible.
        changed.update(symbol_pairs.get(first, ()), symbol_pairs.get(second, ()), symbol_pairs.get(new, ()))
        for p in changed:
            frequency = pair_freq.get(p, 0)
            if frequency and frequency >= min_frequency:
                heapq.heappush(heap, (-frequency / (symbol_freq[p[0]] * symbol_freq[p[1]]), p))
        if len(heap) > 4 * len(pair_freq) + 1024:  # drop stale entries before they dominate the heap
            heap = [heap_entry(p) for p, frequency in pair_freq.items() if frequency >= min_frequency]
            heapq.heapify(heap)
    progress.close()
    return vocab


__all__ = ["count_words", "train_wordpiece_likelihood"]
