"""scripts/align.py: DPO through TRL's `DPOTrainer` on tiny lmblocks models.

The preference to learn is plain (the chosen answers say yes, the rejected ones no), so a few optimizer steps show
the DPO loss falling below log 2 and the held-out reward margin rising. LoRA: the adapter saves and reloads through
peft's Auto class. Bad input: one `error:` line, exit status 2, no folder that looks like a checkpoint. The script is
called in-process (`align.main(argv)` under `run_script`, as `python scripts/align.py` runs it) to spare a Python
start-up per case.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / ".cache" / "corpus"
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--logging_steps", "1",
          "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--save_strategy", "no",
          "--max_length", "64", "--beta", "0.1"]
SUBJECTS = ["the sky", "the sea", "this road", "the garden", "her cat", "the king", "that book", "the river",
            "his hat", "the tea", "the clock", "the door"]


def _load_align():
    spec = importlib.util.spec_from_file_location("align", REPO_ROOT / "scripts" / "align.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["align"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def align():
    return _load_align()


def _pairs(subjects: list[str]) -> list[dict]:
    return [{"prompt": f"Question: is {s} {adjective}? Answer:", "chosen": " yes, it is.",
             "rejected": " no, it is not.", "id": i}
            for i, (s, adjective) in enumerate((s, a) for s in subjects for a in ("good", "near", "old", "new"))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tokenizer and a tiny checkpoint per family (trained on / sized for a slice of a book), and pair files."""
    import lmblocks
    from lmblocks.tokenization_trainer import config_kwargs_from_tokenizer, save_tokenizer, train_tokenizer
    from lmblocks.training import parse_config_overrides

    root = tmp_path_factory.mktemp("align")
    text = (CORPUS / "alice29.txt").read_text(errors="replace")[:20000] + " yes no yes no Question Answer"
    for family, spec in lmblocks.FAMILIES.items():  # the sizes of the main job's --quick
        tokenizer = train_tokenizer(iter([text]), spec.tokenizer_kind, vocab_size=400, show_progress=False)
        save_tokenizer(tokenizer, root / family)
        fields = spec.config_class.__dataclass_fields__
        config = spec.config_class.from_preset(
            "tiny", **parse_config_overrides(spec.demo["quick_overrides"]),
            **{k: v for k, v in config_kwargs_from_tokenizer(tokenizer).items() if k in fields})
        spec.pretraining_class(config).save_pretrained(root / family)
    rows = _pairs(SUBJECTS)
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:40]))
    (root / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows[40:]))
    return root


@pytest.mark.parametrize("family, lora", [("gpt2", True), ("llama", False)], ids=["gpt2-lora", "llama-full"])
def test_dpo_loss_falls_and_reward_margin_rises(align, workdir, tmp_path, family, lora):
    import torch

    import lmblocks  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "aligned"
    argv = ["--model_name_or_path", str(workdir / family), "--train_file", str(workdir / "train.jsonl"),
            "--validation_file", str(workdir / "validation.jsonl"), "--output_dir", str(out), "--max_steps", "12",
            *COMMON]
    # LoRA with activation checkpointing on (TRL then needs input gradients), full weights with it off (the default).
    argv += ["--lora_r", "8", "--learning_rate", "1e-2", "--activation_checkpointing"] if lora else \
        ["--learning_rate", "3e-3"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = align.main(argv)
    # Neither peft's read of model.is_gradient_checkpointing nor TRL's gradient_checkpointing default may warn.
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)], [(str(w.message)[:60], w.filename, w.lineno) for w in caught]

    assert metrics["first_train_loss"] == pytest.approx(math.log(2), abs=0.01)  # policy == reference at step 0
    assert metrics["final_train_loss"] < metrics["first_train_loss"] - 0.1
    assert metrics["reward_margin"] > 0 and metrics["reward_accuracy"] == 1.0
    assert metrics["preference_margin_after"] > metrics["preference_margin_before"]
    assert metrics["preference_accuracy_after"] == 1.0
    assert metrics["eval_rewards/margins"] == pytest.approx(metrics["reward_margin"], rel=1e-3, abs=1e-4)
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["reward_margin"] == pytest.approx(metrics["reward_margin"])
    assert "DPO" in (out / "README.md").read_text()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]  # the main job plots it
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 13))

    # The saved model (adapter through peft's Auto class, or full weights) prefers the chosen answer.
    if lora:
        from peft import AutoPeftModelForCausalLM

        assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
        model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(model).__name__ == "LmbLlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = "Question: is the river old? Answer:"
    scores = {}
    for answer in (" yes, it is.", " no, it is not."):
        prompt_len = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(prompt + answer + tokenizer.eos_token, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        scores[answer] = log_probs[prompt_len - 1:].gather(-1, ids[0, prompt_len:, None]).sum().item()
    assert scores[" yes, it is."] > scores[" no, it is not."]


def _error(align, argv: list[str], capsys) -> str:
    from lmblocks.cli import run_script

    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: align.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.mark.parametrize("case", ["missing_column", "empty_data", "not_a_causal_lm", "merge_without_lora"])
def test_bad_input_gives_one_error_line(align, workdir, tmp_path, capsys, case):
    from lmblocks import FAMILIES

    encoder = next(name for name, spec in FAMILIES.items() if not spec.is_decoder)  # any family align refuses
    out = tmp_path / "out"
    model = str(workdir / "gpt2")
    train = workdir / "train.jsonl"
    if case == "missing_column":
        train = tmp_path / "pairs.jsonl"
        train.write_text("\n".join(json.dumps({"prompt": r["prompt"], "good": r["chosen"], "rejected": r["rejected"]})
                                   for r in _pairs(SUBJECTS[:3])))
    elif case == "empty_data":
        train = tmp_path / "pairs.csv"
        train.write_text("prompt,chosen,rejected\n")
    elif case == "not_a_causal_lm":
        model = str(workdir / encoder)
    argv = ["--model_name_or_path", model, "--train_file", str(train), "--output_dir", str(out), "--max_steps", "1",
            *COMMON]
    if case == "merge_without_lora":
        argv.append("--merge_lora")
    message = _error(align, argv, capsys)
    expected = {
        "missing_column": ["no column(s) ['chosen']", "'good'"],
        "empty_data": ["empty"],
        "not_a_causal_lm": [encoder, "not a causal language model"],
        "merge_without_lora": ["--merge_lora needs a LoRA run"],
    }[case]
    for fragment in expected:
        assert fragment in message, message
    assert not (out / "config.json").exists() and not (out / "adapter_config.json").exists()


def test_trl_head_scores_only_answer_tokens_on_cpu_with_the_same_log_probs(workdir, monkeypatch):
    """`trl_head_on_answer_tokens` (align.py runs inside it): TRL's fused LM head projects only the labelled rows on a
    CPU, with the log-probabilities of projecting every row. Fails when TRL renames the switch it turns."""
    import torch
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    import lmblocks
    from lmblocks.cli import trl_head_on_answer_tokens

    kernel, rows = trl_utils._ChunkedLogProbFunction, []

    class CountingKernel:  # the rows of hidden states TRL hands its chunked log-prob kernel
        @staticmethod
        def apply(hidden, *args):
            rows.append(hidden.shape[0])
            return kernel.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingKernel)
    model = lmblocks.LmbLlamaForCausalLM.from_pretrained(workdir / "llama").eval()
    add_fused_lm_head(model)
    torch.manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 12))
    labels = input_ids.masked_fill(torch.arange(12) < 8, -100)  # the last four tokens of each row are the answer
    with torch.no_grad():
        every = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
        with trl_head_on_answer_tokens():
            answers = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
    assert rows == [2 * 11, 2 * 4]  # every shifted position, then only the answers' tokens
    assert trl_utils._use_triton(torch.device("cpu")) is False  # restored on leaving
    torch.testing.assert_close(answers, every, rtol=0, atol=1e-5)
