"""Model cards and pushes for checkpoints the scripts write.

`write_model_card` puts a README.md with Hub metadata (library_name, tags, license, datasets, base_model, model-index
with the training results) into a checkpoint folder. `push_folder` uploads a finished folder (model, tokenizer,
remote-code files, card) to a Hub repository, leaving out the Trainer's intermediate `checkpoint-*` folders.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PIPELINE_TAGS = {"causal_lm": "text-generation", "mlm_nsp": "fill-mask", "seq_cls": "text-classification",
                 "instruct": "text-generation"}


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
) -> Path:
    """Write `folder/README.md`. `task` is one of `causal_lm`, `mlm_nsp`, `seq_cls`, `instruct`; `results` holds
    metrics such as `eval_loss`, `perplexity`, `train_loss`, `tokens_per_second`."""
    folder = Path(folder)
    results = dict(results or {})
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
    lines = [
        f"# {model_name}",
        "",
        f"An lmblocks **{family}** model ({task.replace('_', ' ')}), trained with lmblocks' scripts. The modelling code "
        "is in this repository, so it loads without lmblocks installed:",
        "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        f'model = AutoModel.from_pretrained("{model_name}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_name}")',
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


__all__ = ["write_model_card", "push_folder"]
