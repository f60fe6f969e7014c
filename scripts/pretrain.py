#!/usr/bin/env python
"""Pretrain an lmblocks model from scratch (or continue from a checkpoint) on text files or a `datasets` dataset.

Decoders (GPT-2, LLaMA, Qwen2) train as causal language models on the corpus packed into blocks of `--block_size`
tokens; BERT trains with masked-LM + next-sentence prediction (each family's `objective` in `lmblocks.FAMILIES`).
The held-out end of the corpus gives the evaluation perplexity. Everything `TrainingArguments` offers works as in
transformers' example scripts (`--output_dir`, `--per_device_train_batch_size`, `--gradient_accumulation_steps`,
`--activation_checkpointing`, `--bf16`, `--report_to`, `--resume_from_checkpoint`, `--push_to_hub`, ...), and so does
`accelerate launch` / `torchrun`.

Examples:
    python scripts/pretrain.py --model_family gpt2 --preset small --train_files .cache/corpus/*.txt \\
        --output_dir outputs/gpt2 --max_steps 500 --per_device_train_batch_size 16
    python scripts/pretrain.py --model_family llama --preset tiny --dataset_name my_dataset_dir --text_column text \\
        --tokenizer_name_or_path outputs/gpt2 --output_dir outputs/llama
    accelerate launch --num_processes 2 scripts/pretrain.py --model_family gpt2 --preset tiny ...

The finished folder holds the model (safetensors), its code (`auto_map`, loads with `trust_remote_code=True` where
lmblocks is not installed), the tokenizer, a model card (README.md) and `all_results.json`. It is written to a
staging folder first and its config.json lands last, so an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # --help without the heavy imports below, when it was printed before
    from _help_cache import print_cached_help

    print_cached_help(__file__)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from transformers import TrainingArguments  # noqa: E402

from lmblocks.cli import UsageError, parse_arguments, run_script  # noqa: E402
from lmblocks.data import CorpusError, load_corpus, pack_causal_lm  # noqa: E402
from lmblocks.families import FAMILIES  # noqa: E402
from lmblocks.runs import RunArguments, TrainingRun  # noqa: E402


@dataclass
class ModelArguments(RunArguments):
    model_family: str | None = field(default=None, metadata={
        "help": f"{', '.join(FAMILIES)} (read from the checkpoint with --model_name_or_path)."})
    preset: str | None = field(default=None, metadata={"help": "A named preset of the family, e.g. tiny, small, 124M."})
    config_name: str | None = field(default=None, metadata={"help": "A config.json (or folder) instead of a preset."})
    config_overrides: str | None = field(default=None, metadata={"help": "Field overrides: 'n_layer=2,n_embd=64'."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Continue pretraining this checkpoint."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "A tokenizer folder; when absent a tokenizer is trained on the corpus."}
    )
    tokenizer_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the trained tokenizer."})
    tokenizer_min_frequency: int = field(default=2, metadata={"help": "min_frequency of the trained tokenizer."})
    linear_init: str = field(default="family", metadata={
        "help": "A new model's linear layers: 'family' keeps the family's initialisation (normal(0, "
                "initializer_range), zero biases); 'pytorch' resets every nn.Linear to PyTorch's default (uniform "
                "±1/√fan_in weights and biases; a tied output layer resets the embeddings it shares). A 2-layer BERT "
                "on 16-token pairs leaves the always-the-most-frequent-token plateau with 'pytorch', not with "
                "'family' (measured: scripts/main.py's settings notes)."})
    time_budget_seconds: float | None = field(default=None, metadata={
        "help": "Stop training after this many seconds. With --max_steps unset (-1) and one epoch not fitting, "
                "max_steps is also set from a short timing of the model, so the LR schedule ends with the budget."})


LINEAR_INITS = ("family", "pytorch")


@dataclass
class DataArguments:
    train_files: list[str] = field(default_factory=list, metadata={"help": "Plain-text files, one document each."})
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets name, or a save_to_disk folder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "The dataset split to train on."})
    text_column: str = field(default="text", metadata={"help": "The dataset's text column."})
    encoding: str | None = field(default=None, metadata={
        "help": "Encoding of --train_files (default: UTF-8; a file that is not is refused with its line and byte)."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training example."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Held-out share of the corpus (0 = no eval)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "BERT: share of tokens masked."})
    nsp_probability: float = field(default=0.5, metadata={"help": "BERT: share of random (not next) sentence B."})


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Flags, or a single .json / .yaml file of them; a misspelt flag or key is a one-line error."""
    return parse_arguments((ModelArguments, DataArguments, TrainingArguments), argv, description=__doc__)


def validate_inputs(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """Everything that can be checked before a tokenizer or model is built: the family, the config with its
    overrides, the block size against the model's positions, the output folder and the resume checkpoint, then the
    corpus. Returns (family, config, texts); `config` is the checkpoint's with `--model_name_or_path`."""
    from lmblocks.cli import check_checkpoint_path, check_length_fits, check_tokenizer_files, loading
    from lmblocks.training import family_of_config, get_family

    TrainingRun(model_args, training_args, "[pretrain]").check()
    if data_args.block_size < 8:
        raise UsageError(f"--block_size must be at least 8, got {data_args.block_size}.")
    if not 0.0 <= data_args.eval_fraction < 1.0:
        raise UsageError(f"--eval_fraction must be in [0, 1), got {data_args.eval_fraction}.")
    if model_args.linear_init not in LINEAR_INITS:
        raise UsageError(f"--linear_init must be one of {', '.join(LINEAR_INITS)}, got {model_args.linear_init!r}.")
    if model_args.model_name_or_path:
        from transformers import AutoConfig

        if model_args.linear_init != "family":
            raise UsageError("--linear_init initialises a new model; with --model_name_or_path the checkpoint's "
                             "weights are trained further. Leave it out.")
        if model_args.preset or model_args.config_name or model_args.config_overrides:
            raise UsageError("--preset, --config_name and --config_overrides build a new model; with "
                             "--model_name_or_path the checkpoint's config is used. Give one or the other.")
        check_checkpoint_path(model_args.model_name_or_path)
        with loading(model_args.model_name_or_path):
            config = AutoConfig.from_pretrained(model_args.model_name_or_path)
        family = family_of_config(config)
        if model_args.model_family and model_args.model_family != family.name:
            raise UsageError(f"--model_family {model_args.model_family} but the checkpoint is {family.name}.")
    else:
        if not model_args.model_family:
            raise UsageError(f"Give --model_family ({', '.join(FAMILIES)}) or --model_name_or_path.")
        family = get_family(model_args.model_family)
        presets = ", ".join(family.config_class.presets)
        if model_args.preset is None and model_args.config_name is None:
            raise UsageError(f"Give --preset or --config_name for {family.name}; presets: {presets}.")
        if model_args.preset is not None and model_args.config_name is not None:
            raise UsageError("Give --preset or --config_name, not both (the config file would silently win).")
        if model_args.preset is not None and model_args.preset not in family.config_class.presets:
            raise UsageError(f"Unknown {family.name} preset {model_args.preset!r}. Available presets: {presets}.")
        config = new_config(model_args, family)
    check_length_fits(config, data_args.block_size, "--block_size")
    if model_args.tokenizer_name_or_path:
        check_checkpoint_path(model_args.tokenizer_name_or_path, "tokenizer")
        check_tokenizer_files(model_args.tokenizer_name_or_path)
    vocab_override = parse_overrides(model_args).get("vocab_size")
    if vocab_override is not None and model_args.tokenizer_name_or_path is None and not model_args.model_name_or_path \
            and vocab_override < model_args.tokenizer_vocab_size:
        raise UsageError(f"--config_overrides vocab_size={vocab_override} is smaller than the tokenizer to be trained "
                         f"(--tokenizer_vocab_size {model_args.tokenizer_vocab_size}); token ids past the embedding "
                         "table would crash training. Raise vocab_size or lower --tokenizer_vocab_size.")
    texts = load_corpus(data_args.train_files, data_args.dataset_name, data_args.dataset_config_name,
                        data_args.dataset_split, data_args.text_column, data_args.encoding)
    return family, config, texts


def parse_overrides(model_args: ModelArguments) -> dict:
    from lmblocks.training import parse_config_overrides

    return parse_config_overrides(model_args.config_overrides)


def new_config(model_args: ModelArguments, family, **tokenizer_kwargs):
    """The config of a new model: preset or file, the tokenizer's vocabulary and special tokens, then the user's
    overrides (checked for type first). A config that cannot be built is a `UsageError`."""
    from huggingface_hub.errors import StrictDataclassError

    from lmblocks.cli import check_config_overrides, config_error_message
    from lmblocks.training import build_config

    overrides = parse_overrides(model_args)
    check_config_overrides(family.config_class, overrides)
    try:
        return build_config(family, model_args.preset, model_args.config_name, **{**tokenizer_kwargs, **overrides})
    except StrictDataclassError as error:
        raise UsageError(f"--config_overrides: {config_error_message(error)}") from error


def get_tokenizer(model_args: ModelArguments, family, texts: list[str]):
    from transformers import AutoTokenizer

    from lmblocks.cli import check_checkpoint_path, check_tokenizer_files, loading

    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if source:
        check_checkpoint_path(source, "tokenizer")
        check_tokenizer_files(source)
        with loading(source, "tokenizer"):
            return AutoTokenizer.from_pretrained(source)
    from lmblocks.tokenization_trainer import train_tokenizer

    # A list would be read as file paths: pass the documents as an iterator.
    try:
        return train_tokenizer(iter(texts), kind=family.tokenizer_kind, vocab_size=model_args.tokenizer_vocab_size,
                               min_frequency=model_args.tokenizer_min_frequency,
                               show_progress=sys.stderr.isatty())  # bars print blank lines into log files
    except ValueError as error:
        raise UsageError(f"Tokenizer training failed: {error}") from error


def tokenizer_config_kwargs(tokenizer) -> dict:
    """vocab_size and special-token ids for the model config, from the tokenizer."""
    from lmblocks.tokenization_trainer import config_kwargs_from_tokenizer

    return config_kwargs_from_tokenizer(tokenizer)


def build_model(model_args: ModelArguments, family, tokenizer, block_size: int):
    from lmblocks.cli import check_length_fits, loading

    load_kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path:
        with loading(model_args.model_name_or_path):
            model = family.pretraining_class.from_pretrained(model_args.model_name_or_path, **load_kwargs)
    else:
        kwargs = tokenizer_config_kwargs(tokenizer)
        fields = family.config_class.__dataclass_fields__
        kwargs = {k: v for k, v in kwargs.items() if k in fields or k in family.config_class.attribute_map}
        model = family.pretraining_class(new_config(model_args, family, **kwargs))
        if model_args.linear_init == "pytorch":
            import torch

            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.reset_parameters()
        if model_args.attn_implementation:
            model.set_attn_implementation(model_args.attn_implementation)
    if len(tokenizer) > model.config.vocab_size:
        where = "the checkpoint" if model_args.model_name_or_path else "vocab_size"
        raise UsageError(f"The tokenizer has {len(tokenizer)} tokens but the model's embedding table only "
                         f"{model.config.vocab_size} ({where}); token ids past it would crash training. Use a "
                         "smaller tokenizer or a larger vocab_size.")
    check_length_fits(model.config, block_size, "--block_size")
    return model


def build_datasets(family, texts: list[str], tokenizer, data_args: DataArguments, seed: int):
    """(train_dataset, eval_dataset, data_collator) for the family's objective."""
    if family.objective == "causal_lm":
        from transformers import default_data_collator

        train, held_out = pack_causal_lm(texts, tokenizer, data_args.block_size, data_args.eval_fraction)
        return train, held_out, default_data_collator
    return build_bert_datasets(texts, tokenizer, data_args, seed)


def build_bert_datasets(texts, tokenizer, data_args: DataArguments, seed: int):
    """BERT's recipe: documents of sentences (lines; a blank line or a new file/row starts a document), NSP sentence
    pairs, dynamic MLM masking in the collator. The last `eval_fraction` of the (shuffled) pairs is held out."""
    import datasets
    from lmblocks.data_bert import (BertDataError, DataCollatorForBertPretraining, create_nsp_examples,
                                    documents_from_dataset)

    lines: list[str] = []
    for text in texts:
        lines.extend(text.splitlines())
        lines.append("")  # a document never spans two files or rows
    try:
        documents = documents_from_dataset(datasets.Dataset.from_dict({"text": lines}))
        examples = create_nsp_examples(documents, tokenizer, max_seq_length=data_args.block_size,
                                       nsp_probability=data_args.nsp_probability, seed=seed)
        collator = DataCollatorForBertPretraining(tokenizer, mlm_probability=data_args.mlm_probability, seed=seed)
    except BertDataError as error:
        raise CorpusError(str(error)) from error
    n_eval = max(1, int(round(len(examples) * data_args.eval_fraction))) if data_args.eval_fraction > 0 else 0
    if len(examples) - n_eval < 1:
        raise CorpusError(f"The corpus gives {len(examples)} sentence pair(s), too few for training"
                          f"{' and a held-out pair' if n_eval else ''}. Give more text.")
    train = datasets.Dataset.from_list(examples[: len(examples) - n_eval])
    held_out = datasets.Dataset.from_list(examples[len(examples) - n_eval:]) if n_eval else None
    return train, held_out, collator


def fit_steps_to_budget(model, train_dataset, collator, training_args: TrainingArguments, seconds: float) -> int | None:
    """Time two optimiser-free training steps and return how many fit in `seconds` (None when the epochs asked for
    fit anyway). Rough by design: the time-budget callback still stops the run on time."""
    import torch

    batch_size = training_args.per_device_train_batch_size
    batch = collator([train_dataset[i] for i in range(min(batch_size, len(train_dataset)))])
    model.train()
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        timings.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    step_seconds = min(timings[1:]) * training_args.gradient_accumulation_steps * 1.15  # + optimiser and logging
    budget_steps = max(1, int(seconds / step_seconds))
    steps_per_epoch = math.ceil(len(train_dataset) / (batch_size * training_args.gradient_accumulation_steps *
                                                      training_args.world_size))
    if budget_steps >= steps_per_epoch * training_args.num_train_epochs:
        return None
    return budget_steps


def run_pretraining(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
                    datasets_name: str | None = None, callbacks: list | None = None) -> dict:
    """Train, evaluate and save; returns the metrics (also written to `output_dir/all_results.json`).
    `callbacks`: extra `TrainerCallback`s (for example to inspect every rank's weights in a distributed run)."""
    from transformers import Trainer, set_seed

    from lmblocks.cli import quiet_training_defaults
    from lmblocks.training import is_main_process

    family, _, texts = validate_inputs(model_args, data_args, training_args)
    run = TrainingRun(model_args, training_args, "[pretrain]")
    set_seed(training_args.seed)
    tokenizer = get_tokenizer(model_args, family, texts)
    model = build_model(model_args, family, tokenizer, data_args.block_size)
    train_dataset, eval_dataset, collator = build_datasets(family, texts, tokenizer, data_args, training_args.seed)

    if model_args.time_budget_seconds and training_args.max_steps <= 0:
        steps = fit_steps_to_budget(model, train_dataset, collator, training_args, model_args.time_budget_seconds)
        if steps is not None:
            training_args.max_steps = steps
    quiet_training_defaults(training_args, len(train_dataset))
    trainer = run.trainer(Trainer, model=model, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          data_collator=collator, processing_class=tokenizer, callbacks=callbacks or ())

    n_params = sum(p.numel() for p in model.parameters())
    if is_main_process():
        print(f"[pretrain] {family.name}: {n_params / 1e6:.2f}M parameters, {len(train_dataset)} training examples "
              f"of {data_args.block_size} tokens" + (f", {len(eval_dataset)} held out" if eval_dataset else ""),
              flush=True)

    start = time.time()
    metrics = run.train(trainer)
    train_seconds = time.time() - start
    # Only the steps this run trained, over this run's time: after a resume the restored steps took no time here.
    tokens_trained = trainer.steps_this_run * training_args.train_batch_size * \
        training_args.gradient_accumulation_steps * training_args.world_size * data_args.block_size
    metrics["tokens_per_second"] = tokens_trained / max(metrics.get("train_runtime", train_seconds), 1e-9)
    metrics["train_steps"] = trainer.state.global_step
    metrics["steps_this_run"] = trainer.steps_this_run
    metrics["n_parameters"] = n_params
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))

    dataset = datasets_name or data_args.dataset_name
    return run.save(
        trainer, tokenizer, family=family.name, task=family.objective, metrics=metrics,
        card_metrics=("final_train_loss", "eval_loss", "perplexity", "tokens_per_second", "train_steps"),
        hyperparameters={k: getattr(training_args, k) for k in (
            "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
            "num_train_epochs", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed")}
        | {"block_size": data_args.block_size, "world_size": training_args.world_size},
        datasets=[dataset] if dataset else [], base_model=model_args.model_name_or_path,
    )


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    return run_pretraining(model_args, data_args, training_args)


if __name__ == "__main__":
    run_script(main)
