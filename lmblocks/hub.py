"""Saving, model cards and pushes for the checkpoints the scripts write.

`save_trained_model` is the tail every training script shares (pretrain, finetune, align): staged save of the model
or adapter and its tokenizer, results, card, push. `write_model_card` puts a README.md with Hub metadata (library_name, tags, license, datasets, base_model, model-index
with the training results) into a checkpoint folder. `push_folder` uploads a finished folder (model, tokenizer,
remote-code files, card) to a Hub repository, leaving out the Trainer's intermediate `checkpoint-*` folders.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PIPELINE_TAGS = {"causal_lm": "text-generation", "mlm_nsp": "fill-mask", "seq_cls": "text-classification",
                 "instruct": "text-generation"}
AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "mlm_nsp": "AutoModelForPreTraining",
                "seq_cls": "AutoModelForSequenceClassification", "instruct": "AutoModelForCausalLM"}


def write_model_card(
    folder: str | Path,
    *,
    model_name: str,
    family: str,
    task: str,
    license: str = "apache-2.0",
    datasets: Sequence[str] = (),
    base_model: str | None = None,
    results: dict[str, float] | None = None,
    training_args: dict[str, Any] | None = None,
    extra_text: str = "",
    load_from: str | None = None,
    adapter: bool = False,
    labels: Mapping[int, str] | None = None,
) -> Path:
    """Write `folder/README.md`. `task` is one of `causal_lm`, `mlm_nsp`, `seq_cls`, `instruct`; `results` holds
    metrics such as `eval_loss`, `perplexity`, `train_loss`, `tokens_per_second`.

    `load_from` is what the card's loading snippet passes to `from_pretrained`: the Hub id when the folder is pushed,
    else the local folder (default: `model_name`). `adapter=True` describes a folder that holds a LoRA adapter only,
    loaded with peft on top of `base_model`. `labels` (id -> name) are a classifier's: an adapter's snippet passes
    them to peft, which builds the classification head on the base model, whose config knows nothing of them."""
    folder = Path(folder)
    results = dict(results or {})
    base_model_ref = base_model or "(see adapter_config.json)"
    # The Hub's `base_model` metadata must be a Hub id; a local folder is named in the text only.
    if base_model is not None and not _looks_like_hub_id(base_model):
        base_model = None
    pipeline_tag = PIPELINE_TAGS[task]
    eval_results = []
    dataset_id = datasets[0] if datasets else "custom"
    if "perplexity" in results and math.isfinite(results["perplexity"]):
        eval_results.append(
            EvalResult(task_type=pipeline_tag, dataset_type=dataset_id, dataset_name=dataset_id,
                       metric_type="perplexity", metric_value=round(float(results["perplexity"]), 4))
        )
    if "accuracy" in results:
        eval_results.append(
            EvalResult(task_type=pipeline_tag, dataset_type=dataset_id, dataset_name=dataset_id,
                       metric_type="accuracy", metric_value=round(float(results["accuracy"]), 4))
        )
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=["lmblocks", f"lmb_{family}", "custom_code", pipeline_tag],
        datasets=list(datasets) or None,
        base_model=base_model,
        pipeline_tag=pipeline_tag,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    load_from = load_from or model_name
    auto_class = AUTO_CLASSES[task]
    # trust_remote_code for the tokenizer too: AutoTokenizer reads the model's config.json first, and without it
    # transformers asks whether to run the config's code (or, told no, warns that it reads `lmb_<family>` as a
    # plain config).
    load_tokenizer = f'tokenizer = AutoTokenizer.from_pretrained("{load_from}", trust_remote_code=True)'
    if adapter:
        peft_class = f"AutoPeftModel{auto_class.removeprefix('AutoModel')}"
        head_lines, head_kwargs = [], ""
        if labels:
            head_lines = ["# The classifier's labels: peft builds the head on the base model, whose config has none.",
                          f"id2label = {dict(labels)!r}"]
            head_kwargs = ", id2label=id2label, label2id={name: i for i, name in id2label.items()}"
        lines = [
            f"# {model_name}",
            "",
            f"A LoRA adapter (peft) for the lmblocks **{family}** model `{base_model_ref}` "
            f"({task.replace('_', ' ')}), trained with lmblocks' scripts. This folder holds the adapter only; peft "
            "loads the base model it names (`base_model_name_or_path` in adapter_config.json) and the base model's "
            "code comes with that checkpoint:",
            "",
            "```python",
            f"from peft import {peft_class}",
            "from transformers import AutoTokenizer",
            *head_lines,
            f'model = {peft_class}.from_pretrained("{load_from}", trust_remote_code=True{head_kwargs})',
            load_tokenizer,
            "```",
            "",
        ]
    else:
        lines = [
            f"# {model_name}",
            "",
            f"An lmblocks **{family}** model ({task.replace('_', ' ')}), trained with lmblocks' scripts. The modelling "
            "code is in this folder, so it loads without lmblocks installed:",
            "",
            "```python",
            f"from transformers import {auto_class}, AutoTokenizer",
            f'model = {auto_class}.from_pretrained("{load_from}", trust_remote_code=True)',
            load_tokenizer,
            "```",
            "",
        ]
    if results:
        lines += ["## Training results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in results.items()]
        lines.append("")
    if training_args:
        lines += ["## Training hyperparameters", "", "```json", json.dumps(training_args, indent=2, default=str),
                  "```", ""]
    if extra_text:
        lines += [extra_text, ""]
    card = ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines))
    path = folder / "README.md"
    card.save(path)
    return path


def _looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`, and not a folder on this machine."""
    return not Path(name).exists() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str = "Upload with lmblocks") -> str:
    """Create `repo_id` if needed and upload the finished checkpoint in `folder`; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", ".staging-*", "*.tmp"],
    )
    return str(info)


def save_trained_model(
    trainer,
    tokenizer,
    *,
    family: str,
    task: str,
    metrics: dict[str, Any],
    card_metrics: Sequence[str] = ("final_train_loss", "eval_loss", "perplexity", "accuracy"),
    hyperparameters: dict[str, Any] | None = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] = (),
    base_model: str | None = None,
    merge_lora: bool = False,
    push_to_hub: bool = False,
    save_trainer_state: bool = False,
    log_prefix: str = "[lmblocks]",
) -> Path:
    """The tail every training script shares: write the finished model to `trainer.args.output_dir` and push it.

    Call it on every rank (under FSDP / DeepSpeed ZeRO-3 gathering the weights is a collective); rank 0 writes, in a
    staging folder moved into place with `config.json` (or `adapter_config.json`) last: the model (a peft model as its
    adapter, or with `merge_lora` merged into a plain checkpoint with the adapter alone in `adapter/`), the tokenizer
    (its `model_max_length` set to the model's positions, so `truncation=True` and pipelines cut inputs the model can
    read), `all_results.json` (`metrics`), optionally `trainer_state.json`, and a model card with `card_metrics` and
    `hyperparameters`. The model's `use_cache` is put back to its config's default (the Trainer turns it off while
    training). With `push_to_hub` the folder goes to `args.hub_model_id` (default: the folder's name). Prints one
    line with the headline metric; returns the output folder.
    """
    from .cli import model_positions
    from .training import is_main_process, staged_directory

    args = trainer.args
    output_dir = Path(args.output_dir)
    state_dict = None
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if not (trainer.is_world_process_zero() and is_main_process()):
        _barrier()
        return output_dir

    model = trainer.accelerator.unwrap_model(trainer.model)
    is_adapter = hasattr(model, "peft_config")
    base = model.get_base_model() if is_adapter else model
    config = base.config
    config.use_cache = getattr(type(config), "use_cache", True)  # the class default, not the Trainer's False
    positions = model_positions(config)
    if positions is not None:
        tokenizer.model_max_length = positions
    if is_adapter:
        for adapter_config in model.peft_config.values():
            if base_model:  # as the user named it, not the absolute path the loader resolved
                adapter_config.base_model_name_or_path = base_model

    # A classifier's labels: an adapter's card passes them to peft (the base model's config has none).
    labels = dict(config.id2label) if task == "seq_cls" and config.id2label else None
    card = dict(family=family, task=task, license=license, datasets=list(datasets), base_model=base_model,
                results={k: metrics[k] for k in card_metrics if k in metrics}, training_args=hyperparameters,
                labels=labels)
    with staged_directory(output_dir) as staging:
        if is_adapter and merge_lora:
            model.save_pretrained(staging / "adapter")
            _save_tokenizer(tokenizer, staging / "adapter", family)
            # The adapter alone is a folder of its own, with the card that says how to load it.
            write_model_card(staging / "adapter", model_name=f"{args.hub_model_id or output_dir.name} (adapter)",
                             load_from=str(output_dir / "adapter"), adapter=True, **card)
            model.merge_and_unload().save_pretrained(staging)
        else:
            model.save_pretrained(staging, state_dict=state_dict)
        _save_tokenizer(tokenizer, staging, family)
        if save_trainer_state:
            trainer.state.save_to_json(str(staging / "trainer_state.json"))
        (staging / "all_results.json").write_text(json.dumps(metrics, indent=2))
        load_from = args.hub_model_id if (push_to_hub or args.hub_model_id) else str(output_dir)
        write_model_card(staging, model_name=args.hub_model_id or output_dir.name,
                         load_from=load_from or str(output_dir), adapter=is_adapter and not merge_lora, **card)
    headline = next(((k, metrics[k]) for k in ("accuracy", "perplexity") if k in metrics), None)
    print(f"{log_prefix} saved {family} {task} to {output_dir}"
          + (f" ({headline[0]} {headline[1]:.3f})" if headline else ""), flush=True)
    if push_to_hub:
        repo_id = args.hub_model_id or output_dir.name
        url = push_folder(output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo,
                          revision=args.hub_revision)
        print(f"{log_prefix} pushed to {repo_id}: {url}", flush=True)
    _barrier()
    return output_dir


def _save_tokenizer(tokenizer, folder: Path, family: str) -> None:
    """`save_pretrained`, plus the classic vocabulary files (vocab.json + merges.txt, vocab.txt) when the family's
    kind of tokenizer has them, also when the tokenizer was loaded as transformers' own class."""
    from .families import FAMILIES
    from .tokenization_trainer import TOKENIZER_KINDS, save_tokenizer

    spec = FAMILIES.get(family)
    if spec is not None and TOKENIZER_KINDS[spec.tokenizer_kind].vocabulary_files:
        save_tokenizer(tokenizer, folder)
    else:
        tokenizer.save_pretrained(folder)


def _barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


__all__ = ["write_model_card", "push_folder", "save_trained_model"]
