"""The compiled training step, lmblocks against the built-in, measured in CPU thread time and profiled.

    .venv/bin/python bench/compile_probe.py gpt2 [--reps 8]

Same models, weights and step as `bench/run.py`'s `train_compile` phase (small size, batch 2 × 64 to keep it short),
one torch thread. Wall-clock ratios of a few percent drown in the load of a shared machine; the CPU time of the one
thread that runs the step does not count the time the scheduler gives to other processes, so the interleaved
per-step thread times compare the code. Then torch.profiler over three steps of each: the compiled graphs (one row
per `CompiledFxGraph`, that is per graph the compiler produced: graph breaks show as extra rows) and the kernels they
call. Prints and writes `bench/results/compile-probe-<family>.txt`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import harness  # noqa: E402

WORK = dict(train_batch=2, train_seq=64, fwd_batch=2, fwd_seq=64, prompt=4, new_tokens=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=list(harness.FAMILIES))
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf = harness.build(args.family, "small", "transformers", "sdpa", torch.float32, "cpu")
    lmb = harness.build(args.family, "small", "lmblocks", "sdpa", torch.float32, "cpu", weights_from=hf)
    runners = {"lmblocks": harness.Runner(args.family, lmb, "train_compile", WORK, "cpu"),
               "transformers": harness.Runner(args.family, hf, "train_compile", WORK, "cpu")}
    out = [f"{args.family}/small/train_compile, batch {WORK['train_batch']} × {WORK['train_seq']}, 1 thread"]
    for name, runner in runners.items():
        start = time.perf_counter()
        runner.step(), runner.step()
        out.append(f"{name}: compilation + 2 steps {time.perf_counter() - start:.0f} s")
    times: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(args.reps):
        for name in (harness.IMPLS if rep % 2 == 0 else harness.IMPLS[::-1]):
            start = time.thread_time()
            runners[name].step()
            times[name].append(time.thread_time() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        out.append(f"{name}: thread time per step min {min(t):.3f} s, median {medians[name]:.3f} s")
    out.append(f"speed lmblocks ÷ transformers (medians): {medians['transformers'] / medians['lmblocks']:.3f}")
    for name, runner in runners.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                runner.step()
        out += [f"===== {name}: 3 steps", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16)]
    text = "\n".join(out)
    (BENCH_DIR / "results" / f"compile-probe-{args.family}.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
