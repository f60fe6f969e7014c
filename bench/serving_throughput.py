"""Rough decoding throughput of `vllm serve` vs transformers' `generate` on the same lmblocks checkpoint.

    .venv-vllm/bin/python bench/serving_throughput.py CHECKPOINT [--batch 8] [--new-tokens 64] [--compile]

Both run in the vLLM venv, on the checkpoint's own code (trust_remote_code), in fp32: the server
(`scripts/serve.py`, eager unless `--compile`) answers one `/v1/completions` request holding `--batch` prompts, and
`generate` decodes the same prompts as one left-padded batch; every row makes exactly `--new-tokens` tokens (eos held
back on both sides), torch on one thread on both sides. Each side is warmed up once, then timed once: a ratio from one run, not a benchmark table (see
bench/README.md for those). Prints one line per side and the ratio, tokens/s of vLLM ÷ transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The cat sat on the", "Once upon a time there was", "I am a", "He said that the school master",
    "In the morning the", "She looked at the", "It was a dark and", "We went down to the river and",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def vllm_tokens_per_second(checkpoint: str, prompts: list[str], new_tokens: int, compile_: bool) -> float:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "serve.py"), checkpoint, "--port", str(port),
               "--dtype", "float32", "--kv-cache-gib", "1", "--"] + ([] if compile_ else ["--enforce-eager"])
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serving_throughput_{port}.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {log.name}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        body = {"model": checkpoint, "prompt": prompts, "max_tokens": new_tokens, "min_tokens": new_tokens,
                "temperature": 0.0}
        _post(f"{base}/v1/completions", body)  # warm-up
        start = time.perf_counter()
        response = _post(f"{base}/v1/completions", body)
        elapsed = time.perf_counter() - start
        return response["usage"]["completion_tokens"] / elapsed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def transformers_tokens_per_second(checkpoint: str, prompts: list[str], new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # vLLM's CPU worker runs torch on one thread per rank, bound to a core (it logs "Reducing Torch threads ... for
    # serving"); transformers gets the same, so the ratio compares the engines, not thread counts.
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(**batch, **kwargs)  # warm-up
        start = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (minutes on CPU)")
    args = parser.parse_args()
    if not 1 <= args.batch <= len(PROMPTS):
        parser.error(f"--batch must be between 1 and {len(PROMPTS)}")
    prompts = PROMPTS[: args.batch]
    served = vllm_tokens_per_second(args.checkpoint, prompts, args.new_tokens, args.compile)
    print(f"vllm serve ({'compiled' if args.compile else 'eager'}): {served:.1f} new tokens/s", flush=True)
    generated = transformers_tokens_per_second(args.checkpoint, prompts, args.new_tokens)
    print(f"transformers generate: {generated:.1f} new tokens/s")
    print(f"ratio vllm / transformers: {served / generated:.2f} (batch {args.batch}, {args.new_tokens} new tokens)")


if __name__ == "__main__":
    main()
