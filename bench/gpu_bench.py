"""lmblocks against transformers' built-in classes on one CUDA GPU, bf16, side by side.

    .venv/bin/python bench/gpu_bench.py             # about 10 minutes on an H100/H200-class GPU
    .venv/bin/python bench/gpu_bench.py --quick     # fewer reps, no compiled training (about 3 minutes)

Without CUDA it prints one line saying so and exits 0, writing nothing (so it is safe to call anywhere).

What it measures, per attention kernel (`sdpa`, and `flash_attention_2` when the `flash_attn` package is installed),
with the same harness as `bench/run.py` (same weights, logits parity checked first, interleaved reps):
- GPT-2 124M training, batch 8 × 1024: tokens/s and MFU, eager and under `torch.compile`;
- GPT-2 124M batch-1 decoding: static cache with transformers' compiled decoding step (`reduce-overhead`, CUDA
  graphs) and the dynamic cache, ms per token and the fraction of the HBM bandwidth roofline;
- peak memory (`torch.cuda.max_memory_allocated`) of one training step with labels, GPT-2 124M and LLaMA small with
  a 128,256-token vocabulary, where lmblocks' fused LM-head loss never builds the logits matrix.
MFU is relative to the best bf16 8192³ matmul measured in the same run (on an H200, dense bf16 is specified at
989 TFLOP/s; the measured figure is what this software stack reaches). Results: `bench/results/gpu.{jsonl,md}`.

Jobs run one after another in this process (CUDA cannot be used in forked children once the parent has touched it);
models are freed and the allocator's peak statistics reset between jobs.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

SKIPPED = "gpu_bench: skipped — CUDA is not available on this machine (nothing run, nothing written)."
TRAIN_WORK = dict(train_batch=8, train_seq=1024, fwd_batch=8, fwd_seq=1024, prompt=16, new_tokens=256)
REPS = {"full": dict(train=10, generate=3), "quick": dict(train=4, generate=2)}


def plan(quick: bool, attns: list[str]) -> list[dict[str, Any]]:
    """The jobs, cheapest first, so a run stopped early still has the eager rows."""
    reps = REPS["quick" if quick else "full"]
    common = dict(device="cuda", dtype="bfloat16", threads=1)
    jobs: list[dict[str, Any]] = [dict(kind="peak", **common, attn="sdpa"),
                                  dict(kind="bandwidth", **common, attn="sdpa", section="limits")]
    for attn in attns:
        phases = ["train_eager", "generate_dynamic_b1", "generate_static_b1"] + ([] if quick else ["train_compile"])
        for phase in phases:
            kind = phase.split("_")[0]
            jobs.append(dict(kind="time", family="gpt2", size="base", phase=phase, work=TRAIN_WORK, reps=reps[kind],
                             warmup=2, attn=attn, **common))
    for family, size in (("gpt2", "base"), ("llama", "small_v128k")):
        for impl in ("lmblocks", "transformers"):
            jobs.append(dict(kind="memory", family=family, size=size, phase="train_eager", impl=impl,
                             work=TRAIN_WORK, steps=1, attn="sdpa", section="limits", **common))
    return jobs


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run(jobs: list[dict[str, Any]], out_dir: Path, mode: str, notes: list[str], device: str = "cuda") -> Path:
    """Runs `jobs` in order, rewriting `<out_dir>/<mode>.{jsonl,md}` after each (`device` is where the matmul peak
    is measured; tests run a tiny CPU version of the plan through here)."""
    import harness
    import run as cpu_run

    cuda_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    records: list[dict[str, Any]] = [cpu_run.machine_info(threads=1, cuda_name=cuda_name)]
    started = time.monotonic()
    for i, job in enumerate(jobs, 1):
        t0 = time.monotonic()
        try:
            if job["kind"] == "peak":
                n = 8192 if device.startswith("cuda") else 256
                new = [dict(kind="peak", device=device, dtype=job["dtype"], threads=1,
                            matmul_flops=harness.matmul_peak_flops(device, getattr(torch, job["dtype"]), n=n))]
            else:
                new = harness.run_job(job)
        except Exception as err:  # noqa: BLE001 - recorded in the report, the next job still runs
            new = [dict(kind="error", job=cpu_run._job_key(job), error=f"{type(err).__name__}: {err}",
                        traceback=traceback.format_exc(limit=8))]
        for r in new:
            if "section" in job:
                r["section"] = job["section"]
        records += new
        _free()
        print(f"[{i}/{len(jobs)} {time.monotonic() - started:6.0f}s] {cpu_run._job_key(job)} "
              f"({time.monotonic() - t0:.0f}s): {'; '.join(cpu_run._one_line(r) for r in new)}", flush=True)
        records[0]["wall_s"] = time.monotonic() - started
        records[0]["load_average_end"] = os.getloadavg()[0]
        cpu_run.write_report(out_dir, mode, records, notes)
    return out_dir / f"{mode}.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer reps, no compiled training")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="output folder")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(SKIPPED)
        return 0
    import lmblocks  # noqa: F401  (registers the families)

    attns, notes = ["sdpa"], []
    try:
        import flash_attn  # noqa: F401

        attns.append("flash_attention_2")
    except ImportError:
        notes.append("flash_attention_2 skipped: the `flash_attn` package is not installed.")
    torch.backends.cuda.matmul.allow_tf32 = True
    mode = "gpu_quick" if args.quick else "gpu"
    md = run(plan(args.quick, attns), args.out, mode, notes)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
