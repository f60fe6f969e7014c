"""Run vLLM's offline engine on one lmblocks checkpoint and write what it computed as JSON.

    python vllm_offline.py generate CHECKPOINT REQUEST.json RESULT.json [--tensor-parallel-size N]
    python vllm_offline.py embed    CHECKPOINT REQUEST.json RESULT.json

`generate`: REQUEST has "prompts" and "max_tokens"; RESULT has "tokens", greedy, one list per prompt, all prompts
submitted at once (vLLM batches them). `embed`: REQUEST has "texts"; RESULT has "embeddings" from vLLM's pooling
runner (CLS pooling, normalised: vLLM's defaults for an embedding model).

A script of its own, run by the tests in a subprocess: vLLM starts its engine in child processes, so whatever calls
`vllm.LLM` needs the `if __name__ == "__main__":` guard, and a subprocess bounds each engine's time and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; vLLM's default (4) is more than tests need


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=["generate", "embed"])
    parser.add_argument("checkpoint")
    parser.add_argument("request")
    parser.add_argument("result")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args()
    request = json.loads(open(args.request).read())

    from vllm import LLM, SamplingParams

    # fp32 as transformers computed the reference; eager (no torch.compile) keeps start-up to seconds on CPU.
    common = dict(model=args.checkpoint, model_impl="transformers", trust_remote_code=True, dtype="float32",
                  enforce_eager=True, max_model_len=256, tensor_parallel_size=args.tensor_parallel_size)
    if args.task == "generate":
        llm = LLM(**common)
        # min_tokens holds eos back, as transformers' min_new_tokens does for the reference.
        params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], min_tokens=request["max_tokens"])
        outputs = llm.generate(request["prompts"], params)
        result = {"tokens": [list(output.outputs[0].token_ids) for output in outputs]}
    else:
        llm = LLM(runner="pooling", convert="embed", **common)
        outputs = llm.embed(request["texts"])
        result = {"embeddings": [list(output.outputs.embedding) for output in outputs]}
    with open(args.result, "w") as f:
        json.dump(result, f)
    leave_without_interpreter_teardown(llm)


def leave_without_interpreter_teardown(llm) -> None:
    """Shut vLLM's engine down, then exit 0 without Python's teardown.

    vLLM 0.32 on a CPU sometimes aborts after its own clean shutdown, while the interpreter finalises ("terminate
    called without an active exception", exit -6: seen once in CI after the engine had answered and logged
    "MPClient: complete"). The result is written by then; what would fail the test is teardown, not lmblocks.
    An error before this point still exits non-zero with vLLM's log.
    """
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
