"""The skeleton every training script shares (pretrain, finetune, align): the options they have in common, the checks
before any work, the Trainer set-up, training with its final loss, and the save.

A script holds only its own arguments and its task: it builds the data and the model, hands the Trainer's other
arguments to `TrainingRun.trainer`, and says what its metrics mean. Everything else happens here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import UsageError


# --- the options the scripts share -------------------------------------------------------------------------------
# kw_only: a script's own arguments dataclass subclasses these and may add fields without defaults.

@dataclass(kw_only=True)
class RunArguments:
    """Options of every training run that `TrainingArguments` does not have."""

    license: str = field(default="apache-2.0", metadata={"help": "License written into the model card."})
    time_budget_seconds: float | None = field(default=None, metadata={"help": "Stop training after this long."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "eager, sdpa, flash_attention_2, ... (default: transformers' choice, sdpa where it is available)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start afresh in an --output_dir that holds an earlier run's checkpoint-* folders (without it, such a "
                "folder is refused: resume it with --resume_from_checkpoint)."})


@dataclass(kw_only=True)
class LoraArguments:
    """Training a LoRA adapter instead of all weights."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling: the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Default: the family's."})
    merge_lora: bool = field(default=False, metadata={"help": "Merge the adapter into the weights when saving."})

    def check_lora(self) -> None:
        if self.lora_r < 0:
            raise UsageError(f"--lora_r must be ≥ 0, got {self.lora_r}.")
        if self.merge_lora and not self.lora_r:
            raise UsageError("--merge_lora needs a LoRA run (--lora_r > 0).")

    def lora_config(self, task_type):
        """peft's `LoraConfig` for these options (None without LoRA); the target modules default to the family's."""
        if not self.lora_r:
            return None
        from peft import LoraConfig

        return LoraConfig(task_type=task_type, r=self.lora_r, lora_alpha=self.lora_alpha,
                          lora_dropout=self.lora_dropout, target_modules=self.lora_target_modules)

    def describe_training(self, model) -> tuple[int, str]:
        """(trainable parameters, "0.123M of 4.56M parameters trained (LoRA r=8)")."""
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())
        how = f"LoRA r={self.lora_r}" if self.lora_r else "full"
        return n_trainable, f"{n_trainable / 1e6:.3f}M of {n_total / 1e6:.2f}M parameters trained ({how})"


@dataclass(kw_only=True)
class RowsArguments:
    """Rows (one example each) from csv / json / jsonl files or a `datasets` dataset; see `load_rows`."""

    train_file: str | None = field(default=None, metadata={"help": "csv, json or jsonl."})
    validation_file: str | None = field(default=None, metadata={"help": "csv, json or jsonl (default: held out)."})
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets name, or a save_to_disk folder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Without validation data, the share of training rows held out."})
    encoding: str | None = field(default=None, metadata={
        "help": "Encoding of --train_file / --validation_file (default: UTF-8; a file that is not is refused with "
                "its line and byte)."})


def load_rows(data_args: RowsArguments, seed: int):
    """(train, validation) `datasets.Dataset`s; without validation data, `validation_fraction` of the training rows
    (when there are at least 10) is held out."""
    import datasets

    from .data import CorpusError, check_data_file, check_encoding, check_hub_reachable, load_data_files

    if bool(data_args.train_file) == bool(data_args.dataset_name):
        raise UsageError("Give exactly one of --train_file and --dataset_name.")
    if data_args.encoding and not data_args.train_file:
        raise UsageError("--encoding applies to --train_file / --validation_file.")
    try:
        if data_args.train_file:
            files = {"train": data_args.train_file}
            if data_args.validation_file:
                files["validation"] = data_args.validation_file
            builders = {check_data_file(path, data_args.encoding) for path in files.values()}
            if len(builders) > 1:
                raise UsageError("--train_file and --validation_file must both be csv, or both json / jsonl.")
            options = {"encoding": check_encoding(data_args.encoding)} if data_args.encoding else {}
            data = load_data_files(builders.pop(), files, **options)
        elif Path(data_args.dataset_name).is_dir() and (Path(data_args.dataset_name) / "dataset_dict.json").exists():
            data = datasets.load_from_disk(data_args.dataset_name)
        else:
            check_hub_reachable(data_args.dataset_name)
            data = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
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


# --- the run -----------------------------------------------------------------------------------------------------

class TrainingRun:
    """One script's training run, from the checks before any work to the saved folder.

    `check()` refuses what cannot succeed (LoRA options, Hub credentials, the output folder and the checkpoint to
    resume); `trainer()` builds the Trainer (lmblocks pushes the finished folder itself, no evaluation without
    held-out data, the time budget, the live-loss bar); `train()` trains and returns the metrics with the final loss;
    `save()` writes the folder with its card (and pushes it)."""

    def __init__(self, run_args: RunArguments, training_args, log_prefix: str) -> None:
        self.run_args = run_args
        self.training_args = training_args
        self.log_prefix = log_prefix
        self.push_to_hub = bool(training_args.push_to_hub)

    def check(self) -> None:
        from .cli import check_output_dir
        from .training import check_hub_credentials

        if isinstance(self.run_args, LoraArguments):
            self.run_args.check_lora()
        check_hub_credentials(self.training_args.push_to_hub, self.training_args.hub_token)
        self.training_args.resume_from_checkpoint = check_output_dir(
            self.training_args.output_dir, self.training_args.resume_from_checkpoint,
            self.run_args.overwrite_output_dir)

    def trainer(self, trainer_class, *, eval_dataset=None, callbacks=(), **kwargs):
        """`trainer_class(args=..., eval_dataset=..., callbacks=..., **kwargs)` set up as every script wants it."""
        from .training import time_budget_callback, use_live_loss_bar

        args = self.training_args
        self.push_to_hub, args.push_to_hub = bool(args.push_to_hub), False  # lmblocks pushes, with its own card
        if eval_dataset is None:
            args.eval_strategy = "no"
        callbacks = list(callbacks)
        if self.run_args.time_budget_seconds:
            callbacks.append(time_budget_callback(self.run_args.time_budget_seconds))
        trainer = trainer_class(args=args, eval_dataset=eval_dataset, callbacks=callbacks, **kwargs)
        use_live_loss_bar(trainer)
        return trainer

    def train(self, trainer) -> dict[str, Any]:
        """Train (resuming where asked); the Trainer's metrics, with `first_train_loss` / `final_train_loss`."""
        from .cli import train, without_peft_deprecation_warning

        with without_peft_deprecation_warning():  # TRL switches checkpointing off and on around reference forwards
            result = train(trainer, self.training_args.resume_from_checkpoint)
        metrics = dict(result.metrics)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if losses:
            metrics["first_train_loss"], metrics["final_train_loss"] = losses[0], losses[-1]
        return metrics

    def save(self, trainer, tokenizer, *, family, task: str, metrics: dict[str, Any], base_model: str | None,
             datasets: list[str], **card: Any) -> dict[str, Any]:
        """`hub.save_trained_model` with the run's license, push and trainer state; `metrics` gains `output_dir`.
        `card`: `card_metrics`, `hyperparameters`, `merge_lora`."""
        from .hub import save_trained_model

        save_trained_model(trainer, tokenizer, family=family, task=task, metrics=metrics,
                           license=self.run_args.license, datasets=datasets, base_model=base_model,
                           push_to_hub=self.push_to_hub, save_trainer_state=True, log_prefix=self.log_prefix, **card)
        metrics["output_dir"] = str(self.training_args.output_dir)
        return metrics


__all__ = ["RunArguments", "LoraArguments", "RowsArguments", "load_rows", "TrainingRun"]
