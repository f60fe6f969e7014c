"""The main job (`scripts/main.py`, `make demo`) in its quick mode, run as a user runs it (a subprocess): every stage
on tiny models — tokenizers, the three pretrainings, samples, the GPT-2 LoRA classifier, chat instruction tuning and
DPO (on the tiny LLaMA in quick mode), MiniLM retrieval on the real checkpoint — and the report with its before →
after tables and one loss plot per training stage. Then what makes its figures trustworthy: step budgets, not the
clock, decide them; Ctrl-C, --resume and --overwrite. About two minutes on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MAIN = str(REPO_ROOT / "scripts" / "main.py")
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
SMALL = ["--quick", "--families", "gpt2", "--no_real_models"]  # tokenizers, GPT-2 pretraining, the classifier


def interruptible() -> None:
    """In the child before it starts: Ctrl-C's default action, even when the test runs in a shell's background job
    (which ignores SIGINT, and Python keeps an ignored SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_main(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, MAIN, *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def failure(result) -> str:
    return f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"


def test_main_job_quick(tmp_path):
    out = tmp_path / "main"
    result = run_main("--quick", "--output_dir", str(out))
    assert result.returncode == 0, failure(result)
    report = out / "report.md"
    assert f"Report: {report}" in result.stdout
    text = report.read_text()
    assert "stage 9/9" in result.stdout and "min left" in result.stdout  # where it is, and how long is left

    # Pretraining from scratch: steps done, tokens seen, before → after on held-out text, with chance levels.
    for family in ("gpt2", "llama", "bert"):
        assert f"| {family} |" in text
    for family in ("gpt2", "llama"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {family} | 512 |"))
        before, after = (float(x.strip(" *")) for x in row.split("|")[3].split("→"))
        assert 0 < after < 20 and 0 < before < 20
        assert "95 % CI" in row  # corpus words in samples, with n and interval
    assert "masked-token accuracy" in text and "always answering the most frequent masked token" in text

    # The classifier: before → after, chance, held-out size.
    assert "LoRA fine-tuning" in text and (out / "gpt2-books-lora" / "config.json").exists()
    assert "chance 0.20" in text and "Held-out accuracy on 10 passages" in text

    # Instruction tuning then DPO, with answers and held-out measures at every stage.
    assert "instruction tuning and DPO" in text and "| book accuracy (the true book's answer most likely" in text
    for label in ("before", "after instruction tuning", "after DPO"):
        assert f"| {label} |" in text
    assert "*Preference accuracy* asks the model itself" in text and "*Reward accuracy*" in text
    dpo = json.loads((out / "tiny-llama-dpo" / "all_results.json").read_text())
    assert {"preference_accuracy_before", "preference_accuracy_after", "reward_accuracy", "reward_margin"} <= set(dpo)
    assert (out / "tiny-llama-dpo" / "config.json").exists() and (out / "tiny-llama-dpo" / "adapter").is_dir()
    sft = json.loads((out / "tiny-llama-sft" / "all_results.json").read_text())
    assert {"eval_loss_before", "eval_loss"} <= set(sft)
    # The instruction-tuning rows mix corpus questions with the model's own answers to general instructions; the
    # DPO pairs prefer the true author of the passage's book to another book's.
    rows = [json.loads(line) for line in (out / "data" / "sft_train.jsonl").read_text().splitlines()]
    assert {r["instruction"] for r in rows} & {"What is the boiling point of water at sea level?"}
    assert "What is the capital of France?" not in {r["instruction"] for r in rows}  # asked, never trained on
    pair = json.loads((out / "data" / "dpo_train.jsonl").read_text().splitlines()[0])
    assert pair["prompt"].startswith("Which book is this passage from, and who wrote it?")
    assert pair["chosen"] != pair["rejected"] and pair["chosen"].split(", by ")[0] == pair["rejected"].split(", by ")[0]
    assert "| answer begun up to \"by\": names the true author |" in text and "Answers that DPO changed" in text

    # One loss plot per training stage, each linked from the report; held-out loss from step 0.
    plots = ["gpt2_loss.png", "llama_loss.png", "bert_loss.png", "gpt2-books-lora_loss.png",
             "tiny-llama-sft_loss.png", "tiny-llama-dpo_loss.png"]
    for png in plots:
        assert (out / png).stat().st_size > 1000 and f"]({png})" in text, png
    history = json.loads((out / "gpt2" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_loss" in h][0] == 0

    # The real BERT retrieves passages; the report says what each stage took and what to run next.
    assert "all-MiniLM-L6-v2: passage retrieval" in text and "| top-1 accuracy |" in text
    assert "## Stages" in text and "## What to run next" in text and "torch " in text
    assert "Precision: " in text  # bf16 autocast or fp32, and why


def stage_figures(out: Path) -> dict:
    """Every stage's result without what depends on the clock."""
    clock = ("time", "seconds", "per_second", "wall", "output_dir", "path")
    figures = {}
    for path in sorted((out / "stages").glob("*.json")):
        result = json.loads(path.read_text())
        figures[path.stem] = {k: v for k, v in result.items() if not any(c in k for c in clock)}
    return figures


def test_step_budgets_decide_the_figures(tmp_path):
    """Two runs with the same steps and very different time caps: the same figures (the caps never bind). In fp32,
    which every machine runs (the quick test above takes `auto`: bf16 where the CPU has it)."""
    first = run_main(*SMALL, "--precision", "fp32", "--minutes_per_model", "30", "--output_dir", str(tmp_path / "a"))
    second = run_main(*SMALL, "--precision", "fp32", "--minutes_per_model", "300", "--finetune_minutes", "100",
                      "--output_dir", str(tmp_path / "b"))
    assert first.returncode == 0 and second.returncode == 0, failure(first) + failure(second)
    figures = stage_figures(tmp_path / "a")
    assert set(figures) == {"tokenizers", "pretrain_gpt2", "classifier"}
    assert figures["pretrain_gpt2"]["bpb"]["bits_per_byte"] > 0
    assert figures == stage_figures(tmp_path / "b")
    assert "cut short" not in (tmp_path / "a" / "report.md").read_text()
    assert "Precision: fp32 (asked for" in (tmp_path / "a" / "report.md").read_text()


def test_a_time_cap_that_cuts_is_said_in_bold(tmp_path):
    result = run_main(*SMALL, "--pretrain_steps", "100000", "--minutes_per_model", "0.05",
                      "--output_dir", str(tmp_path / "cut"))
    assert result.returncode == 0, failure(result)
    line = next(line for line in result.stdout.splitlines() if "cut short by its time cap" in line)
    assert "of 100000 steps" in line and "**" in line
    assert "cut short by its time cap" in (tmp_path / "cut" / "report.md").read_text()


def test_ctrl_c_resume_and_overwrite(tmp_path):
    out = str(tmp_path / "run")
    flags = [*SMALL, "--pretrain_steps", "100000", "--minutes_per_model", "0.3", "--output_dir", out]
    process = subprocess.Popen([sys.executable, MAIN, *flags], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    seen = ""
    deadline = time.time() + 300
    while "stage 2/3" not in seen and time.time() < deadline:  # pretraining has started
        seen += process.stdout.readline()
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    said = [line for line in stderr.splitlines() if line.startswith("interrupted:")]  # after the progress bar's
    assert len(said) == 1, stderr[-2000:]
    assert said[0].startswith("interrupted: during pretraining gpt2") and f"--resume --output_dir {out}" in said[0]
    assert "--save_steps" not in stderr  # the scripts' own resume advice names flags main.py does not have

    again = run_main(*flags)
    assert again.returncode == 2 and "interrupted run" in again.stderr and "--resume" in again.stderr
    other = run_main(*flags[:-2], "--pretrain_steps", "3", "--resume", "--output_dir", out)
    assert other.returncode == 2 and "other settings" in other.stderr

    resumed = run_main(*flags, "--resume")
    assert resumed.returncode == 0, failure(resumed)
    assert "stage 1/3: tokenizers: finished in an earlier run, kept" in resumed.stdout
    assert "=== stage 2/3: pretraining gpt2" in resumed.stdout  # the interrupted stage runs again, whole
    assert (Path(out) / "report.md").exists()

    finished = run_main(*flags)
    assert finished.returncode == 2 and "finished run" in finished.stderr and "--overwrite" in finished.stderr
    assert len(finished.stderr.strip().splitlines()) == 1
    replaced = run_main(*SMALL, "--output_dir", out, "--overwrite")
    assert replaced.returncode == 0, failure(replaced)
    assert "finished in an earlier run" not in replaced.stdout
