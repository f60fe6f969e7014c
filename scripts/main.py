#!/usr/bin/env python
"""The main job (`make demo`): lmblocks end to end on CPU, in about a quarter of an hour on 2 cores.

1. Train a tokenizer per family (byte-level BPE for GPT-2, SentencePiece-style BPE for LLaMA, WordPiece for BERT)
   on the corpus.
2. Pretrain a small GPT-2, a small LLaMA (causal LM) and a small BERT (masked LM + next-sentence prediction) for a few
   minutes each, with a progress bar and the live loss, holding out the end of the corpus for perplexity.
3. Save each with its tokenizer and modelling code, reload each through `AutoTokenizer` / `AutoModel*`.
4. Generate a sample from the two decoders, and let BERT fill in a masked word.
5. LoRA-fine-tune GPT-2 to tell which book a passage comes from (with the GPT auxiliary LM loss, λ = 0.5) and merge
   the adapter for export.
6. Write the report: a loss-curve PNG per model and `report.md` (losses, perplexities, tokens/s, checkpoints).

The default corpus is the public-domain books cached by `scripts/fetch_assets.py` in `.cache/corpus/`. Replace it
with `--corpus FILE [FILE ...]` or `--dataset_name NAME_OR_SAVED_FOLDER [--text_column text]`.

Usage: python scripts/main.py [--output_dir outputs/main] [--minutes_per_model 3] [--corpus a.txt b.txt]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CORPUS = [REPO_ROOT / ".cache" / "corpus" / f"{name}.txt"
                  for name in ("alice29", "asyoulik", "lcet10", "plrabn12", "botchan")]

# Small models that learn visibly in a few CPU minutes (a few million parameters each).
MODEL_SETTINGS = {
    "gpt2": dict(preset="small", overrides="n_embd=256,n_layer=4,n_head=4,n_positions=256"),
    "llama": dict(preset="tiny", overrides="hidden_size=256,intermediate_size=688,num_hidden_layers=4,"
                                           "num_attention_heads=4,num_key_value_heads=2"),
    "bert": dict(preset="tiny", overrides="hidden_size=256,intermediate_size=1024,num_hidden_layers=4,"
                                          "num_attention_heads=4"),
}
QUICK_OVERRIDES = {
    "gpt2": "n_embd=32,n_layer=1,n_head=2,n_positions=64",
    "llama": "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1",
    "bert": "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,max_position_embeddings=64",
}
PROMPTS = {"gpt2": "Alice was beginning to", "llama": "It was the best of"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus = parser.add_mutually_exclusive_group()
    corpus.add_argument("--corpus", nargs="+", help="Text files to use instead of the default corpus.")
    corpus.add_argument("--dataset_name", help="A datasets dataset (name, or a save_to_disk folder) instead.")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "main"))
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama", "bert"], choices=["gpt2", "llama", "bert"])
    parser.add_argument("--minutes_per_model", type=float, default=3.0, help="Pretraining time per model.")
    parser.add_argument("--finetune_minutes", type=float, default=1.0, help="LoRA fine-tuning time.")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="Minute-long smoke run with tiny models (for tests).")
    return parser.parse_args(argv)


def load_texts(args) -> tuple[list[str], str]:
    from lmblocks.data import load_corpus, read_text_files

    if args.dataset_name:
        return load_corpus(None, args.dataset_name, args.dataset_config_name, "train", args.text_column), \
            args.dataset_name
    if args.corpus:
        return read_text_files(args.corpus), ", ".join(Path(p).name for p in args.corpus)
    missing = [p for p in DEFAULT_CORPUS if not p.exists()]
    if missing:
        from lmblocks.training import UsageError

        raise UsageError(f"The default corpus is not cached ({missing[0]} is missing). Run "
                         f"`python scripts/fetch_assets.py` (`make demo` does) or pass --corpus FILE ...")
    return read_text_files(DEFAULT_CORPUS), "Canterbury corpus books + botchan"


def train_tokenizers(args, texts, out: Path) -> dict[str, Path]:
    from lmblocks.tokenization_trainer import save_tokenizer, train_tokenizer

    paths = {}
    vocab_size = 512 if args.quick else args.vocab_size
    for family in args.families:
        start = time.time()
        tokenizer = train_tokenizer(iter(texts), family, vocab_size=vocab_size, min_frequency=2,
                                    max_token_length=16, show_progress=False)
        path = out / "tokenizers" / family
        save_tokenizer(tokenizer, path)
        paths[family] = path
        n_tokens = sum(len(ids) for ids in tokenizer(texts[:1], add_special_tokens=False)["input_ids"])
        print(f"[main] {family} tokenizer: {len(tokenizer)} tokens, trained in {time.time() - start:.1f}s "
              f"({len(texts[0])} characters of the first document -> {n_tokens} tokens)", flush=True)
    return paths


def pretrain(args, family: str, tokenizer_path: Path, out: Path, texts_source: list[str]) -> dict:
    import pretrain as pretrain_script

    settings = MODEL_SETTINGS[family]
    overrides = QUICK_OVERRIDES[family] if args.quick else settings["overrides"]
    seconds = 4 if args.quick else args.minutes_per_model * 60
    block_size = 32 if args.quick else args.block_size
    eval_steps = 10 if args.quick else 50
    argv = [
        "--model_family", family, "--preset", settings["preset"], "--config_overrides", overrides,
        "--tokenizer_name_or_path", str(tokenizer_path), "--output_dir", str(out / family),
        "--block_size", str(block_size), "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", "32", "--learning_rate", "1e-3" if family != "bert" else "5e-4",
        "--warmup_steps", "20" if not args.quick else "2",
        "--lr_scheduler_type", "cosine", "--weight_decay", "0.01", "--max_grad_norm", "1.0",
        "--time_budget_seconds", str(seconds), "--num_train_epochs", "50",
        "--logging_steps", "5" if not args.quick else "1", "--eval_strategy", "steps", "--eval_steps", str(eval_steps),
        "--save_strategy", "no", "--report_to", "none", "--seed", str(args.seed), "--dataloader_pin_memory", "false",
        "--eval_fraction", "0.05", "--tokenizer_vocab_size", str(args.vocab_size),
    ]
    argv += _corpus_argv(args, texts_source)
    print(f"\n[main] === pretraining {family} for ~{seconds / 60:.1f} min ===", flush=True)
    return pretrain_script.main(argv)


def _corpus_argv(args, default_files) -> list[str]:
    if args.dataset_name:
        argv = ["--dataset_name", args.dataset_name, "--text_column", args.text_column]
        return argv + (["--dataset_config_name", args.dataset_config_name] if args.dataset_config_name else [])
    return ["--train_files", *[str(p) for p in (args.corpus or default_files)]]


def reload_and_sample(family: str, path: Path, quick: bool) -> dict:
    """Reload through the Auto classes and show what the model learned."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if family == "bert":
        model = AutoModelForPreTraining.from_pretrained(path).eval()
        masked_lm = AutoModelForMaskedLM.from_pretrained(path).eval()  # the MLM head alone, same weights
        text = f"alice was beginning to get very {tokenizer.mask_token} of sitting by her sister."
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = masked_lm(**enc).logits
        position = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0]
        top = logits[0, position].topk(5).indices.tolist()
        guesses = [tokenizer.decode([i]).strip() for i in top]
        sample = f"{text}\n  top guesses for {tokenizer.mask_token}: {', '.join(guesses)}"
        return {"class": f"{type(model).__name__} / {type(masked_lm).__name__}", "sample": sample}
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = PROMPTS[family]
    ids = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12 if quick else 40, do_sample=True, top_k=40, temperature=0.8,
                             repetition_penalty=1.1, pad_token_id=tokenizer.eos_token_id)
    return {"class": type(model).__name__, "sample": tokenizer.decode(out[0], skip_special_tokens=True)}


def book_classification_rows(paths_or_texts: list[str], names: list[str], n_per_book: int, seed: int) -> list[dict]:
    """Passages of 40 words labelled with the book they come from."""
    import random

    rng = random.Random(seed)
    rows = []
    for text, name in zip(paths_or_texts, names):
        words = text.split()
        for _ in range(n_per_book):
            start = rng.randrange(0, max(1, len(words) - 40))
            rows.append({"text": " ".join(words[start:start + 40]), "label": name})
    rng.shuffle(rows)
    return rows


def lora_finetune(args, texts: list[str], names: list[str], base: Path, out: Path) -> dict:
    import finetune as finetune_script

    data = out / "finetune_data" / "books.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    rows = book_classification_rows(texts, names, 20 if args.quick else 200, args.seed)
    data.write_text("\n".join(json.dumps(r) for r in rows))
    seconds = 5 if args.quick else args.finetune_minutes * 60
    argv = [
        "--model_name_or_path", str(base), "--task", "seq_cls", "--train_file", str(data),
        "--lm_loss_weight", "0.5", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.05", "--merge_lora",
        "--output_dir", str(out / "gpt2-books-lora"), "--max_length", "64", "--learning_rate", "2e-3",
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "32",
        "--num_train_epochs", "1" if args.quick else "3", "--logging_steps", "5", "--eval_strategy", "no",
        "--save_strategy", "no", "--report_to", "none", "--seed", str(args.seed), "--dataloader_pin_memory", "false",
        "--time_budget_seconds", str(seconds),
    ]
    print(f"\n[main] === LoRA fine-tuning GPT-2: which book is a passage from? ({len(rows)} passages, "
          f"{len(set(names))} books) ===", flush=True)
    return finetune_script.main(argv + (["--max_steps", "2"] if args.quick else []))


def plot_losses(family: str, path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads((path / "trainer_state.json").read_text())["log_history"]
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held_out = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)" if family != "bert" else "MLM + NSP loss")
    ax.set_title(f"lmblocks {family}: pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def write_report(out: Path, corpus_name: str, results: dict, samples: dict, finetune: dict | None,
                 wall_seconds: float, gaps: list[str]) -> Path:
    lines = [
        "# lmblocks main job: report",
        "",
        f"Corpus: {corpus_name}. Wall time: {wall_seconds / 60:.1f} min on {os.cpu_count()} CPU cores.",
        "",
        "| model | parameters | steps | final training loss | held-out loss | held-out perplexity | tokens/s | "
        "checkpoint |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, m in results.items():
        lines.append(
            f"| {family} | {m['n_parameters'] / 1e6:.2f}M | {m['train_steps']} | {m.get('final_train_loss', math.nan):.3f} "
            f"| {m.get('eval_loss', math.nan):.3f} | {m.get('perplexity', math.nan):.1f} | "
            f"{m['tokens_per_second']:.0f} | `{m['output_dir']}` |"
        )
    if "bert" in results:
        lines += ["", "BERT's losses are MLM + NSP; its perplexity is exp of that sum, over masked tokens, and not "
                      "comparable with the decoders'. Perplexities of different tokenizers are per token of their "
                      "own vocabularies."]
    lines += ["", "## Loss curves", ""]
    lines += [f"![{family}]({family}_loss.png)" for family in results]
    lines += ["", "## Samples (after reloading through the Auto classes)", ""]
    for family, s in samples.items():
        lines += [f"**{family}** (`{s['class']}`):", "", "```", s["sample"], "```", ""]
    if finetune:
        lines += [
            "## LoRA fine-tuning",
            "",
            f"GPT-2 + LoRA (r=8) as a sequence classifier: which book a 40-word passage comes from, with the GPT "
            f"auxiliary LM loss (λ = 0.5). Held-out accuracy {finetune.get('accuracy', math.nan):.3f}, final "
            f"training loss {finetune.get('final_train_loss', math.nan):.3f}, "
            f"{finetune['trainable_parameters']:,} trainable parameters. Merged checkpoint: "
            f"`{finetune['output_dir']}` (the adapter alone in `adapter/`).",
            "",
        ]
    if gaps:
        lines += ["## Not run", ""] + [f"- {g}" for g in gaps] + [""]
    lines += ["Reload any checkpoint with `AutoModelForCausalLM.from_pretrained(path)` after `import lmblocks`, or with "
              "`trust_remote_code=True` where lmblocks is not installed; sample with "
              "`python scripts/generate.py --model_name_or_path PATH --prompt ...`.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv=None) -> Path:
    args = parse_args(argv)
    start = time.time()
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import lmblocks  # noqa: F401  (registers the families with the Auto classes)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    texts, corpus_name = load_texts(args)
    print(f"[main] corpus: {corpus_name}: {len(texts)} documents, {sum(map(len, texts)):,} characters", flush=True)
    if args.quick:
        texts = [t[:20000] for t in texts]
    tokenizer_paths = train_tokenizers(args, texts, out)

    # The pretraining script reads files itself; in quick mode it gets the shortened texts through a temp corpus.
    corpus_files = DEFAULT_CORPUS
    if args.quick and not args.dataset_name:
        quick_dir = out / "quick_corpus"
        quick_dir.mkdir(exist_ok=True)
        corpus_files = []
        for i, text in enumerate(texts):
            (quick_dir / f"doc{i}.txt").write_text(text)
            corpus_files.append(quick_dir / f"doc{i}.txt")
        args.corpus = [str(p) for p in corpus_files]

    results, samples, gaps = {}, {}, []
    for family in args.families:
        results[family] = pretrain(args, family, tokenizer_paths[family], out, corpus_files)
    for family in args.families:
        samples[family] = reload_and_sample(family, Path(results[family]["output_dir"]), args.quick)
        print(f"\n[main] {family} reloaded as {samples[family]['class']}:\n  {samples[family]['sample']}", flush=True)
        plot_losses(family, Path(results[family]["output_dir"]), out / f"{family}_loss.png")

    finetune_metrics = None
    if "gpt2" in results:
        names = [Path(p).stem for p in args.corpus] if args.corpus else \
            ([p.stem for p in DEFAULT_CORPUS] if not args.dataset_name else None)
        if names is None or len(set(names)) < 2:
            gaps.append("LoRA fine-tuning: the book-classification task needs at least two corpus files.")
        else:
            finetune_metrics = lora_finetune(args, texts, names, Path(results["gpt2"]["output_dir"]), out)
    else:
        gaps.append("LoRA fine-tuning runs on GPT-2, which was not among --families.")

    report = write_report(out, corpus_name, results, samples, finetune_metrics, time.time() - start, gaps)
    print(f"\n[main] done in {(time.time() - start) / 60:.1f} min. Report: {report}", flush=True)
    return report


if __name__ == "__main__":
    from lmblocks.training import run_cli

    run_cli(main)
