"""Export an lmblocks GPT-2 checkpoint to the format of transformers' built-in GPT-2.

lmblocks saves GPT-2 as a plain state dict (nn.Linear layout) with its own `config.json` (`model_type: "lmb_gpt2"`)
and code files for `trust_remote_code`. This script writes a folder that transformers'
`GPT2Model` / `GPT2LMHeadModel` / `GPT2ForSequenceClassification` load with no lmblocks installed: a real
`GPT2Config` (`model_type: "gpt2"`), the weights (Conv1D layout, official key names, tied `lm_head` left out) and,
for language models, the generation config. The opposite direction needs no script:
`LmbGPT2LMHeadModel.from_pretrained(folder_saved_by_transformers_gpt2)` reads such a folder directly.

Usage:
    python scripts/export_gpt2.py path/to/lmblocks_checkpoint path/to/output_folder

    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("path/to/output_folder")

`lm_loss_weight` (the auxiliary LM loss of the classification head) has no counterpart in transformers' GPT-2 and is
not exported; a model with `qkv_bias=False` cannot be exported (transformers' GPT-2 always has that bias).
"""

from __future__ import annotations

import argparse

from transformers import AutoConfig

import lmblocks
from lmblocks.modeling_gpt2 import TRANSFORMERS_GPT2_ARCHITECTURES, export_to_transformers_gpt2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="folder written by an lmblocks GPT-2 model's save_pretrained")
    parser.add_argument("output", help="folder to write in transformers' GPT-2 format")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight file (default: 5GB)")
    args = parser.parse_args(argv)

    config = AutoConfig.from_pretrained(args.checkpoint)
    if not isinstance(config, lmblocks.LmbGPT2Config):
        parser.error(f"{args.checkpoint} holds a {type(config).__name__}, not an lmblocks GPT-2 checkpoint.")
    # The class named in the checkpoint's `architectures`, so a classifier stays a classifier.
    by_name = {model_class.__name__: model_class for model_class in TRANSFORMERS_GPT2_ARCHITECTURES}
    architecture = (config.architectures or ["LmbGPT2LMHeadModel"])[0]
    if architecture not in by_name:
        parser.error(f"cannot export architecture {architecture}; known: {', '.join(by_name)}.")
    model = by_name[architecture].from_pretrained(args.checkpoint)
    export_to_transformers_gpt2(model, args.output, max_shard_size=args.max_shard_size)
    print(f"Wrote {TRANSFORMERS_GPT2_ARCHITECTURES[type(model)]} checkpoint to {args.output}")


if __name__ == "__main__":
    main()
