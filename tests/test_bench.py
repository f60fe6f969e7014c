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


def test_matvec_ceiling_groups_products_of_one_input():
    """The decoding ceiling captures a real step's products: LLaMA's q/k/v and gate/up share an input (one product
    each when grouped), GPT-2's are fused in the checkpoint already."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import limits
    import torch

    from families import GPT2, LLAMA

    prompt = torch.randint(3, 99, (1, 6))
    llama = LLAMA.causal_lm_class(LLAMA.tiny_config()).eval()
    ceiling = limits.matvec_ceiling(llama, prompt, reps=1)
    layers = llama.config.num_hidden_layers
    assert ceiling["matvec_products"] == 7 * layers + 1  # q, k, v, o, gate, up, down per layer + the LM head
    assert ceiling["matvec_grouped_products"] == 4 * layers + 1  # qkv, o, gate·up, down
    assert ceiling["matvec_separate_gbs"] > 0 and ceiling["matvec_grouped_gbs"] > 0
    gpt2 = GPT2.causal_lm_class(GPT2.tiny_config()).eval()
    ceiling = limits.matvec_ceiling(gpt2, prompt, reps=1)
    assert ceiling["matvec_products"] == ceiling["matvec_grouped_products"] == 4 * gpt2.config.n_layer + 1
