"""Deprecated: use `scripts/export.py --format transformers`, which exports every family.

Exports an lmblocks GPT-2 checkpoint to transformers' built-in GPT-2 format (Conv1D layout, tokenizer included),
through the same code as `scripts/export.py`; it says so on stderr and keeps its old command line:

    python scripts/export_gpt2.py path/to/lmblocks_checkpoint path/to/output_folder [--max-shard-size 5GB]
    # is now
    python scripts/export.py --model_name_or_path path/to/lmblocks_checkpoint --output_dir path/to/output_folder
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # --help without the heavy imports below, when it was printed before
    from _help_cache import print_cached_help

    print_cached_help(__file__)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import export  # noqa: E402
from lmblocks.cli import ArgumentParser, check_checkpoint_path, loading, run_script  # noqa: E402
from lmblocks.training import UsageError  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="folder written by an lmblocks GPT-2 model's save_pretrained")
    parser.add_argument("output", help="folder to write in transformers' GPT-2 format")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight file")
    args = parser.parse_args(argv)
    print("scripts/export_gpt2.py is deprecated: use scripts/export.py --model_name_or_path CHECKPOINT --output_dir "
          "OUTPUT (every family; --format gguf for llama.cpp).", file=sys.stderr)

    from transformers import AutoConfig

    import lmblocks

    check_checkpoint_path(args.checkpoint)
    with loading(args.checkpoint):
        config = AutoConfig.from_pretrained(args.checkpoint)
    if not isinstance(config, lmblocks.LmbGPT2Config):
        raise UsageError(f"{args.checkpoint} holds a {type(config).__name__}, not an lmblocks GPT-2 checkpoint "
                         "(scripts/export.py exports every family).")
    export.main(["--model_name_or_path", args.checkpoint, "--output_dir", args.output, "--format", "transformers",
                 "--max_shard_size", args.max_shard_size])


if __name__ == "__main__":
    run_script(main)
