#!/usr/bin/env python
"""Align a causal language model with human preferences: DPO (`trl.DPOTrainer`) on pairs of a preferred and a
rejected answer, full or LoRA.

The model is any lmblocks causal-LM checkpoint (GPT-2, LLaMA, Qwen2, ...), or a transformers `gpt2` / `llama` /
`qwen2` folder, which loads into the lmblocks class. `--lora_r R` (> 0) trains a LoRA adapter instead of all
weights; the target modules default to the family's (registered with peft), `--merge_lora` folds the adapter in for
export (the adapter alone is kept in `adapter/`). Without LoRA the reference model is a frozen copy of the starting
weights; with LoRA it is the same model with the adapter switched off.

Data: rows with a prompt, a chosen and a rejected answer (`--prompt_column`, `--chosen_column`,
`--rejected_column`), from `--train_file` / `--validation_file` (csv, json or jsonl) or `--dataset_name` (a
datasets name or a save_to_disk folder). Without validation data, `--validation_fraction` of the rows is held out.
Columns may be plain strings, or TRL's conversational form (lists of `{"role", "content"}` messages);
`--use_chat_template` turns plain strings into a user turn and an assistant turn rendered by the tokenizer's chat
template (for instruction-tuned models).

On the held-out pairs the script reports, before and after training:
  * preference accuracy: the share of pairs whose chosen answer the model finds more likely than the rejected one
    (log p(chosen | prompt) > log p(rejected | prompt), summed over the answer's tokens);
  * preference margin: the mean of log p(chosen | prompt) - log p(rejected | prompt), in nats;
and after training DPO's implicit reward, β·(change of that log-ratio against the starting model): reward accuracy
(share of pairs where it is positive) and reward margin (its mean), the quantities TRL logs as `rewards/*`.

Every `TrainingArguments` / `DPOConfig` flag works (`--beta`, `--loss_type`, `--max_length`, `--learning_rate`,
`--max_steps`, `--push_to_hub`, ...). Two defaults differ from TRL's, to match the other lmblocks scripts on CPU:
activation (gradient) checkpointing is off (`--activation_checkpointing` turns it on), and `--bf16` is on only where a
GPU supports it.

Example:
    python scripts/align.py --model_name_or_path outputs/main/llama --train_file pairs.jsonl --lora_r 8 \\
        --output_dir outputs/llama-dpo --max_steps 100 --learning_rate 5e-4 --beta 0.1
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # --help without the heavy imports below, when it was printed before
    from _help_cache import print_cached_help

    print_cached_help(__file__)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trl import DPOConfig  # noqa: E402

from lmblocks.cli import (UsageError, check_tokenizer_files, parse_arguments, run_script,  # noqa: E402
                          trl_head_on_answer_tokens)
from lmblocks.data import CorpusError  # noqa: E402
from lmblocks.runs import LoraArguments, RowsArguments, RunArguments, TrainingRun, load_rows  # noqa: E402


@dataclass
class ModelArguments(LoraArguments, RunArguments):
    model_name_or_path: str = field(metadata={"help": "The causal-LM checkpoint to align."})


@dataclass
class DataArguments(RowsArguments):
    prompt_column: str = field(default="prompt")
    chosen_column: str = field(default="chosen")
    rejected_column: str = field(default="rejected")
    use_chat_template: bool = field(default=False, metadata={
        "help": "Render plain-string rows as a user turn + an assistant turn with the tokenizer's chat template."})


@dataclass
class AlignConfig(DPOConfig):
    """`DPOConfig` with the lmblocks scripts' CPU-friendly defaults (see the module docstring).

    Checkpointing: TRL 1.16's `DPOConfig` sets `gradient_checkpointing=True` by default, and transformers 5 keeps that
    name only as a deprecated alias of `activation_checkpointing` (a value in it warns on every run). Here the alias
    is left unset, so transformers' own default applies (off) and its `__post_init__` mirrors `activation_checkpointing`
    into `gradient_checkpointing`, the field TRL reads. `--activation_checkpointing` turns it on;
    `--gradient_checkpointing` still works, with transformers' deprecation warning.
    """

    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Deprecated alias of --activation_checkpointing (transformers 5); off by default.", "nargs": "?",
        "const": True})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; default: on where a GPU supports it, off on CPU."})

    def __post_init__(self):
        if self.bf16 is None:
            import torch

            self.bf16 = (not self.fp16 and not self.use_cpu and torch.cuda.is_available()
                         and torch.cuda.is_bf16_supported())
        super().__post_init__()


COLUMNS = ("prompt", "chosen", "rejected")


def preference_rows(dataset, data_args: DataArguments, what: str):
    """`dataset` with its preference columns renamed to TRL's `prompt` / `chosen` / `rejected` (other columns
    dropped), checked to be non-empty, and wrapped in chat turns when `--use_chat_template` is set."""
    names = {data_args.prompt_column: "prompt", data_args.chosen_column: "chosen",
             data_args.rejected_column: "rejected"}
    missing = [column for column in names if column not in dataset.column_names]
    if missing:
        raise CorpusError(f"The {what} data has no column(s) {missing} (columns: {dataset.column_names}); a "
                          f"preference pair needs a prompt, a chosen and a rejected answer (--prompt_column, "
                          f"--chosen_column, --rejected_column).")
    if len(dataset) == 0:
        raise CorpusError(f"The {what} data is empty: no preference pairs to train or evaluate on.")
    dataset = dataset.select_columns(list(names)).rename_columns({k: v for k, v in names.items() if k != v})
    if data_args.use_chat_template and isinstance(dataset[0]["prompt"], str):
        def as_turns(row):
            return {"prompt": [{"role": "user", "content": row["prompt"]}],
                    "chosen": [{"role": "assistant", "content": row["chosen"]}],
                    "rejected": [{"role": "assistant", "content": row["rejected"]}]}

        dataset = dataset.map(as_turns)
    return dataset


def load_policy(model_name_or_path: str, trust_remote_code: bool, attn_implementation: str | None = None):
    """The checkpoint as an lmblocks causal LM (transformers' own gpt2 / llama folders load into lmblocks too)."""
    from transformers import AutoConfig

    import lmblocks  # noqa: F401  (registers the families)
    from lmblocks.cli import check_checkpoint_path, loading
    from lmblocks.training import FAMILIES, family_of_config, get_family

    check_checkpoint_path(model_name_or_path)
    with loading(model_name_or_path):
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    decoders = [name for name, spec in FAMILIES.items() if spec.is_decoder]
    try:
        family = family_of_config(config)
    except UsageError:
        if config.model_type not in FAMILIES:
            raise UsageError(f"{model_name_or_path} is a {config.model_type!r} checkpoint; align.py trains lmblocks "
                             f"causal LMs ({', '.join(decoders)}).") from None
        family = get_family(config.model_type)  # a transformers folder of a family's own model_type
    if not family.is_decoder:
        raise UsageError(f"{model_name_or_path} is a {family.name} checkpoint ({config.model_type}), not a causal "
                         f"language model: DPO needs a model that generates answers ({' or '.join(decoders)}).")
    with loading(model_name_or_path):
        model = family.causal_lm_class.from_pretrained(model_name_or_path, attn_implementation=attn_implementation)
    return model, family


def answer_log_probs(model, dataset, batch_size: int = 8):
    """Per pair, log p(chosen | prompt) and log p(rejected | prompt) summed over the answer's tokens, from a dataset
    tokenized by `DPOTrainer` (`prompt_ids`, `chosen_ids`, `rejected_ids`). Returns two float tensors."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start:start + batch_size]
            for side in ("chosen", "rejected"):
                sequences = [p + a for p, a in zip(rows["prompt_ids"], rows[f"{side}_ids"])]
                width = max(map(len, sequences))
                input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                answer_mask = torch.zeros_like(input_ids, dtype=torch.bool)
                for i, (seq, prompt) in enumerate(zip(sequences, rows["prompt_ids"])):
                    input_ids[i, :len(seq)] = torch.tensor(seq)
                    attention_mask[i, :len(seq)] = 1
                    answer_mask[i, len(prompt):len(seq)] = True
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
                # Token t is predicted at position t-1.
                log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                token_log_probs = log_probs.gather(-1, input_ids[:, 1:, None].to(device))[..., 0]
                sums[side].append((token_log_probs * answer_mask[:, 1:].to(device)).sum(-1).cpu())
    model.train(was_training)
    return torch.cat(sums["chosen"]), torch.cat(sums["rejected"])


def preference_metrics(chosen, rejected, prefix: str) -> dict[str, float]:
    """Preference accuracy and margin (nats) of the model's own log-likelihoods."""
    delta = chosen - rejected
    return {f"preference_accuracy_{prefix}": float((delta > 0).float().mean()),
            f"preference_margin_{prefix}": float(delta.mean())}


@trl_head_on_answer_tokens()
def run_alignment(model_args: ModelArguments, data_args: DataArguments, training_args: AlignConfig,
                  train_dataset=None, eval_dataset=None) -> dict[str, Any]:
    """Train with DPO and save the result; returns the metrics (also written to `all_results.json`).

    `train_dataset` / `eval_dataset` (`datasets.Dataset`s with the preference columns) replace the data arguments'
    files, for callers that build pairs in memory."""
    from transformers import AutoTokenizer, set_seed
    from trl import DPOTrainer

    from peft import TaskType

    from lmblocks.cli import loading, without_peft_deprecation_warning

    run = TrainingRun(model_args, training_args, "[align]")
    run.check()
    check_tokenizer_files(model_args.model_name_or_path)
    set_seed(training_args.seed)
    if train_dataset is None:
        try:
            train_dataset, eval_dataset = load_rows(data_args, training_args.seed)
        except CorpusError as error:
            if "corresponds to no data" in str(error.__cause__):  # datasets' words for a file with no rows
                raise CorpusError(f"The preference data is empty ({data_args.train_file or data_args.dataset_name}"
                                  f"): no pairs to train or evaluate on.") from None
            raise
    train_dataset = preference_rows(train_dataset, data_args, "training")
    if eval_dataset is not None:
        eval_dataset = preference_rows(eval_dataset, data_args, "validation")

    model, family = load_policy(model_args.model_name_or_path, training_args.trust_remote_code,
                                model_args.attn_implementation)
    with loading(model_args.model_name_or_path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    if tokenizer.eos_token is None:
        raise UsageError(f"The tokenizer of {model_args.model_name_or_path} has no end-of-sequence token; DPO ends "
                         f"every answer with one. Set tokenizer.eos_token and save the tokenizer again.")
    if data_args.use_chat_template and not tokenizer.chat_template:
        raise UsageError(f"--use_chat_template: the tokenizer of {model_args.model_name_or_path} has no chat "
                         f"template. Leave the flag off, or give data in chat form.")

    peft_config = model_args.lora_config(TaskType.CAUSAL_LM)
    ref_model = None if peft_config else copy.deepcopy(model).eval().requires_grad_(False)
    try:
        with without_peft_deprecation_warning():  # peft reads model.is_gradient_checkpointing while wrapping
            trainer = run.trainer(DPOTrainer, model=model, ref_model=ref_model, train_dataset=train_dataset,
                                  eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=peft_config)
    except ValueError as error:
        raise UsageError(f"DPO set-up failed: {error}") from error
    n_trainable, trained = model_args.describe_training(trainer.model)
    metrics: dict[str, Any] = {}
    before = None
    if trainer.eval_dataset is not None:
        before = answer_log_probs(trainer.model, trainer.eval_dataset, training_args.per_device_eval_batch_size)
        metrics.update(preference_metrics(*before, "before"))
    if trainer.is_world_process_zero():
        print(f"[align] {family.name} DPO (β={training_args.beta}, loss {'+'.join(training_args.loss_type)}): "
              f"{trained}, {len(train_dataset)} training pairs, {len(eval_dataset) if eval_dataset is not None else 0} held out", flush=True)
        if before is not None:
            print(f"[align] held-out before: preference accuracy {metrics['preference_accuracy_before']:.3f}, "
                  f"margin {metrics['preference_margin_before']:+.3f} nats", flush=True)

    metrics.update(run.train(trainer))
    metrics["trainable_parameters"] = n_trainable
    if before is not None:
        after = answer_log_probs(trainer.model, trainer.eval_dataset, training_args.per_device_eval_batch_size)
        metrics.update(preference_metrics(*after, "after"))
        # DPO's implicit reward: β times how much the chosen-vs-rejected log-ratio moved from the reference.
        reward = training_args.beta * ((after[0] - before[0]) - (after[1] - before[1]))
        metrics["reward_accuracy"] = float((reward > 0).float().mean())
        metrics["reward_margin"] = float(reward.mean())
        with without_peft_deprecation_warning():
            evaluated = trainer.evaluate()
        metrics.update({k: v for k, v in evaluated.items() if k in ("eval_loss", "eval_rewards/accuracies",
                                                                     "eval_rewards/margins")})
        if trainer.is_world_process_zero():
            print(f"[align] held-out after: preference accuracy {metrics['preference_accuracy_after']:.3f}, "
                  f"margin {metrics['preference_margin_after']:+.3f} nats; reward accuracy "
                  f"{metrics['reward_accuracy']:.3f}, reward margin {metrics['reward_margin']:+.4f}", flush=True)

    metrics = run.save(
        trainer, tokenizer, family=family.name, task="instruct", metrics=metrics,
        card_metrics=("final_train_loss", "eval_loss", "preference_accuracy_before", "preference_accuracy_after",
                      "reward_accuracy", "reward_margin"),
        hyperparameters={"method": "DPO (trl.DPOTrainer)", "beta": training_args.beta,
                         "loss_type": training_args.loss_type, "lora_r": model_args.lora_r,
                         "lora_alpha": model_args.lora_alpha, "learning_rate": training_args.learning_rate,
                         "max_steps": training_args.max_steps, "max_length": training_args.max_length},
        datasets=[data_args.dataset_name] if data_args.dataset_name else [],
        base_model=model_args.model_name_or_path, merge_lora=model_args.merge_lora,
    )
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, AlignConfig]:
    """Flags, or a single .json / .yaml file of them; a misspelt flag is a one-line error."""
    return parse_arguments((ModelArguments, DataArguments, AlignConfig), argv, description=__doc__)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_alignment(*parse_args(argv))


if __name__ == "__main__":
    run_script(main)
