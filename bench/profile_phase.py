"""Where the time goes: torch.profiler over one phase of one implementation, top operators by self CPU time.

    .venv/bin/python bench/profile_phase.py gpt2 small train_eager lmblocks [--rows 25]

Same models, inputs and steps as `bench/run.py` (it uses `bench/harness.py`); one warm-up step, then `--steps`
profiled steps. Prints the operator table and writes it to `bench/results/profile-<family>-<size>-<phase>-<impl>.txt`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import harness  # noqa: E402
import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=list(harness.FAMILIES))
    parser.add_argument("size")
    parser.add_argument("phase", choices=harness.PHASES + harness.MEMORY_ONLY_PHASES)
    parser.add_argument("impl", choices=harness.IMPLS)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", default="full", choices=["full", "quick", "smoke"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = run.WORK[args.mode][args.size]
    model = harness.build(args.family, args.size, args.impl, "sdpa", torch.float32, "cpu")
    runner = harness.Runner(args.family, model, args.phase, work, "cpu")
    runner.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times = [runner.step()["seconds"] for _ in range(args.steps)]
    text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    header = f"{args.family}/{args.size}/{args.phase}/{args.impl}: profiled steps {', '.join(f'{t:.3f}' for t in times)} s\n"
    out = BENCH_DIR / "results" / f"profile-{args.family}-{args.size}-{args.phase}-{args.impl}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(header + text)
    print(header + text)


if __name__ == "__main__":
    main()
