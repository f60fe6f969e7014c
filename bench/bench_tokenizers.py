"""Tokenizer-training throughput and peak memory: lmblocks' trainers against the bare ones.

For each trainer, one fresh Python process trains on the same corpus and reports its training time and its own peak
RSS (``ru_maxrss``, imports included; the RSS after imports is reported too). Trainers: lmblocks' gpt2, llama, bert
(frequency and likelihood WordPiece, both lmblocks' own deterministic merge loop in Python); the bare ``tokenizers``
trainers configured the same way (byte-level BPE, Metaspace BPE, WordPieceTrainer: Rust, but not reproducible run to
run); and SentencePiece BPE. Then one streaming run trains the gpt2 kind from a generator
of about 1 GB of text, never held in memory.

The corpus is the default one (the Canterbury books from the brotli sdist and botchan.txt from the sentencepiece sdist,
fetched into ``.cache/corpus/`` by ``scripts/fetch_assets.py``), its lines shuffled and repeated to ``--corpus_mb``.

    python bench/bench_tokenizers.py            # 50 MB corpus, 1 GB stream
    python bench/bench_tokenizers.py --quick    # 4 MB corpus, 64 MB stream

Writes ``bench/results/tokenizers.jsonl`` (one JSON object per measurement) and ``bench/results/tokenizers.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import random
import resource
import runpy
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CORPUS_DIR = REPO / ".cache" / "corpus"
CORPUS_FILES = ["alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt", "botchan.txt"]

# name -> (what it is, the lmblocks trainer it is the bare counterpart of)
TRAINERS = {
    "lmb-gpt2": ("lmblocks gpt2: byte-level BPE", None),
    "bare-bpe-bytelevel": ("tokenizers BpeTrainer, ByteLevel", "lmb-gpt2"),
    "lmb-llama": ("lmblocks llama: Metaspace BPE + byte fallback", None),
    "bare-bpe-metaspace": ("tokenizers BpeTrainer, line-break Split + Metaspace", "lmb-llama"),
    "lmb-bert-frequency": ("lmblocks bert, frequency WordPiece (own deterministic merge loop)", None),
    "bare-wordpiece": ("tokenizers WordPieceTrainer, BERT normaliser", "lmb-bert-frequency"),
    "lmb-bert-likelihood": ("lmblocks bert, likelihood WordPiece", None),
    "sentencepiece-bpe": ("sentencepiece BPE (byte fallback)", None),
}


# ----------------------------------------------------------------------------------------------------------------------
# Corpus


def base_lines() -> list[str]:
    """The default corpus as non-blank lines, fetching it first if needed."""
    if not all((CORPUS_DIR / name).exists() for name in CORPUS_FILES):
        runpy.run_path(str(REPO / "scripts" / "fetch_assets.py"))["fetch_corpus"](REPO / ".cache")
    lines = []
    for name in CORPUS_FILES:
        text = (CORPUS_DIR / name).read_text(encoding="utf-8-sig")  # botchan.txt starts with a BOM
        lines += [line for line in text.splitlines() if line.strip()]
    return lines


def shuffled_lines(lines: list[str], total_bytes: int, seed: int = 0) -> Iterator[str]:
    """Yield the lines, reshuffled on every repetition, until ``total_bytes`` of UTF-8 text have been yielded."""
    rng = random.Random(seed)
    lines = list(lines)
    produced = 0
    while produced < total_bytes:
        rng.shuffle(lines)
        for line in lines:
            yield line + "\n"
            produced += len(line.encode("utf-8")) + 1
            if produced >= total_bytes:
                return


def build_corpus(megabytes: float) -> Path:
    path = REPO / ".cache" / "bench" / f"corpus_{megabytes:g}MB.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as handle:
            handle.writelines(shuffled_lines(base_lines(), int(megabytes * 1e6)))
        path.with_suffix(".tmp").rename(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one JSON line


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(name: str, corpus: str, vocab_size: int) -> None:
    """Train ``name`` on the file ``corpus`` and return nothing: the timing is taken around this call."""
    if name.startswith("lmb-"):
        from lmblocks.tokenization_trainer import train_tokenizer

        kind, _, criterion = name.removeprefix("lmb-").partition("-")
        train_tokenizer(corpus, kind, vocab_size=vocab_size, wordpiece_criterion=criterion or None, show_progress=False)
        return
    if name == "sentencepiece-bpe":
        import tempfile

        import sentencepiece as spm

        with tempfile.TemporaryDirectory() as scratch:
            spm.SentencePieceTrainer.train(
                input=corpus, model_prefix=os.path.join(scratch, "spm"), model_type="bpe", vocab_size=vocab_size,
                byte_fallback=True, character_coverage=1.0, num_threads=os.cpu_count(), minloglevel=2,
            )
        return

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = {"bare-bpe-bytelevel": ["<|endoftext|>"], "bare-bpe-metaspace": ["<unk>", "<s>", "</s>"]}
    if name == "bare-wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer()
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            show_progress=False,
        )
    elif name == "bare-bpe-bytelevel":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, special_tokens=specials[name],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        # The pre-tokenisation lmblocks' llama kind trains with (line breaks isolated, so no merge crosses one), so
        # that "vs bare" measures lmblocks' own overhead, not a different split.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\r?\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        ])
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 256, min_frequency=2, special_tokens=specials[name], show_progress=False
        )
    tokenizer.train([corpus], trainer)


def worker(args: argparse.Namespace) -> None:
    if args.worker == "stream-gpt2":
        from lmblocks.tokenization_trainer import train_tokenizer

        lines = base_lines()
        rss_before = peak_rss_mb()
        start = time.perf_counter()
        train_tokenizer(shuffled_lines(lines, int(args.stream_mb * 1e6)), "gpt2", vocab_size=args.vocab_size,
                        show_progress=False)
        corpus_mb = args.stream_mb
    else:
        # Imports are not part of the timing: lmblocks pulls in torch and transformers.
        if args.worker.startswith("lmb-"):
            import lmblocks.tokenization_trainer  # noqa: F401
        import tokenizers  # noqa: F401

        rss_before = peak_rss_mb()
        start = time.perf_counter()
        train(args.worker, args.corpus, args.vocab_size)
        corpus_mb = os.path.getsize(args.corpus) / 1e6
    seconds = time.perf_counter() - start
    print(json.dumps({
        "trainer": args.worker, "corpus_mb": round(corpus_mb, 1), "seconds": round(seconds, 2),
        "mb_per_s": round(corpus_mb / seconds, 2), "rss_after_imports_mb": round(rss_before),
        "peak_rss_mb": round(peak_rss_mb()), "vocab_size": args.vocab_size,
    }))


# ----------------------------------------------------------------------------------------------------------------------
# Driver


def run_worker(name: str, args: argparse.Namespace, corpus: Path) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--corpus", str(corpus),
               "--vocab_size", str(args.vocab_size), "--stream_mb", str(args.stream_mb)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name:22s} {result['seconds']:8.2f} s {result['mb_per_s']:7.2f} MB/s {result['peak_rss_mb']:6d} MB",
          flush=True)
    return result


def markdown(results: list[dict], machine: str) -> str:
    by_name = {r["trainer"]: r for r in results}
    rows = [
        "| trainer | what | corpus (MB) | time (s) | MB/s | vs bare | peak RSS (MB) | after imports (MB) "
        "| training (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        name = result["trainer"]
        what, _ = TRAINERS.get(name, ("lmblocks gpt2 from a generator (streaming)", None))
        bare = next((b for b, (_, of) in TRAINERS.items() if of == name), None)
        versus = f"{result['seconds'] / by_name[bare]['seconds'] - 1:+.0%}" if bare in by_name else ""
        if name == "lmb-bert-likelihood" and "lmb-bert-frequency" in by_name:
            versus = f"{result['seconds'] / by_name['lmb-bert-frequency']['seconds']:.1f}× frequency"
        rows.append(
            f"| {name} | {what} | {result['corpus_mb']} | {result['seconds']} | {result['mb_per_s']} | {versus} | "
            f"{result['peak_rss_mb']} | {result['rss_after_imports_mb']} | "
            f"{result['peak_rss_mb'] - result['rss_after_imports_mb']} |"
        )
    header = (
        f"Machine: {machine}; load average {os.getloadavg()[0]:.1f} at the end. "
        f"vocab_size {results[0]['vocab_size']}, min_frequency 2."
    )
    return header + "\n\n" + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 MB corpus and a 64 MB stream")
    parser.add_argument("--corpus_mb", type=float, default=50)
    parser.add_argument("--stream_mb", type=float, default=1000)
    parser.add_argument("--vocab_size", type=int, default=16000)
    parser.add_argument("--only", nargs="*", help="run only these trainers (names as in the table)")
    parser.add_argument("--stem", help="name of the result files in bench/results/ (default: tokenizers, or "
                                       "tokenizers_quick with --quick)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.corpus_mb, args.stream_mb = 4, 64

    corpus = build_corpus(args.corpus_mb)
    date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    machine = (f"{date} · {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"tokenizers {importlib.metadata.version('tokenizers')}")
    print(f"corpus {corpus} ({os.path.getsize(corpus) / 1e6:.1f} MB); {machine}", flush=True)
    names = args.only or [*TRAINERS, "stream-gpt2"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("tokenizers_quick" if args.quick else "tokenizers")
    results = []
    with open(RESULTS / f"{stem}.jsonl", "w", encoding="utf-8") as handle:
        for name in names:  # written as they come, so an interrupted run keeps what it measured
            results.append(run_worker(name, args, corpus))
            handle.write(json.dumps({**results[-1], "machine": machine}) + "\n")
            handle.flush()
    (RESULTS / f"{stem}.md").write_text(markdown(results, machine), encoding="utf-8")
    print(markdown(results, machine))


if __name__ == "__main__":
    main()
