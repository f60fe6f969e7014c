#!/usr/bin/env python
"""Fine-tune a pretrained lmblocks checkpoint: sequence classification or causal-LM instruction tuning, full or LoRA.

* `--task seq_cls`: rows with a text and a label column (`--text_column`, `--label_column`). For GPT-2,
  `--lm_loss_weight λ` adds the auxiliary language-modelling loss of GPT fine-tuning: L = L_task + λ·L_LM.
* `--task instruct`: rows with an instruction and a response column; the loss is on the response tokens only.
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

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from transformers import HfArgumentParser, TrainingArguments  # noqa: E402

from lmblocks.data import CorpusError  # noqa: E402
from lmblocks.training import UsageError, run_cli  # noqa: E402

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
TASKS = ("seq_cls", "instruct")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "The pretrained checkpoint to start from."})
    task: str = field(default="seq_cls", metadata={"help": "seq_cls or instruct."})
    lm_loss_weight: float | None = field(default=None, metadata={"help": "GPT-2 seq_cls: λ of the auxiliary LM loss."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 fine-tunes all weights."})
    lora_alpha: float = field(default=16.0)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Default: the family's."})
    merge_lora: bool = field(default=False, metadata={"help": "Merge the adapter into the weights when saving."})
    trust_remote_code: bool = field(default=False)
    license: str = field(default="apache-2.0")
    time_budget_seconds: float | None = field(default=None, metadata={"help": "Stop training after this long."})


@dataclass
class DataArguments:
    train_file: str | None = field(default=None, metadata={"help": "csv, json or jsonl."})
    validation_file: str | None = field(default=None)
    dataset_name: str | None = field(default=None)
    dataset_config_name: str | None = field(default=None)
    validation_fraction: float = field(default=0.1)
    text_column: str = field(default="text")
    label_column: str = field(default="label")
    instruction_column: str = field(default="instruction")
    response_column: str = field(default="response")
    max_length: int = field(default=128)


def load_rows(data_args: DataArguments, seed: int):
    """(train, validation) `datasets.Dataset`s."""
    import datasets

    if bool(data_args.train_file) == bool(data_args.dataset_name):
        raise UsageError("Give exactly one of --train_file and --dataset_name.")
    try:
        if data_args.train_file:
            files = {"train": data_args.train_file}
            if data_args.validation_file:
                files["validation"] = data_args.validation_file
            for path in files.values():
                if not Path(path).is_file():
                    raise CorpusError(f"Data file not found: {path}")
            suffix = Path(data_args.train_file).suffix.lstrip(".")
            builder = {"jsonl": "json", "json": "json", "csv": "csv"}.get(suffix)
            if builder is None:
                raise UsageError(f"--train_file must be .csv, .json or .jsonl, got {data_args.train_file}.")
            data = datasets.load_dataset(builder, data_files=files)
        elif Path(data_args.dataset_name).is_dir() and (Path(data_args.dataset_name) / "dataset_dict.json").exists():
            data = datasets.load_from_disk(data_args.dataset_name)
        else:
            data = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    except (FileNotFoundError, ValueError) as error:
        if isinstance(error, (UsageError, CorpusError)):
            raise
        raise CorpusError(f"Cannot load the fine-tuning data: {error}") from error
    if "train" not in data:
        raise CorpusError(f"The data has no train split (splits: {list(data)}).")
    train = data["train"]
    validation = data.get("validation")
    if validation is None and data_args.validation_fraction > 0 and len(train) >= 10:
        parts = train.train_test_split(test_size=data_args.validation_fraction, seed=seed)
        train, validation = parts["train"], parts["test"]
    return train, validation


def check_columns(dataset, columns: list[str]) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise CorpusError(f"The data has no column(s) {missing} (columns: {dataset.column_names}).")


def load_model(model_args: ModelArguments, num_labels: int | None, id2label: dict | None):
    """The task head on the pretrained checkpoint, through the Auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        import lmblocks  # noqa: F401  (registers the families)
    except ImportError:
        pass
    try:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"Cannot read the checkpoint {model_args.model_name_or_path}: {error}") from error
    kwargs = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.task == "seq_cls":
        kwargs.update(num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})
        if model_args.lm_loss_weight is not None:
            if not hasattr(config, "lm_loss_weight"):
                raise UsageError(f"--lm_loss_weight (λ) is a GPT-2 option; {config.model_type} has no auxiliary LM loss.")
            kwargs["lm_loss_weight"] = model_args.lm_loss_weight
        auto_class = AutoModelForSequenceClassification
    else:
        if model_args.lm_loss_weight is not None:
            raise UsageError("--lm_loss_weight applies to --task seq_cls only.")
        auto_class = AutoModelForCausalLM
    try:
        return auto_class.from_pretrained(model_args.model_name_or_path, **kwargs)
    except ValueError as error:
        raise UsageError(f"Cannot build a {model_args.task} model from {model_args.model_name_or_path}: {error}") \
            from error


def apply_lora(model, model_args: ModelArguments):
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType.SEQ_CLS if model_args.task == "seq_cls" else TaskType.CAUSAL_LM
    lora_config = LoraConfig(task_type=task_type, r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                             lora_dropout=model_args.lora_dropout, target_modules=model_args.lora_target_modules)
    try:
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
        eos = tokenizer.eos_token or ""

        def encode(batch):
            input_ids, labels = [], []
            for instruction, response in zip(batch[data_args.instruction_column], batch[data_args.response_column]):
                prompt_ids = tokenizer(PROMPT_TEMPLATE.format(instruction=instruction),
                                       add_special_tokens=False)["input_ids"]
                response_ids = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
                ids = (prompt_ids + response_ids)[: data_args.max_length]
                input_ids.append(ids)
                labels.append(([-100] * len(prompt_ids) + response_ids)[: data_args.max_length])
            return {"input_ids": input_ids, "attention_mask": [[1] * len(x) for x in input_ids], "labels": labels}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def run_finetuning(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    import numpy as np
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, set_seed

    from lmblocks.hub import push_folder, write_model_card
    from lmblocks.training import (check_hub_credentials, family_of_config, staged_directory,
                                   time_budget_callback, use_live_loss_bar)

    if model_args.task not in TASKS:
        raise UsageError(f"Unknown --task {model_args.task!r}; choose one of {', '.join(TASKS)}.")
    if model_args.lora_r < 0:
        raise UsageError(f"--lora_r must be ≥ 0, got {model_args.lora_r}.")
    if model_args.merge_lora and not model_args.lora_r:
        raise UsageError("--merge_lora needs a LoRA run (--lora_r > 0).")
    check_hub_credentials(training_args.push_to_hub, training_args.hub_token)
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

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    except (OSError, ValueError) as error:
        raise UsageError(f"Cannot load the tokenizer of {model_args.model_name_or_path}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    model = load_model(model_args, len(labels) if id2label else None, id2label)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    family = family_of_config(model.config)

    train_dataset = preprocess(model_args.task, train_rows, tokenizer, data_args, label2id)
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
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    push_to_hub = training_args.push_to_hub
    training_args.push_to_hub = False  # lmblocks pushes the finished folder itself, with its own card
    if eval_dataset is None:
        training_args.eval_strategy = "no"
    callbacks = [time_budget_callback(model_args.time_budget_seconds)] if model_args.time_budget_seconds else []
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=collator, processing_class=tokenizer, compute_metrics=compute_metrics,
                      callbacks=callbacks)
    use_live_loss_bar(trainer)
    if trainer.is_world_process_zero():
        print(f"[finetune] {family.name} {model_args.task}: {n_trainable / 1e6:.3f}M of {n_total / 1e6:.2f}M "
              f"parameters trained ({'LoRA r=' + str(model_args.lora_r) if model_args.lora_r else 'full'}), "
              f"{len(train_dataset)} training rows", flush=True)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(train_result.metrics)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if losses:
        metrics["final_train_loss"] = losses[-1]
    metrics["trainable_parameters"] = n_trainable
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
        if model_args.task == "instruct":
            metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        elif "eval_accuracy" in metrics:
            metrics["accuracy"] = metrics["eval_accuracy"]

    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        with staged_directory(output_dir) as staging:
            model = trainer.model
            if model_args.lora_r:
                model.save_pretrained(staging / "adapter" if model_args.merge_lora else staging)
                if model_args.merge_lora:
                    model.merge_and_unload().save_pretrained(staging)
            else:
                model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "all_results.json").write_text(json.dumps(metrics, indent=2))
            write_model_card(
                staging, model_name=training_args.hub_model_id or output_dir.name, family=family.name,
                task=model_args.task, license=model_args.license,
                datasets=[data_args.dataset_name] if data_args.dataset_name else [],
                base_model=model_args.model_name_or_path if not Path(model_args.model_name_or_path).exists()
                else None,
                results={k: metrics[k] for k in ("final_train_loss", "eval_loss", "accuracy", "perplexity")
                         if k in metrics},
                training_args={"lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha,
                               "lm_loss_weight": model_args.lm_loss_weight,
                               "learning_rate": training_args.learning_rate, "max_steps": training_args.max_steps},
            )
        print(f"[finetune] saved to {output_dir}", flush=True)
        if push_to_hub:
            repo_id = training_args.hub_model_id or output_dir.name
            push_folder(output_dir, repo_id, token=training_args.hub_token, private=training_args.hub_private_repo,
                        revision=training_args.hub_revision)
            print(f"[finetune] pushed to {repo_id}", flush=True)
    metrics["output_dir"] = str(training_args.output_dir)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return run_finetuning(model_args, data_args, training_args)


if __name__ == "__main__":
    run_cli(main)
