"""lmblocks against transformers' built-in classes, side by side.

    .venv/bin/python bench/run.py            # `make bench`: every family, two sizes, every phase (≤ 20 min, 2 cores)
    .venv/bin/python bench/run.py --quick    # `make bench-quick`: small sizes, shorter runs (≤ 3 min)
    .venv/bin/python bench/run.py --smoke    # seconds: tiny models, one rep; checks the harness, not the speed

For each family (GPT-2, LLaMA, BERT) and size, both implementations are built from the same weights, checked to give
the same logits, and timed interleaved (A B, B A, ...) in one process per phase; min / median / max over the reps.
Peak memory is measured per phase and implementation, each in a fresh process holding only that model. MFU is
relative to the best n×n matmul FLOP/s measured at the start of the same run. Results: `bench/results/<mode>.jsonl`
(one JSON object per measurement) and `bench/results/<mode>.md` (the table, with machine, versions and date).

Every measurement runs in a forked child of this process (fresh address space, peak-RSS mark reset, no compiled
graphs carried over); the parent imports torch and transformers once but runs no kernels, so forking is safe.

Threads: `--threads 1` by default. On a shared 2-core machine, two OpenMP threads spin-wait on each other whenever
the scheduler preempts one, and the same step swings by 10×; one thread measures the code rather than the neighbours.
Pass `--threads 2` on a dedicated machine. With CUDA present the GPU section runs too (bf16; sdpa and, if
`flash_attn` is installed, flash_attention_2); without it that section is skipped and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# glibc adapts its mmap threshold to past frees, so whether a freed activation goes back to the OS (and out of the
# RSS) depends on the allocation history; a fixed threshold makes peak RSS a property of the model, not of luck.
# Set before anything allocates: re-executes this script once with it.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The parent forks the measurements, and a CUDA runtime call made before a fork leaves the children unable to use
# CUDA: ask NVML whether a GPU is there, and read its name in a child (`_cuda_name`).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

import harness  # noqa: E402
import limits  # noqa: E402
import lmblocks  # noqa: E402,F401  (registers the families)

# Work per measurement. Train/forward: batch × sequence; generate: prompt length and new tokens (batch in the phase).
WORK = {
    "full": {
        "small": dict(train_batch=4, train_seq=128, fwd_batch=4, fwd_seq=128, prompt=16, new_tokens=128),
        "base": dict(train_batch=2, train_seq=128, fwd_batch=2, fwd_seq=128, prompt=16, new_tokens=128),
    },
    "quick": {
        "small": dict(train_batch=2, train_seq=64, fwd_batch=2, fwd_seq=64, prompt=8, new_tokens=24),
    },
    "smoke": {
        "tiny": dict(train_batch=2, train_seq=16, fwd_batch=2, fwd_seq=16, prompt=4, new_tokens=4),
    },
    "gpu": {
        "small": dict(train_batch=8, train_seq=512, fwd_batch=8, fwd_seq=512, prompt=16, new_tokens=128),
        "base": dict(train_batch=8, train_seq=512, fwd_batch=8, fwd_seq=512, prompt=16, new_tokens=128),
    },
}
# Timed repetitions per phase (after warm-up), by mode.
REPS = {
    "full": dict(train=4, forward=4, generate=3),
    "quick": dict(train=4, forward=10, generate=3),
    "smoke": dict(train=1, forward=1, generate=1),
    "gpu": dict(train=10, forward=10, generate=3),
}
PHASES_BY_MODE = {
    # Compiled batch-8 decoding is left to the GPU run: on CPU batch 8 is compute-bound, and its compilation cost
    # minutes of the 20-minute budget.
    "full": tuple(p for p in harness.PHASES if p != "generate_static_b8"),
    # Compilation alone takes minutes per model on 2 cores: quick runs measure the eager phases only.
    "quick": ("train_eager", "forward", "generate_dynamic_b1", "generate_dynamic_b8"),
    "smoke": ("train_eager", "forward", "generate_dynamic_b1"),
}
# Memory: the eager phases, gradient checkpointing and compiled training (a memory job compiles its model again, so
# the compiled decoding phases are left out).
MEMORY_PHASES_BY_MODE = {
    # Compiled training's memory was within 3 % of eager in every earlier run; its compilations (twice per model)
    # were the slowest memory jobs. `--phases train_compile` measures it.
    # Decoding memory (the KV cache, +26–41 MB in both implementations) is left to `--phases generate_dynamic_b8`.
    "full": ("train_eager", "train_eager_gc", "forward"),
    "quick": ("train_eager", "train_eager_gc", "forward", "generate_dynamic_b8"),
    "smoke": ("train_eager",),
}
GPU_SKIPPED = ("GPU section skipped: CUDA is not available on this machine (on a GPU it runs bf16 with sdpa and, if "
               "`flash_attn` is installed, flash_attention_2).")
JOB_TIMEOUT_S = {"full": 600, "quick": 240, "smoke": 120, "gpu": 600}


def run_forked(job: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    """Runs `harness.run_job(job)` in a forked child and returns its records (an error record if it fails)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        status = 0
        try:
            records = harness.run_job(job)
        except BaseException as err:  # noqa: BLE001 - reported to the parent, never swallowed
            records = [dict(kind="error", job=_job_key(job), error=f"{type(err).__name__}: {err}",
                            traceback=traceback.format_exc(limit=8))]
            status = 1
        with os.fdopen(write_fd, "w") as pipe:
            pipe.write(json.dumps(records))
        os._exit(status)
    os.close(write_fd)
    chunks, deadline = [], time.monotonic() + timeout_s
    with os.fdopen(read_fd) as pipe:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return [dict(kind="error", job=_job_key(job), error=f"timed out after {timeout_s:.0f} s")]
            ready, _, _ = select.select([pipe], [], [], remaining)
            if ready:  # the child writes once, at the end: read to EOF
                chunks.append(pipe.read())
                break
    os.waitpid(pid, 0)
    text = "".join(chunks)
    if not text:
        return [dict(kind="error", job=_job_key(job), error="worker died without a result")]
    return json.loads(text)


def _job_key(job: dict[str, Any]) -> str:
    keys = ("kind", "family", "size", "phase", "impl", "device", "dtype", "attn", "section")
    return "/".join(str(job.get(k)) for k in keys if k in job)


def _compiled(phase: str) -> bool:
    return "compile" in phase or "static" in phase


# The CPU budget (20 minutes on 2 cores; a full run of every phase at both sizes took 33). Compiled phases run at one
# size (compiling takes minutes): training at the small size, where what compilation removes (Python and launch
# overhead) shows; batch-1 decoding at the base size, where the bandwidth-roofline target is set (bench/limits.py).
# Batch-8 decoding at the small size only (its base-size rows took five minutes). `--compile-all-sizes` lifts these.
ONE_SIZE_ON_CPU = {"generate_static_b1": "base", "generate_dynamic_b8": "small"}


def _skip_compiled_on_cpu(phase: str, size: str, device: str, compile_all_sizes: bool) -> bool:
    if compile_all_sizes or device.startswith("cuda"):
        return False
    if phase in ONE_SIZE_ON_CPU:
        return size != ONE_SIZE_ON_CPU[phase]
    return _compiled(phase) and size != "small"


def plan(mode: str, families: list[str], device: str, dtype: str, attn: str, threads: int,
         compile_all_sizes: bool = False, sizes: list[str] | None = None) -> list[dict[str, Any]]:
    """The jobs of one run: the matmul peak, then per family and size the timed phases and memory jobs, then the
    matmul peak again (the MFU denominator is the better of the two, so a busy moment at the start does not inflate
    every MFU). On CPU compiled phases run at one size each unless `compile_all_sizes` (`COMPILED_SIZE_ON_CPU`):
    compiling a model takes minutes on 2 CPU cores."""
    work_mode = "gpu" if device.startswith("cuda") else mode
    reps = REPS[work_mode]
    common = dict(device=device, dtype=dtype, attn=attn, threads=threads)
    jobs: list[dict[str, Any]] = [dict(kind="peak", **common)]
    for family in families:
        spec = harness.FAMILIES[family]
        for size, work in WORK[work_mode].items():
            if sizes and size not in sizes:
                continue
            phases = [p for p in PHASES_BY_MODE.get(mode, harness.PHASES) if spec.is_decoder or not p.startswith("generate")]
            phases = [p for p in phases if not _skip_compiled_on_cpu(p, size, device, compile_all_sizes)]
            if not spec.is_decoder and not device.startswith("cuda") and not compile_all_sizes:
                # BERT's compiled training tied in every CPU run (1.00-1.02×); two minutes of compiling.
                phases = [p for p in phases if p != "train_compile"]
            for phase in phases:
                kind = phase.split("_")[0]
                jobs.append(dict(kind="time", family=family, size=size, phase=phase, work=work,
                                 reps=reps[kind], warmup=1, **common))
            for phase in MEMORY_PHASES_BY_MODE.get(mode, harness.PHASES):
                if size != "small" and phase != "train_eager" and not device.startswith("cuda"):
                    continue  # base sizes: the training step's memory only (the other ratios matched the small size)
                # Decoding memory at the small size only on CPU: the KV cache is tens of MB either way, and a base-size
                # batch-8 generate costs half a minute per process.
                skip_generate = phase.startswith("generate") and size != "small" and not device.startswith("cuda")
                if skip_generate or (phase.startswith("generate") and not spec.is_decoder):
                    continue
                if not _skip_compiled_on_cpu(phase, size, device, compile_all_sizes):
                    for impl in harness.IMPLS:
                        jobs.append(dict(kind="memory", family=family, size=size, phase=phase, impl=impl,
                                         work=work, **common))
    if not device.startswith("cuda") and mode != "smoke":
        jobs += limits.jobs(mode, families, WORK[mode], reps, common)
    # Cheap before expensive, so an interrupted run still has every family: eager timings, eager memory, then the
    # compiled phases (minutes of compilation each).
    jobs = sorted(jobs, key=lambda job: (job["kind"] != "peak", _compiled(job.get("phase", "")), job["kind"] == "memory"))
    return jobs + [dict(kind="peak", **common)]


# ----------------------------------------------------------------------------------------------------------------
# Report.


def _cuda_name() -> str | None:
    """The GPU's name, read in a forked child so that this process never initialises CUDA (see above)."""
    if not torch.cuda.is_available():
        return None
    records = run_forked(dict(kind="device_name", threads=1), 120)
    return records[0].get("name") if records and records[0]["kind"] == "device_name" else None


def machine_info(threads: int, cuda_name: str | None = None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return dict(
        kind="machine", date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        cpu=cpu, cores=os.cpu_count(), threads=threads, python=platform.python_version(), torch=torch.__version__,
        transformers=transformers.__version__, lmblocks=lmblocks.__version__, commit=commit,
        cuda=cuda_name,
        load_average_start=os.getloadavg()[0],
    )


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "–"
    return f"{x:,.{digits}f}" if abs(x) >= 10 or digits == 0 else f"{x:.{digits}f}"


def table(records: list[dict[str, Any]]) -> list[str]:
    """The Markdown table: one row per family/size/phase (and device/attention), ratios lmblocks ÷ transformers
    (> 1 means lmblocks is faster, or for memory uses more). The limits section has its own (`limits.table`)."""
    records = [r for r in records if r.get("section") != "limits"]
    peaks: dict[tuple[str, str], float] = {}
    for r in records:
        if r["kind"] == "peak":
            key = (r["device"], r["dtype"])
            peaks[key] = max(peaks.get(key, 0.0), r["matmul_flops"])
    times: dict[tuple, dict[str, dict]] = {}
    mems: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r["kind"] in ("time", "memory"):
            key = (r["device"], r["attn"], r["family"], r["size"], r["phase"])
            (times if r["kind"] == "time" else mems).setdefault(key, {})[r["impl"]] = r
    lines = [
        "| family | size | phase | lmblocks tok/s (min–max) | transformers tok/s (min–max) | ratio | paired | "
        "ms/step lmb / tf | MFU lmb / tf | peak MB (Δ phase) lmb / tf | mem ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {p: i for i, p in enumerate(harness.PHASES + harness.MEMORY_ONLY_PHASES)}
    keys = sorted(set(times) | set(mems), key=lambda k: (k[0], k[1], k[2], k[3] != "small", order.get(k[4], 99)))
    for key in keys:
        device, attn, family, size, phase = key
        t, m = times.get(key, {}), mems.get(key, {})
        label = phase if device == "cpu" else f"{phase} ({attn})"
        cells = [family, size, label]
        if len(t) == 2:
            a, b = t["lmblocks"]["tokens_per_s"], t["transformers"]["tokens_per_s"]
            cells += [f"{_fmt(a['median'])} ({_fmt(a['min'])}–{_fmt(a['max'])})",
                      f"{_fmt(b['median'])} ({_fmt(b['min'])}–{_fmt(b['max'])})",
                      f"**{a['median'] / b['median']:.2f}×**", f"{t['lmblocks']['paired_ratio_median']:.2f}×"]
            if "ms_per_step" in t["lmblocks"]:
                cells.append(f"{t['lmblocks']['ms_per_step']['median']:.1f} / "
                             f"{t['transformers']['ms_per_step']['median']:.1f}")
            else:
                cells.append("–")
            peak = peaks.get((device, t["lmblocks"]["dtype"]))
            fpt = t["lmblocks"]["flops_per_token"]
            cells.append(f"{100 * a['median'] * fpt / peak:.0f}% / {100 * b['median'] * fpt / peak:.0f}%"
                         if peak else "–")
        else:
            cells += ["–"] * 6
        if len(m) == 2:
            ma, mb = m["lmblocks"], m["transformers"]
            cells += [f"{ma['peak_mb']:,.0f} ({ma['phase_mb']:+,.0f}) / {mb['peak_mb']:,.0f} ({mb['phase_mb']:+,.0f})",
                      f"{ma['peak_mb'] / mb['peak_mb']:.2f}×"]
        else:
            cells += ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(out_dir: Path, mode: str, records: list[dict[str, Any]], notes: list[str]) -> Path:
    machine = next(r for r in records if r["kind"] == "machine")
    peaks = [r for r in records if r["kind"] == "peak"]
    errors = [r for r in records if r["kind"] == "error"]
    timed = [r for r in records if r["kind"] == "time" and r.get("section") != "limits"]
    where = "; ".join(sorted({f"{r['dtype']}, {r['attn']} attention on {r['device'].upper()}" for r in timed})) or "–"
    lines = [
        f"# lmblocks vs transformers — `{mode}` run",
        "",
        f"{machine['date']} · {machine['cpu']} ({machine['cores']} cores, {machine['threads']} torch thread(s)) · "
        f"Python {machine['python']} · torch {machine['torch']} · transformers {machine['transformers']} · "
        f"lmblocks {machine['lmblocks']} ({machine['commit']}) · wall {machine.get('wall_s', 0) / 60:.1f} min · "
        f"load average {machine['load_average_start']:.1f} at start, {machine.get('load_average_end', 0):.1f} at end",
        "",
        f"Same weights, {where}. tok/s: median over interleaved reps (min–max). *ratio* = "
        "lmblocks median ÷ transformers median (> 1: lmblocks faster); *paired* = median of per-rep ratios of "
        "back-to-back runs (less sensitive to load drift). Generate: new tokens/s and median ms per decoding step "
        "(prefill excluded). MFU: model FLOPs/s ÷ the best square matmul FLOP/s measured at the start and the end "
        "of this run (" + ", ".join(f"{p['device']}/{p['dtype']} {p['matmul_flops'] / 1e9:,.1f}" for p in peaks)
        + " GFLOP/s)"
        + ". Peak MB: peak RSS of a process holding one model through the phase (Δ: rise over the loaded model); "
        "*mem ratio* < 1: lmblocks leaner.",
        "",
        *table(records),
        "",
        *limits.table(records),
    ]
    if errors:
        lines += ["Failed measurements:", ""] + [f"- `{e['job']}`: {e['error']}" for e in errors] + [""]
    lines += [f"- {n}" if not n.startswith("Tokenizer training (") else "## " + n for n in notes]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{mode}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    md = out_dir / f"{mode}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


# The full run trains on 20 MB and streams 200 MB (about 4 minutes) to stay within its 20-minute budget;
# `bench/bench_tokenizers.py` alone runs the tokenizer issue's 50 MB corpus and 1 GB stream.
TOKENIZER_ARGS = {"full": ["--corpus_mb", "20", "--stream_mb", "200"], "quick": ["--quick"]}


def tokenizer_figures(mode: str, timeout_s: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Runs the tokenizer engineer's `bench/bench_tokenizers.py` (its own full or `--quick` run) and returns its table
    for the report; it writes its own `bench/results/tokenizers.{jsonl,md}`."""
    script = BENCH_DIR / "bench_tokenizers.py"
    if not script.exists():
        return [], ["Tokenizer training: `bench/bench_tokenizers.py` not present in this checkout; skipped."]
    args = [sys.executable, str(script), *TOKENIZER_ARGS[mode]]
    print(f"tokenizer training: {' '.join(args[1:])}", flush=True)
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd=BENCH_DIR.parent)
    except subprocess.TimeoutExpired:
        return [], [f"Tokenizer training: `{' '.join(args[1:])}` timed out after {timeout_s:.0f} s."]
    table_md = BENCH_DIR / "results" / ("tokenizers.md" if mode == "full" else "tokenizers_quick.md")
    if proc.returncode != 0 or not table_md.exists():
        return ([dict(kind="error", job="tokenizers", error=proc.stderr.strip()[-500:])],
                [f"Tokenizer training failed (exit {proc.returncode}); see `bench/bench_tokenizers.py`."])
    command = " ".join(["bench/bench_tokenizers.py", *args[2:]])
    return [dict(kind="tokenizers", args=args[2:])], [f"Tokenizer training (`{command}`, its table "
                                                      f"`bench/results/{table_md.name}`):\n\n" + table_md.read_text()]


def existing_tokenizer_table(mode: str) -> list[str]:
    """The table of the last `bench/bench_tokenizers.py` run, when this run did not run it (without `--tokenizers`)."""
    table_md = BENCH_DIR / "results" / ("tokenizers.md" if mode == "full" else "tokenizers_quick.md")
    if not table_md.exists():
        return ["Tokenizer training: not run (add `--tokenizers`) and no earlier table in bench/results/."]
    return [f"Tokenizer training (not rerun here; the last `bench/bench_tokenizers.py` table, "
            f"`bench/results/{table_md.name}`):\n\n" + table_md.read_text()]


def rewrite_report(out_dir: Path, mode: str) -> Path:
    """Rebuilds `<mode>.md` from `<mode>.jsonl` (after editing the table code, or to add the tokenizer table)."""
    records = [json.loads(line) for line in (out_dir / f"{mode}.jsonl").read_text().splitlines()]
    has_table = any(r["kind"] == "tokenizers" for r in records) or mode == "limits"
    notes = [] if has_table else existing_tokenizer_table(mode)
    kept = records[0].get("notes")
    if kept is None:  # results written before notes were stored
        kept = [] if records[0].get("cuda") or mode == "smoke" else [GPU_SKIPPED]
    return write_report(out_dir, mode, records, kept + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode_group = parser.add_mutually_exclusive_group()
    mode_group.add_argument("--quick", action="store_true", help="small sizes, fewer reps (≤ 3 min)")
    mode_group.add_argument("--smoke", action="store_true", help="tiny models, one rep: checks the harness (seconds)")
    parser.add_argument("--families", nargs="+", default=list(harness.FAMILIES), choices=list(harness.FAMILIES))
    parser.add_argument("--sizes", nargs="+", help="only these sizes (default: all of the mode)")
    parser.add_argument("--phases", nargs="+", choices=harness.PHASES + harness.MEMORY_ONLY_PHASES,
                        help="only these phases (default: all of the mode)")
    parser.add_argument("--compile-all-sizes", action="store_true",
                        help="compiled phases at the base sizes too (CPU: tens of minutes more)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--tokenizers", action="store_true",
                        help="full runs: rerun bench/bench_tokenizers.py (about 4 minutes; by default its last table "
                             "is included)")
    parser.add_argument("--no-tokenizers", action="store_true", help="the default now; kept for old command lines")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section even if CUDA is present")
    parser.add_argument("--limits", action="store_true",
                        help="only the limits section of the full run (bench/limits.py) and the fp32 batch-1 decoding "
                             "it compares with; report in limits.{jsonl,md}")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1, see above)")
    parser.add_argument("--report-only", action="store_true", help="rebuild <mode>.md from <mode>.jsonl; run nothing")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="output folder")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.limits:
        mode = "limits"
        WORK["limits"], REPS["limits"], JOB_TIMEOUT_S["limits"] = WORK["full"], REPS["full"], JOB_TIMEOUT_S["full"]
        PHASES_BY_MODE["limits"], MEMORY_PHASES_BY_MODE["limits"] = ("generate_dynamic_b1", "generate_static_b1"), ()
    if args.report_only:
        print(rewrite_report(args.out, mode).read_text())
        return 0
    if args.phases:
        PHASES_BY_MODE[mode] = tuple(p for p in args.phases if p in harness.PHASES)
        MEMORY_PHASES_BY_MODE[mode] = tuple(args.phases)
    if args.no_memory:
        MEMORY_PHASES_BY_MODE[mode] = ()
    started = time.monotonic()
    records: list[dict[str, Any]] = [machine_info(args.threads, _cuda_name())]
    notes: list[str] = []
    families = []
    for family in args.families:
        missing = harness.family_available(family)
        if missing:
            notes.append(f"{family}: skipped — {missing}.")
        else:
            families.append(family)

    jobs = plan(mode, families, "cpu", "float32", "sdpa", args.threads, args.compile_all_sizes, args.sizes)
    if not args.no_gpu and torch.cuda.is_available() and mode != "smoke":
        gpu_mode = "quick" if mode == "quick" else "gpu"
        attns = ["sdpa"]
        try:
            import flash_attn  # noqa: F401

            attns.append("flash_attention_2")
        except ImportError:
            notes.append("GPU: flash_attention_2 skipped (the `flash_attn` package is not installed).")
        for attn in attns:
            gpu_jobs = plan(mode, families, "cuda", "bfloat16", attn, args.threads, sizes=args.sizes)
            if gpu_mode == "gpu":
                for job in gpu_jobs:
                    if "work" in job:
                        job["work"] = WORK["gpu"][job["size"]]
                    if job["kind"] == "time":
                        job["reps"] = REPS["gpu"][job["phase"].split("_")[0]]
            jobs += gpu_jobs[1:-1] if attn != "sdpa" else gpu_jobs
    elif not args.no_gpu:
        notes.append(GPU_SKIPPED)

    timeout = JOB_TIMEOUT_S[mode]
    for i, job in enumerate(jobs, 1):
        t0 = time.monotonic()
        new = run_forked(job, timeout)
        for r in new:
            if "section" in job:
                r["section"] = job["section"]
        records += new
        status = "; ".join(_one_line(r) for r in new)
        print(f"[{i}/{len(jobs)} {time.monotonic() - started:6.0f}s] {_job_key(job)} ({time.monotonic() - t0:.0f}s): "
              f"{status}", flush=True)
        records[0]["wall_s"] = time.monotonic() - started
        records[0]["load_average_end"] = os.getloadavg()[0]
        write_report(args.out, mode, records, notes + [f"Partial: {i} of {len(jobs)} measurements done."])

    # Quick runs include the tokenizer table of the last quick tokenizer run rather than spend two more minutes on it.
    if mode == "limits":
        pass
    elif mode == "full" and args.tokenizers and not args.no_tokenizers:
        tok_records, tok_notes = tokenizer_figures(mode, 480)
        records += tok_records
        notes += tok_notes
    elif mode != "smoke":
        notes += existing_tokenizer_table(mode)
    records[0]["wall_s"] = time.monotonic() - started
    records[0]["load_average_end"] = os.getloadavg()[0]
    records[0]["notes"] = [n for n in notes if not n.startswith("Tokenizer training")]
    md = write_report(args.out, mode, records, notes)
    print(md.read_text())
    return 1 if any(r["kind"] == "error" for r in records) else 0


def _one_line(r: dict[str, Any]) -> str:
    if r["kind"] == "time":
        extra = f", {r['ms_per_step']['median']:.1f} ms/step" if "ms_per_step" in r else ""
        return f"{r['impl']} {r['tokens_per_s']['median']:,.0f} tok/s{extra}"
    if r["kind"] == "memory":
        return f"{r['impl']} peak {r['peak_mb']:,.0f} MB ({r['phase_mb']:+,.0f})"
    if r["kind"] == "peak":
        return f"matmul {r['matmul_flops'] / 1e9:,.1f} GFLOP/s"
    if r["kind"] == "bandwidth":
        return f"copy {r['copy_gbs']:.1f} / triad {r['triad_gbs']:.1f} / matvec {r['matvec_gbs']:.1f} GB/s"
    return f"ERROR {r.get('error')}"


if __name__ == "__main__":
    sys.exit(main())
