"""What the scripts share at their edges: reading the command line, checking inputs before any work, loading
checkpoints with errors that name the file, training with a word on how to resume, and one `error:` line on exit.

The rule they implement (docs/usage.md): bad input prints one `error: ...` line naming the problem and the way out,
and exits with status 2 before anything is trained or written; Ctrl-C exits with status 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any



class UsageError(ValueError):
    """An input the scripts cannot honour; `run_script` prints its message and exits with status 2."""


class Interrupted(Exception):
    """Training was stopped by the user (Ctrl-C); the message says how to resume."""


class CtrlC:
    """Ctrl-C, remembered as well as raised. Python raises KeyboardInterrupt wherever the main thread is when the
    signal arrives; raised inside a finalizer or a callback that C code runs, it is printed as "Exception ignored" and
    lost, and the run carries on (the main job's Ctrl-C test saw runs finish and exit 0 in 2 of 6 fresh clones,
    never alone). With `pressed` set, training stops at its next step all the same (`train`), and so does the main
    job between stages."""

    pressed = False

    @classmethod
    def handler(cls, signum: int, frame: object) -> None:
        cls.pressed = True
        raise KeyboardInterrupt

    @classmethod
    def install(cls) -> None:
        """Takes over Ctrl-C where Python's default handler has it (not where it is ignored: a background job)."""
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, cls.handler)

    @classmethod
    def check(cls) -> None:
        """Raises KeyboardInterrupt if Ctrl-C was pressed: one that was lost on its way stops the run here."""
        if cls.pressed:
            raise KeyboardInterrupt


def run_script(main: Callable[[], Any]) -> None:
    """Run a script's `main`: bad input -> one `error:` line and exit 2; Ctrl-C -> one line on how to resume and
    exit 130 (the shell's code for an interrupt), never a traceback."""
    from .data import CorpusError

    CtrlC.install()
    try:
        main()
    except (UsageError, CorpusError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)
    except Interrupted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted: stopped before training started; nothing was written.", file=sys.stderr)
        sys.exit(130)


# --- the command line ---------------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (the scripts' docstrings hold examples), and every option's default (unless its
    help says it in its own words: "(default: each family's budget)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "(default" in action.help:
            return action.help
        return super()._get_help_string(action)


class _LmbParserBehaviour:
    """What every lmblocks parser shares: abbreviations are refused (`--max_step` is not `--max_steps`), a bad value
    is one `error:` line (a `UsageError`, which `run_script` prints) instead of the usage and the error, and `--help`
    shows every default. The help text it prints is kept for the next `--help` (see `scripts/_help_cache.py`)."""

    @staticmethod
    def _lmb_defaults(kwargs: dict) -> dict:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        return kwargs

    def error(self, message: str):  # argparse's own prints the whole usage before the message
        raise UsageError(f"{message.rstrip('.')}. See --help.")

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            known = sorted({o.lstrip("-") for action in self._actions for o in action.option_strings
                            if action.help != argparse.SUPPRESS and o.startswith("--")})
            names = [a.lstrip("-").split("=", 1)[0] for a in unknown if a.startswith("-")]
            what = _with_suggestions(names, known, prefix="--") if names else " ".join(unknown)
            raise UsageError(f"Unrecognised argument(s): {what}. See --help.")
        return namespace

    def print_help(self, file=None) -> None:
        text = self.format_help()
        (file or sys.stdout).write(text)
        remember_help(text)

    def add_deprecated_alias(self, old: str, new: str) -> None:
        """Accept the option string `old` for the option `new` (same value), with a deprecation warning on use."""
        target = next(action for action in self._actions if new in action.option_strings)

        class Deprecated(argparse.Action):
            def __call__(self, parser, namespace, values, option_string=None):
                print(f"warning: {old} is deprecated; use {new} (same meaning).", file=sys.stderr)
                setattr(namespace, target.dest, values)

        self.add_argument(old, dest=target.dest, nargs=target.nargs, type=target.type, default=argparse.SUPPRESS,
                          action=Deprecated, help=argparse.SUPPRESS)


class ArgumentParser(_LmbParserBehaviour, argparse.ArgumentParser):
    """`argparse.ArgumentParser` with lmblocks' behaviour (no abbreviations, one-line errors, defaults in --help).
    Bad input raises `UsageError`: run the script's `main` with `run_script`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **self._lmb_defaults(kwargs))


def hf_argument_parser(dataclass_types: Sequence[type], **kwargs):
    """transformers' `HfArgumentParser` over `dataclass_types`, with the behaviour of `ArgumentParser` above."""
    from transformers import HfArgumentParser

    class LmbHfArgumentParser(_LmbParserBehaviour, HfArgumentParser):
        def __init__(self, types, **kw):
            super().__init__(types, **self._lmb_defaults(kw))

    return LmbHfArgumentParser(dataclass_types, **kwargs)


def remember_help(text: str) -> None:
    """Keep the help text where `scripts/_help_cache.py` asked (it sets LMBLOCKS_HELP_CACHE when it had no copy)."""
    path = os.environ.get("LMBLOCKS_HELP_CACHE")
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(f"{path}.{os.getpid()}")
        partial.write_text(text)
        os.replace(partial, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


def parse_arguments(dataclass_types: Sequence[type], argv: list[str] | None = None,
                    description: str | None = None) -> tuple:
    """`HfArgumentParser` over `dataclass_types`, from `argv` (default: the command line) or from a single `.json` /
    `.yaml` file argument. A misspelt flag or an unknown key is a `UsageError` naming it and the closest known one;
    abbreviations are refused; a bad value is one line."""
    parser = hf_argument_parser(dataclass_types, description=description)
    known = sorted({action.dest for action in parser._actions if action.dest != "help"})
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
            path = Path(args[0])
            if not path.is_file():
                raise UsageError(f"Argument file not found: {path}")
            if path.suffix == ".json":
                try:
                    data = json.loads(path.read_text())
                except json.JSONDecodeError as error:
                    raise UsageError(f"{path} is not valid JSON: {error}") from error
            else:
                import yaml

                data = yaml.safe_load(path.read_text())
            if not isinstance(data, dict):
                raise UsageError(f"{path} must hold one mapping of option names to values.")
            unknown = [key for key in data if key not in known]
            if unknown:
                raise UsageError(f"Unknown option(s) in {path}: {_with_suggestions(unknown, known)}.")
            return parser.parse_dict(data)
        _, unknown = parser.parse_known_args(args=args)
        if unknown:
            names = [a.lstrip("-").split("=", 1)[0] for a in unknown if a.startswith("-")]
            what = _with_suggestions(names, known, prefix="--") if names else " ".join(unknown)
            raise UsageError(f"Unrecognised argument(s): {what}. See --help.")
        return parser.parse_args_into_dataclasses(args=args)
    except UsageError:
        raise
    except (ValueError, TypeError) as error:  # TrainingArguments' own checks of flag combinations
        raise UsageError(str(error).strip()) from error


def _with_suggestions(names: Sequence[str], known: Sequence[str], prefix: str = "") -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"{prefix}{name} (did you mean {prefix}{close[0]}?)" if close else f"{prefix}{name}")
    return ", ".join(parts)


# --- checks before any work ---------------------------------------------------------------------------------------

_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


def check_config_overrides(config_class: type, overrides: dict[str, Any]) -> None:
    """Refuse overrides of the wrong type (`n_layer=two`) with the expected type, before any work. Shapes that do not
    fit together are caught when the config is built (`build_config`)."""
    fields = getattr(config_class, "__dataclass_fields__", {})
    for key, value in overrides.items():
        if key not in fields:
            continue  # the config names unknown options itself, with the list of known ones
        annotation = fields[key].type
        if not isinstance(annotation, str):
            annotation = getattr(annotation, "__name__", "")
        allowed = [t.strip() for t in annotation.split("|")]
        if value is None and "None" in allowed:
            continue
        accepted = [_TYPES[t] for t in allowed if t in _TYPES]
        if not accepted:
            continue
        ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool) and bool not in accepted)
                 for t in accepted)
        if not ok:
            raise UsageError(f"--config_overrides {key}={value!r}: {key} takes {' or '.join(allowed)}, "
                             f"got {type(value).__name__}.")


def config_error_message(error: Exception) -> str:
    """The sentence inside a config validation error (strict dataclasses wrap it in 'Class validation error ...')."""
    text = str(error).strip()
    last = text.splitlines()[-1].strip() if text else text
    return re.sub(r"^(ValueError|TypeError): ", "", last)


def model_positions(config) -> int | None:
    """How many positions the model has (`n_positions` for GPT-2, `max_position_embeddings` for LLaMA and BERT)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_length_fits(config, length: int, flag: str) -> None:
    """Refuse a sequence length the model has no positions for, naming both numbers."""
    positions = model_positions(config)
    if positions is not None and length > positions:
        raise UsageError(f"{flag} {length} exceeds the model's {positions} positions; give {flag} {positions} or less.")


def check_checkpoint_path(path: str, what: str = "checkpoint") -> None:
    """A path that is clearly meant as a local folder (absolute, relative with ./ or ../, more than one '/', or
    inside a folder that exists here, like `outputs/gtp2`) must exist; a Hub id (`org/name`) is left to the loader.
    A file is refused as such; so is a model folder with no config.json (or adapter_config.json)."""
    if Path(path).is_file():
        raise UsageError(f"The {what} {path} is a file; give the folder that save_pretrained wrote (config.json, the "
                         "weights, the tokenizer files).")
    if Path(path).is_dir():
        if what != "tokenizer" and not any((Path(path) / name).is_file() for name in COMPLETION_FILES):
            raise UsageError(f"{path} has no config.json: it is not a saved model (give the folder save_pretrained "
                             "wrote).")
        return
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path \
        or ("/" in path and Path(path.split("/")[0]).is_dir())
    if looks_local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        raise UsageError(f"The {what} folder {path} does not exist.")


# Files one of which a tokenizer folder holds: a fast tokenizer, its settings, or a slow one's vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
COMPLETION_FILES = ("config.json", "adapter_config.json")


def check_tokenizer_files(path: str) -> None:
    """A local folder to load a tokenizer from must hold tokenizer files (transformers would otherwise blame a
    missing sentencepiece or tiktoken)."""
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"No tokenizer files found in {path} (expected one of {', '.join(TOKENIZER_FILES)}); save "
                         "the tokenizer next to the model, or give --tokenizer_name_or_path.")


@contextmanager
def loading(path: str, what: str = "checkpoint") -> Iterator[None]:
    """Turn the errors of reading a checkpoint (missing files, a truncated safetensors file, a bad config.json, no
    network for a Hub id) into a `UsageError` that names the folder and, where known, the file."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        SafetensorError = OSError  # noqa: N806
    try:
        yield
    except SafetensorError as error:
        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
        bad = _unreadable_safetensors(files)
        where = ", ".join(str(f) for f in bad) if bad else f"the .safetensors file(s) in {path}"
        raise UsageError(f"Cannot read {where}: {error} — the file is incomplete or damaged; save or copy it "
                         "again.") from error
    except (OSError, ValueError, json.JSONDecodeError) as error:
        if isinstance(error, UsageError):
            raise
        message = " ".join(str(error).split())
        if not Path(path).exists():
            raise UsageError(f"Cannot load the {what} from {path}: there is no such folder here, and as a Hub id: "
                             f"{message}") from error
        raise UsageError(f"Cannot load the {what} from {path}: {message}") from error


def _unreadable_safetensors(files: Sequence[Path]) -> list[Path]:
    from safetensors import safe_open

    bad = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception:  # noqa: BLE001 - any failure to open is what we report
            bad.append(file)
    return bad


def check_output_dir(output_dir: str, resume_from_checkpoint: str | None, overwrite: bool = False) -> str | None:
    """Resuming needs a checkpoint that exists; a fresh run into a folder that holds an earlier run's
    `checkpoint-*` folders would silently start at step 0 and overwrite them, so it is refused unless `overwrite`.
    Returns the checkpoint to resume from (`--resume_from_checkpoint true` means the last one in `output_dir`)."""
    last = last_checkpoint(output_dir)
    if resume_from_checkpoint:
        if resume_from_checkpoint.lower() == "true":
            if last is None:
                raise UsageError(f"--resume_from_checkpoint true, but {output_dir} holds no checkpoint-* folder.")
            return str(last)
        path = Path(resume_from_checkpoint)
        if not (path / "trainer_state.json").is_file():
            found = f" The last checkpoint in {output_dir} is {last}." if last else ""
            what = "is not a Trainer checkpoint (no trainer_state.json)" if path.is_dir() else "does not exist"
            raise UsageError(f"--resume_from_checkpoint {path} {what}.{found}")
        return str(path)
    if last is not None and not overwrite:
        raise UsageError(
            f"{output_dir} holds checkpoints of an earlier run (last: {last.name}). Resume it with "
            f"--resume_from_checkpoint {last}, or start again with --overwrite_output_dir (the old checkpoints are "
            "then overwritten as the new run saves), or choose another --output_dir."
        )
    return None


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The `checkpoint-N` folder with the largest N that holds a trainer state, or None."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


# --- training -----------------------------------------------------------------------------------------------------

def quiet_training_defaults(training_args, n_train_examples: int) -> None:
    """Defaults that fit the run: no pinned memory without an accelerator (the DataLoader warns on every run
    otherwise), and, when `--logging_steps` was left at transformers' 500, a loss about 20 times per run (and, with
    `--eval_strategy steps` but no `--eval_steps`, which transformers then copies from `logging_steps`, an evaluation
    about 5 times per run)."""
    import torch

    accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()
    if not accelerator:
        training_args.dataloader_pin_memory = False
    if training_args.logging_strategy == "steps" and training_args.logging_steps == 500:
        steps = planned_steps(training_args, n_train_examples)
        if steps < 10_000:
            training_args.logging_steps = max(1, steps // 20)
            if training_args.eval_strategy == "steps" and training_args.eval_steps in (None, 500):
                training_args.eval_steps = max(1, steps // 5)


def planned_steps(training_args, n_train_examples: int) -> int:
    """Optimiser steps the Trainer will run: `max_steps`, or epochs × steps per epoch."""
    import math

    if training_args.max_steps > 0:
        return training_args.max_steps
    per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * \
        max(1, training_args.world_size)
    return max(1, math.ceil(n_train_examples / per_step) * math.ceil(training_args.num_train_epochs))


def train(trainer, resume_from_checkpoint: str | None = None):
    """`trainer.train`, recording how many steps this run trained (`trainer.steps_this_run`, for honest speed
    figures after a resume) and turning Ctrl-C into `Interrupted` with the command to resume."""
    from transformers import TrainerCallback

    class _StartStep(TrainerCallback):
        start = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = state.global_step  # after the Trainer restored a resumed run's state

        def on_step_end(self, args, state, control, **kwargs):
            CtrlC.check()  # a Ctrl-C whose KeyboardInterrupt was lost (`CtrlC`) stops training here

    start = _StartStep()
    trainer.add_callback(start)
    quiet = _TiedKeysFilter(trainer.model)
    trainer_logger = logging.getLogger("transformers.trainer")
    trainer_logger.addFilter(quiet)
    resume_note = _ResumeArgumentsFilter()
    utils_logger = logging.getLogger("transformers.trainer_utils")
    utils_logger.addFilter(resume_note)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except KeyboardInterrupt:
        last = last_checkpoint(trainer.args.output_dir)
        if last is not None:
            raise Interrupted(f"stopped at step {trainer.state.global_step}. Resume with the same command plus "
                              f"--resume_from_checkpoint {last}.") from None
        raise Interrupted(f"stopped at step {trainer.state.global_step}; no checkpoint was saved yet, so a new run "
                          "starts from the beginning (--save_steps N saves one every N steps).") from None
    finally:
        trainer.remove_callback(start)
        trainer_logger.removeFilter(quiet)
        utils_logger.removeFilter(resume_note)
    trainer.steps_this_run = trainer.state.global_step - start.start
    return result


class _TiedKeysFilter(logging.Filter):
    """Drops the Trainer's "missing keys in the checkpoint" warning on resume when the only keys missing are tied
    weights (a tied `lm_head.weight` is not saved, and it is the same tensor as the embedding: the resume is exact)."""

    def __init__(self, model) -> None:
        super().__init__()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.tied = set(getattr(base, "all_tied_weights_keys", None) or {})
        tie = getattr(getattr(base, "config", None), "tie_word_embeddings", False)
        self.prefixes = ("", "base_model.model.") if tie else None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.prefixes is None or not message.startswith("There were missing keys in the checkpoint model loaded"):
            return True
        missing = re.findall(r"'([^']+)'", message)
        return not missing or not all(
            any(key.startswith(p) and key[len(p):] in self.tied for p in self.prefixes) for key in missing)


class _ResumeArgumentsFilter(logging.Filter):
    """On resume, transformers warns, a line each, that intervals differ from the checkpoint's (`logging_steps: 9
    (from args) != 6 (from trainer_state.json)`). They are this run's settings, given by the user or fitted to this
    run's length by `quiet_training_defaults`, and they apply: said here in one line, as a note."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "(from trainer_state.json)" not in message:
            return True
        changes = re.findall(r"(\w+): (\S+) \(from args\) != (\S+) \(from trainer_state\.json\)", message)
        record.msg = "resuming with " + ", ".join(f"{name} {new} (the checkpoint's run had {old})"
                                                  for name, new, old in changes) + "."
        record.args = ()
        return True


@contextmanager
def without_peft_deprecation_warning() -> Iterator[None]:
    """Hide transformers 5's deprecation warnings for the old gradient-checkpointing names (`is_gradient_checkpointing`,
    `gradient_checkpointing_enable` / `_disable`), which peft reads on every LoRA run and TRL's trainers call while
    training and evaluating: the user can do nothing about them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*\b(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated.*",
                                category=FutureWarning)
        yield


@contextmanager
def trl_head_on_answer_tokens() -> Iterator[None]:
    """Let TRL's fused LM head score only the answer tokens on a CPU too.

    TRL (1.16) projects through the LM head only the positions that have a label where its Triton kernels run (CUDA,
    XPU); on other devices it scores every position, prompt and padding included, so that tile shapes stay fixed for
    graph compilers (Neuron). On a CPU, in eager mode, that is only lost time: the head is the largest matrix of a
    small model, and in the main job's DPO (prompts three times longer than the answers) it took two thirds of each
    step. Inside this context TRL picks the rows with a label on a CPU as well (its own path for Triton devices,
    run with its PyTorch tiles); the log-probabilities are the same. tests/test_align.py fails if TRL drops the switch."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: original(device) or device.type == "cpu"
    try:
        yield
    finally:
        trl_utils._use_triton = original


# --- instruction tuning -------------------------------------------------------------------------------------------

# The instruction format lmblocks fine-tunes with, as a chat template so that generate.py, pipelines and TRL apply
# it too: "### Instruction:\n{user}\n\n### Response:\n{assistant}<eos>". The assistant's text is marked with
# {% generation %} so `return_assistant_tokens_mask` (TRL's assistant-only loss) finds it.
INSTRUCT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Response:\\n' }}"
    "{%- generation -%}{{ message['content'] + (eos_token or '') }}{%- endgeneration -%}"
    "{{ '\\n\\n' if not loop.last else '' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give `tokenizer` lmblocks' instruction template unless it has a chat template already; True if it was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = INSTRUCT_CHAT_TEMPLATE
    return True


# --- loading a checkpoint for a task ------------------------------------------------------------------------------

def load_pretrained(model_class, path: str, what: str = "model", log_prefix: str = "[lmblocks]", **kwargs: Any):
    """`model_class.from_pretrained(path, **kwargs)` inside `loading(path, what)`, with transformers' LOAD REPORT
    table (a warning on every load that differs from the checkpoint) replaced by one line when the differences are
    the expected ones of loading a checkpoint for another task: a new head initialised (missing keys outside the base
    model), the checkpoint's own head left out (unexpected keys outside the base model), a saved `position_ids`
    buffer (a constant of older checkpoints; transformers drops it for its own classes). Nothing is printed when
    nothing differs; anything else (a missing layer weight, a size mismatch) shows transformers' table as it is."""
    from transformers.utils import logging as hf_logging

    report_logger = hf_logging.get_logger("transformers.modeling_utils")
    held = _HeldLoadReport()
    report_logger.addFilter(held)
    try:
        with loading(path, what):
            model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except BaseException:
        held.release(report_logger)
        raise
    line = _expected_load_differences(model, info)
    if line is None:
        held.release(report_logger)
    else:
        report_logger.removeFilter(held)
        if line:
            print(f"{log_prefix} {line}", flush=True)
    return model


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT records, to be shown (`release`) only when they report a problem."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if " LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def release(self, logger: logging.Logger) -> None:
        """Stop holding, and show what was held."""
        logger.removeFilter(self)
        for record in self.records:
            logger.handle(record)
        self.records.clear()


def _expected_load_differences(model, info: dict) -> str | None:
    """One line naming the expected differences ('' when there are none), or None when something else differs."""
    if info.get("mismatched_keys") or info.get("error_msgs"):
        return None
    prefix = getattr(model, "base_model_prefix", "")
    is_base = getattr(model, "base_model", model) is model

    def head_module(key: str) -> str | None:
        """The module of a key outside the base model, e.g. `score` for `score.weight`; None inside it."""
        if is_base or not prefix or key.startswith(f"{prefix}."):
            return None
        return key.rsplit(".", 1)[0]

    unexpected = {key for key in info.get("unexpected_keys", ()) if not re.search(r"(^|\.)position_ids$", key)}
    new_heads = {head_module(key) for key in info.get("missing_keys", ())}
    old_heads = {head_module(key) for key in unexpected}
    if None in new_heads or None in old_heads:
        return None

    def outermost(modules: set[str]) -> str:  # `cls.predictions`, not also `cls.predictions.decoder`
        return ", ".join(sorted(m for m in modules if not any(m.startswith(f"{o}.") for o in modules)))

    name = type(model).__name__
    left_out = f"the checkpoint's {outermost(old_heads)} left out" if old_heads else ""
    if new_heads:
        return (f"{name}: new head {outermost(new_heads)} initialised" + (f", {left_out}" if left_out else "")
                + " (expected when a pretrained model gets a new task head; training learns it)")
    return f"{name}: {left_out} (expected: this head has no use for it)" if left_out else ""


__all__ = [
    "UsageError",
    "Interrupted",
    "run_script",
    "ArgumentParser",
    "hf_argument_parser",
    "parse_arguments",
    "check_config_overrides",
    "config_error_message",
    "model_positions",
    "check_length_fits",
    "check_checkpoint_path",
    "TOKENIZER_FILES",
    "check_tokenizer_files",
    "loading",
    "check_output_dir",
    "last_checkpoint",
    "quiet_training_defaults",
    "planned_steps",
    "train",
    "without_peft_deprecation_warning",
    "INSTRUCT_CHAT_TEMPLATE",
    "ensure_chat_template",
    "load_pretrained",
]
