#!/usr/bin/env python
"""Fine-tune a pretrained lmblocks checkpoint: sequence classification or causal-LM instruction tuning, full or LoRA.

* `--task seq_cls`: rows with a text and a label column (`--text_column`, `--label_column`). For GPT-2,
  `--lm_loss_weight λ` adds the auxiliary language-modelling loss of GPT fine-tuning: L = L_task + λ·L_LM.
* `--task instruct`: rows with an instruction and a response column; the loss is on the response tokens only. The
  prompt format is the tokenizer's chat template; a tokenizer without one gets lmblocks' instruction template
  (`### Instruction:` / `### Response:`), saved with it, so generate.py, pipelines and TRL format prompts the same way.
* `--lora_r R` (> 0) trains a LoRA adapter instead of all weights (`--lora_alpha`, `--lora_dropout`; target modules
  default to the family's defaults registered with peft: GPT-2 `c_attn`/`c_proj`/`c_fc`, LLaMA's attention and MLP
  projections, BERT's `query`/`value`). `--merge_lora` folds the adapter into the weights for export: the output
  folder is then a plain checkpoint (with the adapter alone in `adapter/`).

Data comes from `--train_file` / `--validation_file` (csv, json or jsonl) or `--dataset_name` (a datasets name or a
save_to_disk folder). Without validation data, `--validation_fraction` of the training rows is held out.

Example:
    python scripts/finetune.py --model_name_or_path outputs/main/gpt2 --task seq_cls --train_file books.jsonl \\
        --lm_loss_weight 0.5 --lora_r 8 --merge_lora --output_dir outputs/gpt2-books --max_steps 200
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # --help without the heavy imports below, when it was printed before
    from _help_cache import print_cached_help

    print_cached_help(__file__)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from transformers import TrainingArguments  # noqa: E402

from lmblocks.cli import UsageError, check_tokenizer_files, parse_arguments, run_script  # noqa: E402
from lmblocks.data import CorpusError  # noqa: E402
from lmblocks.runs import LoraArguments, RowsArguments, RunArguments, TrainingRun, load_rows  # noqa: E402

# What lmblocks' chat template (lmblocks.cli.INSTRUCT_CHAT_TEMPLATE) renders for one instruction; kept for callers.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
TASKS = ("seq_cls", "instruct")


@dataclass
class ModelArguments(LoraArguments, RunArguments):
    model_name_or_path: str = field(metadata={"help": "The pretrained checkpoint to start from."})
    task: str = field(default="seq_cls", metadata={"help": "seq_cls or instruct."})
    lm_loss_weight: float | None = field(default=None, metadata={"help": "GPT-2 seq_cls: λ of the auxiliary LM loss."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the checkpoint's own modelling code."})


@dataclass
class DataArguments(RowsArguments):
    text_column: str = field(default="text", metadata={"help": "seq_cls: the column holding the text."})
    label_column: str = field(default="label", metadata={"help": "seq_cls: the column holding the label."})
    instruction_column: str = field(default="instruction", metadata={"help": "instruct: the prompt column."})
    response_column: str = field(default="response", metadata={"help": "instruct: the answer column."})
    max_length: int = field(default=128, metadata={
        "help": "Tokens per row; longer rows are cut (and counted). At most the model's positions."})


def check_columns(dataset, columns: list[str]) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise CorpusError(f"The data has no column(s) {missing} (columns: {dataset.column_names}).")


def load_model(model_args: ModelArguments, num_labels: int | None, id2label: dict | None):
    """The task head on the pretrained checkpoint, through the Auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmblocks.cli import load_pretrained, loading

    with loading(model_args.model_name_or_path):
        config = AutoConfig.from_pretrained(model_args.model_name_or_path,
                                            trust_remote_code=model_args.trust_remote_code)
    kwargs = {"trust_remote_code": model_args.trust_remote_code, "attn_implementation": model_args.attn_implementation}
    if model_args.task == "seq_cls":
        kwargs.update(num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})
        if model_args.lm_loss_weight is not None:
            if not hasattr(config, "lm_loss_weight"):
                raise UsageError(f"--lm_loss_weight (λ) is a GPT-2 option; {config.model_type} has no auxiliary LM "
                                 "loss.")
            kwargs["lm_loss_weight"] = model_args.lm_loss_weight
        auto_class = AutoModelForSequenceClassification
    else:
        if model_args.lm_loss_weight is not None:
            raise UsageError("--lm_loss_weight applies to --task seq_cls only.")
        auto_class = AutoModelForCausalLM
    # A new head (a classifier on a language model) is expected here: said in one line, not as a load report.
    return load_pretrained(auto_class, model_args.model_name_or_path, f"{model_args.task} model",
                           log_prefix="[finetune]", **kwargs)


def apply_lora(model, model_args: ModelArguments):
    from peft import TaskType, get_peft_model

    from lmblocks.cli import without_peft_deprecation_warning

    lora_config = model_args.lora_config(TaskType.SEQ_CLS if model_args.task == "seq_cls" else TaskType.CAUSAL_LM)

    try:
        with without_peft_deprecation_warning():
            model = get_peft_model(model, lora_config)
    except ValueError as error:
        raise UsageError(f"LoRA set-up failed: {error}") from error
    return model


def preprocess(task: str, dataset, tokenizer, data_args: DataArguments, label2id: dict | None):
    if task == "seq_cls":
        check_columns(dataset, [data_args.text_column, data_args.label_column])

        def encode(batch):
            enc = tokenizer(batch[data_args.text_column], truncation=True, max_length=data_args.max_length)
            enc["labels"] = [label2id[str(label)] for label in batch[data_args.label_column]]
            return enc
    else:
        check_columns(dataset, [data_args.instruction_column, data_args.response_column])

        def encode(batch):
            input_ids, labels = [], []
            for instruction, response in zip(batch[data_args.instruction_column], batch[data_args.response_column]):
                prompt_ids, response_ids = instruct_example(tokenizer, instruction, response)
                ids = (prompt_ids + response_ids)[: data_args.max_length]
                input_ids.append(ids)
                labels.append(([-100] * len(prompt_ids) + response_ids)[: data_args.max_length])
            return {"input_ids": input_ids, "attention_mask": [[1] * len(x) for x in input_ids], "labels": labels}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def instruct_example(tokenizer, instruction: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one instruction row, both through the tokenizer's chat template: the prompt is
    the user turn plus the generation prompt, the response the rest of the rendered conversation (answer + eos)."""
    user = [{"role": "user", "content": instruction}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(prompt):
        raise UsageError("The tokenizer's chat template does not render a conversation as its prompt plus the "
                         "answer, so the loss cannot be put on the answer alone.")
    prompt_ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt):], add_special_tokens=False, verbose=False)["input_ids"]
    return prompt_ids, response_ids


def run_finetuning(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Check the inputs, fine-tune, evaluate and save (see the module docstring); returns the metrics."""
    import numpy as np
    from transformers import AutoConfig, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, \
        set_seed

    from lmblocks.cli import check_checkpoint_path, check_length_fits, ensure_chat_template, loading, \
        quiet_training_defaults
    from lmblocks.training import family_of_config

    if model_args.task not in TASKS:
        raise UsageError(f"Unknown --task {model_args.task!r}; choose one of {', '.join(TASKS)}.")
    if data_args.max_length < 2:
        raise UsageError(f"--max_length must be at least 2, got {data_args.max_length}.")
    run = TrainingRun(model_args, training_args, "[finetune]")
    run.check()
    check_checkpoint_path(model_args.model_name_or_path)
    check_tokenizer_files(model_args.model_name_or_path)  # before the data is read
    with loading(model_args.model_name_or_path):
        config = AutoConfig.from_pretrained(model_args.model_name_or_path,
                                            trust_remote_code=model_args.trust_remote_code)
    check_length_fits(config, data_args.max_length, "--max_length")
    set_seed(training_args.seed)
    train_rows, validation_rows = load_rows(data_args, training_args.seed)

    id2label = label2id = None
    if model_args.task == "seq_cls":
        check_columns(train_rows, [data_args.text_column, data_args.label_column])
        labels = sorted({str(label) for label in train_rows[data_args.label_column]})
        if len(labels) < 2:
            raise CorpusError(f"Sequence classification needs at least two labels, the data has {labels}.")
        id2label = dict(enumerate(labels))
        label2id = {v: k for k, v in id2label.items()}

    with loading(model_args.model_name_or_path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    if model_args.task == "instruct" and ensure_chat_template(tokenizer):
        print("[finetune] the tokenizer has no chat template: using lmblocks' instruction template "
              "(### Instruction: / ### Response:), saved with the tokenizer", flush=True)
    model = load_model(model_args, len(labels) if id2label else None, id2label)
    # The padding token was just chosen: tell the config and the generation config (the Trainer would, with a warning).
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    family = family_of_config(model.config)

    train_dataset = preprocess(model_args.task, train_rows, tokenizer, data_args, label2id)
    report_cut_rows(train_dataset, train_rows, tokenizer, model_args.task, data_args)
    eval_dataset = preprocess(model_args.task, validation_rows, tokenizer, data_args, label2id) \
        if validation_rows is not None else None
    if model_args.task == "seq_cls":
        collator = DataCollatorWithPadding(tokenizer)

        def compute_metrics(prediction):
            logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
            return {"accuracy": float((np.argmax(logits, -1) == prediction.label_ids).mean())}
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        compute_metrics = None

    if model_args.lora_r:
        model = apply_lora(model, model_args)
        if training_args.label_names is None:
            training_args.label_names = ["labels"]
    n_trainable, trained = model_args.describe_training(model)
    quiet_training_defaults(training_args, len(train_dataset))
    trainer = run.trainer(Trainer, model=model, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          data_collator=collator, processing_class=tokenizer, compute_metrics=compute_metrics)
    if trainer.is_world_process_zero():
        print(f"[finetune] {family.name} {model_args.task}: {trained}, {len(train_dataset)} training rows", flush=True)
    before = {}
    if eval_dataset is not None and not training_args.resume_from_checkpoint:
        # The starting point on the held-out rows, so the card and callers can say what training changed.
        before = {f"{k}_before": v for k, v in trainer.evaluate().items() if k in ("eval_loss", "eval_accuracy")}
        if trainer.is_world_process_zero():
            print("[finetune] held-out before training: "
                  + ", ".join(f"{k[len('eval_'):-len('_before')]} {v:.4f}" for k, v in before.items()), flush=True)
    metrics = {**before, **run.train(trainer)}
    metrics["trainable_parameters"] = n_trainable
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
        if model_args.task == "instruct":
            metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        elif "eval_accuracy" in metrics:
            metrics["accuracy"] = metrics["eval_accuracy"]

    return run.save(
        trainer, tokenizer, family=family.name, task=model_args.task, metrics=metrics,
        card_metrics=("final_train_loss", "eval_loss_before", "eval_loss", "accuracy", "perplexity"),
        hyperparameters={"lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha,
                         "lm_loss_weight": model_args.lm_loss_weight, "learning_rate": training_args.learning_rate,
                         "max_steps": training_args.max_steps, "max_length": data_args.max_length},
        datasets=[data_args.dataset_name] if data_args.dataset_name else [],
        base_model=model_args.model_name_or_path, merge_lora=model_args.merge_lora,
    )


def report_cut_rows(dataset, rows, tokenizer, task: str, data_args: DataArguments) -> int:
    """Say how many training rows were longer than --max_length and cut (nothing is cut silently)."""
    if task == "seq_cls":
        lengths = [len(ids) for ids in tokenizer(list(rows[data_args.text_column]), verbose=False)["input_ids"]]
    else:
        lengths = [sum(map(len, instruct_example(tokenizer, i, r)))
                   for i, r in zip(rows[data_args.instruction_column], rows[data_args.response_column])]
    n_cut = sum(length > data_args.max_length for length in lengths)
    if n_cut:
        print(f"[finetune] {n_cut} of {len(lengths)} training rows are longer than --max_length "
              f"{data_args.max_length} tokens (longest {max(lengths)}) and were cut to it", flush=True)
    return n_cut


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataArguments, TrainingArguments), argv,
                                                           description=__doc__)
    return run_finetuning(model_args, data_args, training_args)


if __name__ == "__main__":
    run_script(main)
