"""The benchmark harness runs end to end (`bench/run.py --smoke`: tiny models, one rep, seconds).

Checks only that every measurement completes and the report is written — never a speed: timings on shared CI
machines are noise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--smoke", "--families", "gpt2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"machine", "peak", "time", "memory"} <= kinds, kinds
    timed = [r for r in records if r["kind"] == "time"]
    assert {r["impl"] for r in timed} == {"lmblocks", "transformers"}
    assert all(r["max_abs_logit_diff"] < 1e-4 for r in timed)
    assert "| gpt2 | tiny | train_eager |" in (tmp_path / "smoke.md").read_text()
