"""A newcomer's first hour with the scripts (issue 15): the model's limits, bad input, what the scripts write.

The scripts run in-process (their `main(argv)`), so the module pays the imports once; one subprocess checks the
command-line contract itself (one `error:` line, exit status 2). Models are tiny: GPT-2 with 32 positions.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / ".cache" / "corpus"
POSITIONS = 32
TINY = f"n_embd=32,n_layer=1,n_head=2,n_positions={POSITIONS}"
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--per_device_train_batch_size", "4",
         "--per_device_eval_batch_size", "8"]

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import export_gpt2  # noqa: E402
import finetune  # noqa: E402
import generate  # noqa: E402
import pretrain  # noqa: E402

from lmblocks.cli import Interrupted, run_script  # noqa: E402
from lmblocks.data import CorpusError  # noqa: E402
from lmblocks.training import UsageError  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two short books and a 400-token GPT-2 tokenizer trained on them."""
    from lmblocks.tokenization_trainer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("first_hour")
    for name in ("alice29", "botchan"):
        (root / f"{name}.txt").write_text((CORPUS / f"{name}.txt").read_text(errors="replace")[:12000])
    tokenizer = train_tokenizer([str(root / "alice29.txt"), str(root / "botchan.txt")], "gpt2", vocab_size=400,
                                show_progress=False)
    save_tokenizer(tokenizer, root / "tokenizer")
    return root


def pretrain_argv(files: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_family", "gpt2", "--preset", "tiny", "--config_overrides", TINY,
            "--train_files", str(files / "alice29.txt"), str(files / "botchan.txt"),
            "--tokenizer_name_or_path", str(files / "tokenizer"), "--block_size", "16", "--output_dir", str(out),
            *QUIET, *extra]


@pytest.fixture(scope="module")
def checkpoint(files):
    """pretrain.py for 4 steps with checkpoints at 2 and 4, default logging and evaluation intervals (no
    --logging_steps, --eval_strategy steps without --eval_steps)."""
    import warnings

    out = files / "gpt2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = pretrain.main(pretrain_argv(files, out, "--max_steps", "4", "--save_strategy", "steps",
                                              "--save_steps", "2", "--learning_rate", "1e-3", "--eval_strategy",
                                              "steps"))
    pin_memory = [str(w.message) for w in caught if "pin_memory" in str(w.message)]
    return out, metrics, pin_memory


# --- limits of the model (points 1, 2; issue 14's context length) ------------------------------------------------

def test_generate_clips_to_the_positions_and_keeps_the_text(checkpoint, capsys):
    from transformers import AutoTokenizer

    out, _, _ = checkpoint
    texts = generate.main(["--model_name_or_path", str(out), "--prompt", "Alice", "--max_new_tokens", "200",
                           "--no_stream"])
    err = capsys.readouterr().err
    assert f"the model has {POSITIONS} positions" in err and "instead of 200" in err
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(texts) == 1 and texts[0].startswith("Alice")
    assert 1 < len(tokenizer(texts[0])["input_ids"]) <= POSITIONS
    with pytest.raises(UsageError, match=f"has {POSITIONS} positions, so it can take at most {POSITIONS - 1}"):
        generate.main(["--model_name_or_path", str(out), "--prompt", "Alice was here " * 40, "--no_stream"])


def test_saved_tokenizer_knows_the_context(checkpoint):
    from transformers import AutoTokenizer

    out, _, _ = checkpoint
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == POSITIONS
    assert (out / "vocab.json").exists() and (out / "merges.txt").exists()  # the classic files too (issue 14)
    assert len(tokenizer("Alice was beginning to get very tired " * 20, truncation=True)["input_ids"]) == POSITIONS


def test_finetune_refuses_a_max_length_past_the_positions(checkpoint, tmp_path):
    out, _, _ = checkpoint
    with pytest.raises(UsageError, match=f"--max_length 512 exceeds the model's {POSITIONS} positions"):
        finetune.main(["--model_name_or_path", str(out), "--train_file", str(tmp_path / "unused.jsonl"),
                       "--max_length", "512", "--output_dir", str(tmp_path / "ft"), *QUIET])


# --- bad input: one error, nothing written (points 3-9) ----------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ("vocab_size=100", "The tokenizer has 4\\d\\d tokens but the model's embedding table only 100"),
    ("n_layer=two", "n_layer takes int, got str"),
    ("n_head=3", "n_embd \\(32\\) must be divisible by n_head \\(3\\)"),
])
def test_pretrain_checks_overrides_before_training(files, tmp_path, overrides, message):
    out = tmp_path / "out"
    argv = pretrain_argv(files, out, "--max_steps", "1")
    argv[argv.index(TINY)] = f"{TINY},{overrides}"
    with pytest.raises(UsageError, match=message):
        pretrain.main(argv)
    assert not (out / "config.json").exists()


def test_overrides_are_checked_before_a_tokenizer_is_trained(files, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a tokenizer was trained before the overrides were checked")

    monkeypatch.setattr("lmblocks.tokenization_trainer.train_tokenizer", no_training)
    argv = pretrain_argv(files, tmp_path / "out", "--max_steps", "1")
    del argv[argv.index("--tokenizer_name_or_path"):argv.index("--tokenizer_name_or_path") + 2]
    argv[argv.index(TINY)] = f"{TINY},n_head=3"
    with pytest.raises(UsageError, match="divisible by n_head"):
        pretrain.main(argv)
    argv[argv.index(f"{TINY},n_head=3")] = f"{TINY},vocab_size=100"
    with pytest.raises(UsageError, match="vocab_size=100 is smaller than the tokenizer to be trained"):
        pretrain.main(argv)


def test_misspelt_flags_and_unknown_json_keys(files, tmp_path):
    with pytest.raises(UsageError, match="argument\\(s\\): --max_stepz \\(did you mean --max_steps\\?\\)"):
        pretrain.main(pretrain_argv(files, tmp_path / "out", "--max_stepz", "2"))
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"model_family": "gpt2", "preset": "tiny", "output_dir": str(tmp_path / "o"),
                                     "learning_rte": 0.001}))
    with pytest.raises(UsageError, match="learning_rte \\(did you mean learning_rate\\?\\)"):
        pretrain.main([str(args_file)])
    with pytest.raises(UsageError, match="--preset or --config_name, not both"):
        pretrain.main(pretrain_argv(files, tmp_path / "out", "--config_name", str(tmp_path)))


def test_resume_needs_a_checkpoint_and_old_checkpoints_are_not_overwritten(checkpoint, files, tmp_path):
    out, _, _ = checkpoint
    with pytest.raises(UsageError, match="missing/checkpoint-5 does not exist"):
        pretrain.main(pretrain_argv(files, tmp_path / "new", "--resume_from_checkpoint", "missing/checkpoint-5"))
    with pytest.raises(UsageError, match="holds checkpoints of an earlier run \\(last: checkpoint-4\\).*"
                                         "--resume_from_checkpoint .*checkpoint-4.*--overwrite_output_dir"):
        pretrain.main(pretrain_argv(files, out, "--max_steps", "1"))


def test_damaged_weights_name_the_file(checkpoint, tmp_path):
    out, _, _ = checkpoint
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged, ignore=shutil.ignore_patterns("checkpoint-*"))
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UsageError, match=f"Cannot read {weights}: .*incomplete or damaged"):
        generate.main(["--model_name_or_path", str(damaged), "--prompt", "Alice", "--max_new_tokens", "2"])


def test_generate_dtype_device_and_folder_errors(checkpoint, tmp_path):
    import torch

    out, _, _ = checkpoint
    base = ["--model_name_or_path", str(out), "--prompt", "Alice", "--max_new_tokens", "2", "--no_stream"]
    assert generate.main(base + ["--dtype", "fp32"])  # the short names are accepted
    args_file = tmp_path / "generate.json"  # a file of options works as the flags do
    args_file.write_text(json.dumps({"model_name_or_path": str(out), "prompt": ["Alice"], "max_new_tokens": 2,
                                     "stream": False, "dtype": "bf16"}))
    assert generate.main([str(args_file)])[0].startswith("Alice")
    with pytest.raises(UsageError, match="--dtype float8 is not one of float32, fp32"):
        generate.main(base + ["--dtype", "float8"])
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--device cuda: this machine .* has no cuda device"):
            generate.main(base + ["--device", "cuda"])
    with pytest.raises(UsageError, match="folder ./outputs/gtp2 does not exist"):
        generate.main(["--model_name_or_path", "./outputs/gtp2", "--prompt", "Alice"])


def test_unreachable_hub_dataset_fails_at_once(files, tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    argv = pretrain_argv(files, tmp_path / "out", "--max_steps", "1")
    i = argv.index("--train_files")
    argv[i:i + 3] = ["--dataset_name", "wikitext"]
    start = time.monotonic()
    with pytest.raises(CorpusError, match="'wikitext' is not a local folder and the Hub .* cannot be reached"):
        pretrain.main(argv)
    assert time.monotonic() - start < 10


def test_command_line_contract_and_ctrl_c(checkpoint, files, tmp_path, capsys, monkeypatch):
    import subprocess

    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "generate.py"), "--model_name_or_path",
                             str(tmp_path / "nope"), "--max_new_tokenz", "3"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: Unrecognised argument(s): --max_new_tokenz (did you mean --max_new_tokens?). See --help."

    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    model_args, data_args, training_args = pretrain.parse_args(
        pretrain_argv(files, out, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2"))
    with pytest.raises(Interrupted, match=f"stopped at step 3. Resume .*--resume_from_checkpoint {out}/checkpoint-2"):
        pretrain.run_pretraining(model_args, data_args, training_args, callbacks=[CtrlC()])
    assert not (out / "config.json").exists()

    # A Ctrl-C whose KeyboardInterrupt was lost on its way (raised in a finalizer, printed as "Exception ignored"):
    # what the signal handler remembers stops training at the next step all the same.
    import lmblocks.cli

    class LostCtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                monkeypatch.setattr(lmblocks.cli.CtrlC, "pressed", True)

    out = tmp_path / "lost"
    model_args, data_args, training_args = pretrain.parse_args(pretrain_argv(files, out, "--max_steps", "6"))
    with pytest.raises(Interrupted, match="stopped at step 3; no checkpoint was saved yet"):
        pretrain.run_pretraining(model_args, data_args, training_args, callbacks=[LostCtrlC()])
    monkeypatch.setattr(lmblocks.cli.CtrlC, "pressed", False)

    def interrupted():
        raise Interrupted("stopped at step 3. Resume with ...")

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_script(interrupted)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted: stopped at step 3. Resume with ...\n"


# --- what the scripts write (points 11-16) -----------------------------------------------------------------------

def test_checkpoint_card_cache_and_logging(checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    out, metrics, pin_memory = checkpoint
    card = (out / "README.md").read_text()
    assert f'AutoModelForCausalLM.from_pretrained("{out}", trust_remote_code=True)' in card
    official_hub_id = '"gpt2"'  # the card must name this model, not the official checkpoint it was built like
    assert f"from_pretrained({official_hub_id}" not in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.use_cache is True
    assert model(torch.tensor([[1, 2, 3]])).past_key_values is not None
    # Default logging_steps (500) on a 4-step run: a loss at every step instead of none.
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h][:4] == [1, 2, 3, 4]
    assert metrics["steps_this_run"] == 4
    assert pin_memory == []


def test_tokens_per_second_after_a_resume_counts_this_runs_steps(checkpoint, files, tmp_path):
    import logging

    out, _, _ = checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers.trainer").addHandler(handler)
    try:
        metrics = pretrain.main(pretrain_argv(files, resumed, "--max_steps", "4", "--save_strategy", "no",
                                              "--resume_from_checkpoint", "true"))
    finally:
        logging.getLogger("transformers.trainer").removeHandler(handler)
    # The tied lm_head is not in the checkpoint, and needs not be: no "missing keys" warning on an exact resume.
    assert not [m for m in messages if "missing keys" in m], messages
    assert metrics["train_steps"] == 4 and metrics["steps_this_run"] == 2
    tokens = 2 * 4 * 16  # steps this run × batch × block
    assert metrics["tokens_per_second"] == pytest.approx(tokens / metrics["train_runtime"], rel=1e-6)


def test_export_carries_the_tokenizer_and_the_cache(checkpoint, tmp_path):
    from transformers import GPT2LMHeadModel, pipeline

    out, _, _ = checkpoint
    exported = tmp_path / "exported"
    export_gpt2.main([str(out), str(exported)])
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in exported.iterdir()}
    assert json.loads((exported / "config.json").read_text())["use_cache"] is True
    generator = pipeline("text-generation", model=GPT2LMHeadModel.from_pretrained(exported),
                         tokenizer=str(exported))
    text = generator("Alice was", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("Alice was") and len(text) > len("Alice was")
    auto = pipeline("text-generation", model=str(exported))
    assert auto("Alice was", max_new_tokens=4, do_sample=False)[0]["generated_text"] == text


def test_instruct_adapter_card_chat_template_and_generate(checkpoint, tmp_path, monkeypatch, capsys):
    import warnings

    from transformers import AutoTokenizer

    out, _, _ = checkpoint
    rows = [{"instruction": f"Say {w}.", "response": w} for w in ("yes", "no", "maybe", "never")]
    (tmp_path / "ins.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.chdir(out.parent)  # the base model named by a relative path, as a user types it
    adapter = tmp_path / "instruct"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune.main(["--model_name_or_path", out.name, "--task", "instruct", "--train_file",
                       str(tmp_path / "ins.jsonl"), "--lora_r", "2", "--max_steps", "2", "--save_strategy", "no",
                       "--max_length", "32", "--output_dir", str(adapter), *QUIET])
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == out.name
    card = (adapter / "README.md").read_text()
    assert "LoRA adapter" in card and "holds the adapter only" in card
    assert f'AutoPeftModelForCausalLM.from_pretrained("{adapter}"' in card
    assert "modelling code is in this folder" not in card

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Say yes."}], add_generation_prompt=True,
                                         tokenize=False) == "### Instruction:\nSay yes.\n\n### Response:\n"
    assert tokenizer.model_max_length == POSITIONS
    ids = generate.encode_prompt(tokenizer, "Say yes.", use_template=True)
    assert tokenizer.decode(ids[0]) == finetune.PROMPT_TEMPLATE.format(instruction="Say yes.")


def test_finetune_ends_with_its_metric(checkpoint, tmp_path, capsys):
    import logging

    out, _, _ = checkpoint
    rows = []
    for label in ("alice29", "botchan"):
        words = (out.parent / f"{label}.txt").read_text().split()
        rows += [{"text": " ".join(words[i * 12:(i + 1) * 12]), "label": label} for i in range(10)]
    (tmp_path / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        metrics = finetune.main(["--model_name_or_path", str(out), "--train_file", str(tmp_path / "cls.jsonl"),
                                 "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
                                 "--save_strategy", "no", "--max_length", "8", "--output_dir", str(tmp_path / "cls"),
                                 *QUIET])
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    # Said once by the script, not as transformers' warnings about over-long inputs or re-aligned pad tokens.
    assert not [m for m in messages if "sequence length is longer" in m or "PAD/BOS/EOS" in m], messages
    stdout = capsys.readouterr().out
    assert "training rows are longer than --max_length 8 tokens" in stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("[finetune] saved gpt2 seq_cls to") and f"(accuracy {metrics['accuracy']:.3f})" in last
