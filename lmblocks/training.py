"""What the training scripts share: the model families by name, configs from presets, staged checkpoint writes,
credential checks and Trainer callbacks for a live loss and a time budget.

The scripts in `scripts/` are thin: argument dataclasses and a `run_*` function each; the skeleton of a training run
they share is `lmblocks.runs`. Anything else two of them need, or that a user may want from Python, lives here.
(`UsageError` and `run_script` live in `lmblocks.cli`; they stay importable from here.)
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmblocks import families
from lmblocks.cli import UsageError, run_script
from lmblocks.families import FAMILIES, FamilySpec


# The families as everything else sees them: one spec each, in `lmblocks.families`.
FAMILY_OF_MODEL_TYPE = families.FAMILY_OF_MODEL_TYPE


def get_family(name: str) -> FamilySpec:
    if name not in FAMILIES:
        raise UsageError(f"Unknown model family {name!r}. Available families: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_of_config(config) -> FamilySpec:
    if config.model_type not in FAMILY_OF_MODEL_TYPE:
        raise UsageError(
            f"model_type {config.model_type!r} is not an lmblocks family ({', '.join(FAMILY_OF_MODEL_TYPE)})."
        )
    return FAMILY_OF_MODEL_TYPE[config.model_type]


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """`"n_layer=2,n_embd=64,qkv_bias=False"` -> `{"n_layer": 2, "n_embd": 64, "qkv_bias": False}` (values are Python
    literals; anything else stays a string)."""
    overrides: dict[str, Any] = {}
    if not text:
        return overrides
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise UsageError(f"--config_overrides expects key=value pairs separated by commas, got {item!r}.")
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def build_config(
    family: FamilySpec, preset: str | None = None, config_path: str | None = None, **overrides: Any
):
    """A family's config from a preset name or a config.json (file or folder), with field overrides. Errors from
    the config (unknown option, unknown preset, inconsistent shapes) become `UsageError`s."""
    config_class = family.config_class
    try:
        if config_path:
            path = Path(config_path)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise UsageError(f"Config file not found: {path}")
            config_dict = json.loads(path.read_text())
            config_dict.pop("auto_map", None)
            config_dict.pop("architectures", None)
            config_dict.update(overrides)
            return config_class.from_dict(config_dict)
        if preset is None:
            raise UsageError(f"Give --preset or --config_name. {family.name} presets: {', '.join(config_class.presets)}.")
        return config_class.from_preset(preset, **overrides)
    except UsageError:
        raise
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from error


def check_hub_credentials(push_to_hub: bool, hub_token: str | None) -> None:
    """Fail before any training when `--push_to_hub` cannot succeed for lack of a token."""
    if not push_to_hub:
        return
    from huggingface_hub import get_token

    if not (hub_token or get_token()):
        raise UsageError(
            "--push_to_hub needs Hugging Face credentials: log in with `hf auth login`, or set HF_TOKEN, or pass "
            "--hub_token. Nothing was trained or written."
        )


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# Files whose presence makes a folder loadable: a model's config.json, an adapter's adapter_config.json.
COMPLETION_MARKERS = ("config.json", "adapter_config.json")


@contextmanager
def staged_directory(final_dir: str | os.PathLike):
    """Yield a staging folder next to `final_dir`; on success its files are moved into `final_dir` with
    `config.json` (or `adapter_config.json`) moved last, so a folder with one always holds a complete checkpoint. On failure the
    staging folder is removed and `final_dir` keeps what it had (for example the Trainer's `checkpoint-N` folders)."""
    final_dir = Path(final_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    staging = final_dir / f".staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        # A previous complete checkpoint is invalidated first: its config.json goes before any new file lands.
        for marker in COMPLETION_MARKERS:
            (final_dir / marker).unlink(missing_ok=True)
        entries = sorted(staging.iterdir(), key=lambda p: p.name in COMPLETION_MARKERS)
        for entry in entries:
            target = final_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_cli(main: Callable[[], Any]) -> None:
    """Deprecated: `lmblocks.cli.run_script`, which this calls."""
    import warnings

    warnings.warn("lmblocks.training.run_cli is deprecated; use lmblocks.cli.run_script.", DeprecationWarning,
                  stacklevel=2)
    run_script(main)


# --- the presets, as docs/usage.md lists them ----------------------------------------------------------------------

def preset_table() -> str:
    """A Markdown table of every preset of every family with its sizes; docs/usage.md holds it (a test keeps the two
    equal). Parameters are counted on the model `pretrain.py` trains (tied embeddings once), built on the meta device,
    so even the largest presets cost no memory."""
    import torch

    from .cli import model_positions

    rows = ["| family | preset | layers | hidden | heads (key-value) | MLP | positions | vocabulary | parameters |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for family in FAMILIES.values():
        for name in family.config_class.presets:
            config = family.config_class.from_preset(name)
            with torch.device("meta"):
                model = family.pretraining_class(config)
            n_params = sum(p.numel() for p in model.parameters())
            heads = config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
            rows.append(f"| {family.name} | `{name}` | {config.num_hidden_layers} | {config.hidden_size} | {heads}"
                        f"{f' ({kv_heads})' if kv_heads != heads else ''} | {mlp} | {model_positions(config)} | "
                        f"{config.vocab_size} | {_human(n_params)} |")
    return "\n".join(rows) + "\n"


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.{1 if n < 100 * size else 0}f}{unit}"
    return str(n)


# --- Trainer callbacks --------------------------------------------------------------------------------------------

def _callbacks():
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class LiveLossProgressCallback(ProgressCallback):
        """Trainer's progress bar with the latest training loss (and eval perplexity) shown on the bar itself,
        instead of one printed dict per logging step."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            postfix = {}
            if "loss" in logs:
                postfix["loss"] = f"{logs['loss']:.3f}"
            if "eval_loss" in logs:
                postfix["eval_loss"] = f"{logs['eval_loss']:.3f}"
            if "eval_accuracy" in logs:
                postfix["eval_acc"] = f"{logs['eval_accuracy']:.3f}"
            if postfix:
                self.training_bar.set_postfix(postfix, refresh=True)

    class TimeBudgetCallback(TrainerCallback):
        """Stop training once `seconds` have passed (checked after each optimiser step)."""

        def __init__(self, seconds: float) -> None:
            self.seconds = seconds
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if self.start is not None and time.monotonic() - self.start > self.seconds:
                control.should_training_stop = True
                control.should_save = True
            return control

    return LiveLossProgressCallback, TimeBudgetCallback


def use_live_loss_bar(trainer) -> None:
    """Swap the Trainer's progress callback for one that shows the live loss on the bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    live_cls, _ = _callbacks()
    if trainer.args.disable_tqdm:
        return
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(live_cls())


def time_budget_callback(seconds: float):
    _, budget_cls = _callbacks()
    return budget_cls(seconds)


__all__ = [
    "UsageError",
    "FamilySpec",
    "FAMILIES",
    "get_family",
    "family_of_config",
    "parse_config_overrides",
    "build_config",
    "preset_table",
    "check_hub_credentials",
    "staged_directory",
    "run_cli",
    "use_live_loss_bar",
    "time_budget_callback",
]
