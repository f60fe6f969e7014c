"""Export an lmblocks GPT-2 checkpoint to the format of transformers' built-in GPT-2.

lmblocks saves GPT-2 as a plain state dict (nn.Linear layout) with its own `config.json` (`model_type: "lmb_gpt2"`)
and code files for `trust_remote_code`. This script writes a folder that transformers'
`GPT2Model` / `GPT2LMHeadModel` / `GPT2ForSequenceClassification` load with no lmblocks installed: a real
`GPT2Config` (`model_type: "gpt2"`, `use_cache: true`), the weights (Conv1D layout, official key names, tied `lm_head`
left out), for language models the generation config, and the checkpoint's tokenizer (with `model_max_length` =
`n_positions`), so `pipeline("text-generation", model=output_folder)` works as it does for the official `gpt2`.
The opposite direction needs no script:
`LmbGPT2LMHeadModel.from_pretrained(folder_saved_by_transformers_gpt2)` reads such a folder directly.

Usage:
    python scripts/export_gpt2.py path/to/lmblocks_checkpoint path/to/output_folder

    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("path/to/output_folder")

`lm_loss_weight` (the auxiliary LM loss of the classification head) has no counterpart in transformers' GPT-2 and is
not exported; a model with `qkv_bias=False` cannot be exported (transformers' GPT-2 always has that bias).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # --help without the heavy imports below, when it was printed before
    from _help_cache import print_cached_help

    print_cached_help(__file__)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lmblocks.cli import ArgumentParser, check_checkpoint_path, loading, run_script  # noqa: E402
from lmblocks.training import UsageError  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoConfig, AutoTokenizer

    import lmblocks
    from lmblocks.modeling_gpt2 import TRANSFORMERS_GPT2_ARCHITECTURES, export_to_transformers_gpt2
    from lmblocks.tokenization_trainer import save_tokenizer

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="folder written by an lmblocks GPT-2 model's save_pretrained")
    parser.add_argument("output", help="folder to write in transformers' GPT-2 format")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight file")
    args = parser.parse_args(argv)

    check_checkpoint_path(args.checkpoint)
    with loading(args.checkpoint):
        config = AutoConfig.from_pretrained(args.checkpoint)
    if not isinstance(config, lmblocks.LmbGPT2Config):
        raise UsageError(f"{args.checkpoint} holds a {type(config).__name__}, not an lmblocks GPT-2 checkpoint.")
    # The class named in the checkpoint's `architectures`, so a classifier stays a classifier.
    by_name = {model_class.__name__: model_class for model_class in TRANSFORMERS_GPT2_ARCHITECTURES}
    architecture = (config.architectures or ["LmbGPT2LMHeadModel"])[0]
    if architecture not in by_name:
        raise UsageError(f"Cannot export architecture {architecture}; known: {', '.join(by_name)}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    except (OSError, ValueError):
        tokenizer = None
    with loading(args.checkpoint):
        model = by_name[architecture].from_pretrained(args.checkpoint)
    model.config.use_cache = True  # the Trainer saves False; a loaded model should decode with its cache
    export_to_transformers_gpt2(model, args.output, max_shard_size=args.max_shard_size)
    if tokenizer is not None:  # with vocab.json + merges.txt, as the official gpt2 folders have them
        save_tokenizer(tokenizer, args.output, model_max_length=model.config.n_positions)
    print(f"Wrote {TRANSFORMERS_GPT2_ARCHITECTURES[type(model)]} checkpoint to {args.output}"
          + ("" if tokenizer is not None else " (without a tokenizer: the checkpoint has none; copy one in before "
             "using it with pipeline or AutoTokenizer)"))


if __name__ == "__main__":
    run_script(main)
