"""The main job (`scripts/main.py`, `make demo`) in its quick mode, run as a user runs it (a subprocess): every stage
on tiny models — tokenizers, the three pretrainings, samples, the GPT-2 LoRA classifier, chat instruction tuning and
DPO (on the tiny LLaMA in quick mode), MiniLM retrieval on the real checkpoint, bits per byte — and the report with
its tables and one loss plot per training stage. About a minute on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_main_job_quick(tmp_path):
    out = tmp_path / "main"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "main.py"), "--quick", "--output_dir",
                             str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
    report = out / "report.md"
    assert f"Report: {report}" in result.stdout
    text = report.read_text()

    for family in ("gpt2", "llama", "bert"):  # pretraining from scratch
        assert f"| {family} |" in text
    assert "LoRA fine-tuning" in text and (out / "gpt2-books-lora" / "config.json").exists()

    # Bits per byte for the decoders, a number per model.
    assert "## Bits per byte" in text
    for label in ("gpt2 (from scratch)", "llama (from scratch)"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert 0 < float(row.split("|")[4]) < 20

    # Instruction tuning then DPO, with answers and held-out measures before and after each.
    assert "instruction tuning and DPO" in text and "| book accuracy (most likely answer) |" in text
    assert "reward accuracy" in text and "**Q1.**" in text
    for label in ("before", "after instruction tuning", "after DPO"):
        assert f"| {label} |" in text
    dpo = json.loads((out / "tiny-llama-dpo" / "all_results.json").read_text())
    assert {"preference_accuracy_before", "preference_accuracy_after", "reward_accuracy", "reward_margin"} <= set(dpo)
    assert (out / "tiny-llama-dpo" / "config.json").exists() and (out / "tiny-llama-dpo" / "adapter").is_dir()
    assert "| general questions answered right |" in text and "| book questions: true answer's loss" in text
    sft = json.loads((out / "tiny-llama-sft" / "all_results.json").read_text())
    assert {"eval_loss_before", "eval_loss"} <= set(sft)
    # The instruction-tuning rows mix corpus questions with the model's own answers to general instructions.
    rows = [json.loads(line) for line in (out / "data" / "sft_train.jsonl").read_text().splitlines()]
    assert {r["instruction"] for r in rows} & {"What is the boiling point of water at sea level?"}
    assert "What is the capital of France?" not in {r["instruction"] for r in rows}  # asked, never trained on

    # One loss plot per training stage, each linked from the report.
    plots = ["gpt2_loss.png", "llama_loss.png", "bert_loss.png", "gpt2-books-lora_loss.png",
             "tiny-llama-sft_loss.png", "tiny-llama-dpo_loss.png"]
    for png in plots:
        assert (out / png).stat().st_size > 1000 and f"]({png})" in text, png
    assert "kept no trainer_state.json" not in text
    for split in ("sft_train", "sft_eval", "dpo_train", "dpo_eval"):
        assert (out / "data" / f"{split}.jsonl").stat().st_size > 0

    # The real BERT retrieves passages.
    assert "all-MiniLM-L6-v2: passage retrieval" in text and "| top-1 accuracy |" in text
