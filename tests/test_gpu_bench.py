"""`bench/gpu_bench.py` (the CUDA half of the benchmark) skips cleanly where there is no GPU: one line, exit 0,
nothing written. On a machine with CUDA this test skips itself: the script then really runs (minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the GPU benchmark would run, not skip")
def test_gpu_bench_skips_without_cuda(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_bench.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [
        "gpu_bench: skipped — CUDA is not available on this machine (nothing run, nothing written)."
    ]
    assert not any(tmp_path.iterdir())


def test_gpu_bench_plans_the_issue_rows():
    """The job list: GPT-2 124M training (eager, compiled) and batch-1 decoding (static + compile, dynamic) per
    attention kernel, and the training-memory rows of both vocabularies."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import gpu_bench
    finally:
        sys.path.pop(0)
    jobs = gpu_bench.plan(quick=False, attns=["sdpa", "flash_attention_2"])
    timed = {(j["attn"], j["phase"]) for j in jobs if j["kind"] == "time"}
    for attn in ("sdpa", "flash_attention_2"):
        assert {(attn, p) for p in ("train_eager", "train_compile", "generate_static_b1")} <= timed
    memory = {(j["family"], j["size"], j["impl"]) for j in jobs if j["kind"] == "memory"}
    assert ("llama", "small_v128k", "lmblocks") in memory and ("gpt2", "base", "transformers") in memory
    assert all(j["device"] == "cuda" and j["dtype"] == "bfloat16" for j in jobs)


def test_gpu_bench_report_path_runs_on_a_tiny_cpu_plan(tmp_path, monkeypatch):
    """The same plan, shrunk to tiny models on the CPU in fp32 (compiled phases left out: minutes on CPU), goes
    through `run()` and writes a report with the timed rows, the memory rows and the roofline."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import gpu_bench
        import limits
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(limits, "STREAM_BYTES", 16 * 2**20)  # a light probe: the numbers are not the point here
    monkeypatch.setattr(limits, "MATVEC_BYTES", 8 * 2**20)
    tiny_work = dict(train_batch=2, train_seq=16, fwd_batch=2, fwd_seq=16, prompt=4, new_tokens=4)
    jobs = []
    for job in gpu_bench.plan(quick=True, attns=["sdpa"]):
        if "static" in job.get("phase", "") or job.get("size") == "small_v128k":  # the 128k-vocabulary rows
            continue
        job = {**job, "device": "cpu", "dtype": "float32"}
        if "work" in job:
            job.update(size="tiny", work=tiny_work, reps=1, warmup=1)
        jobs.append(job)
    md = gpu_bench.run(jobs, tmp_path, "gpu_smoke", [], device="cpu")
    text = md.read_text()
    assert "Failed measurements" not in text, text
    assert "| gpt2 | tiny | train_eager |" in text and "| gpt2 | tiny | generate_dynamic_b1 |" in text
    assert "## Limits" in text and "roofline" in text and "| gpt2 tiny (vocab 1,024) | 2 × 16 |" in text
