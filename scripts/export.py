#!/usr/bin/env python
"""Export an lmblocks checkpoint to run elsewhere: transformers' own classes, or GGUF for llama.cpp.

`--format transformers` writes a folder of transformers' own class for the family (`GPT2LMHeadModel` in its Conv1D
layout, `LlamaForCausalLM`, `BertForPreTraining` / `BertModel` / `BertForMaskedLM`, the sequence-classification
heads, ...), with the checkpoint's tokenizer: `AutoModel*.from_pretrained(folder)` and `pipeline(...)` load it with
no lmblocks and no remote code, and compute the same logits. What transformers' class has no place for (GPT-2's
auxiliary LM loss weight λ) is named in the output. `--outtype` casts the weights (f32, f16, bf16).

`--format gguf` writes one `<checkpoint name>-<outtype>.gguf` file for llama.cpp (GPT-2, LLaMA and Qwen2 causal LMs):
architecture, hyper-parameters, tensors in f32, f16, bf16 or q8_0 (default f16), and the tokenizer as llama.cpp
needs it. transformers reads it back with `from_pretrained(folder, gguf_file=...)`.

Examples:
    python scripts/export.py --model_name_or_path outputs/main/llama --output_dir exported/llama-hf \\
        --format transformers
    python scripts/export.py --model_name_or_path outputs/main/llama --output_dir exported/llama-gguf \\
        --format gguf --outtype q8_0
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lmblocks.cli import check_checkpoint_path, loading, parse_arguments, run_script  # noqa: E402
from lmblocks.training import UsageError  # noqa: E402

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@dataclass
class ExportArguments:
    model_name_or_path: str = field(metadata={"help": "An lmblocks checkpoint folder (save_pretrained's)."})
    output_dir: str = field(metadata={"help": "Folder to write: the transformers checkpoint, or the .gguf file."})
    format: Literal["transformers", "gguf"] = field(default="transformers", metadata={
        "help": "transformers: a folder of transformers' own class; gguf: one file for llama.cpp."})
    outtype: Literal["f32", "f16", "bf16", "q8_0"] | None = field(default=None, metadata={
        "help": "Weight type: f32, f16, bf16, or q8_0 (gguf only). Default: the checkpoint's own for "
                "transformers, f16 for gguf."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest weight file (transformers format)."})


def load_checkpoint(path: str, needs_tokenizer: bool = False):
    """The checkpoint's lmblocks model, in the class its config names, and its tokenizer (or None); checked before
    the weights load."""
    from transformers import AutoConfig, AutoTokenizer

    import lmblocks  # noqa: F401  (registers the families)
    from lmblocks.families import FAMILY_OF_MODEL_TYPE

    check_checkpoint_path(path)
    with loading(path):
        config = AutoConfig.from_pretrained(path)
    spec = FAMILY_OF_MODEL_TYPE.get(getattr(config, "model_type", None))
    if spec is None:
        raise UsageError(f"{path} holds a {type(config).__name__} (model_type {config.model_type!r}), not an lmblocks "
                         f"checkpoint; lmblocks exports {', '.join(FAMILY_OF_MODEL_TYPE)}.")
    by_name = {model_class.__name__: model_class for model_class in spec.model_classes}
    architecture = (config.architectures or [spec.pretraining_class.__name__])[0]
    if architecture not in by_name:
        raise UsageError(f"{path}: unknown architecture {architecture}; the {spec.name} family has "
                         f"{', '.join(by_name)}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None and needs_tokenizer:
        raise UsageError(f"{path} has no tokenizer; a GGUF file carries one for llama.cpp. Save the tokenizer into "
                         "the checkpoint folder first.")
    with loading(path):
        model = by_name[architecture].from_pretrained(path)
    return model.eval(), tokenizer


def export_transformers(model, tokenizer, args: ExportArguments) -> list[str]:
    import torch

    from lmblocks.cli import model_positions
    from lmblocks.export import ExportError, export_to_transformers, transformers_class_name
    from lmblocks.tokenization_trainer import save_tokenizer

    if args.outtype is not None:
        model = model.to(getattr(torch, TORCH_DTYPES[args.outtype]))
    try:
        notes = export_to_transformers(model, args.output_dir, max_shard_size=args.max_shard_size)
    except ExportError as error:
        raise UsageError(str(error)) from error
    lines = [f"Wrote {transformers_class_name(model)} to {args.output_dir}: loads with transformers alone "
             f"(AutoModel*.from_pretrained, no trust_remote_code)."]
    if tokenizer is not None:  # with the family's classic vocabulary files where it has them
        save_tokenizer(tokenizer, args.output_dir, model_max_length=model_positions(model.config))
    else:
        lines.append("No tokenizer in the checkpoint: copy one in before using the folder with pipeline or "
                     "AutoTokenizer.")
    return lines + notes


def export_gguf(model, tokenizer, args: ExportArguments) -> list[str]:
    from lmblocks.export import ExportError
    from lmblocks.export_gguf import export_to_gguf

    outtype = args.outtype or "f16"
    name = Path(args.model_name_or_path.rstrip("/")).name or "model"
    path = Path(args.output_dir) / f"{name}-{outtype}.gguf"
    try:
        export_to_gguf(model, tokenizer, path, outtype, name=name)
    except ExportError as error:
        raise UsageError(str(error)) from error
    return [f"Wrote {path} ({outtype}). Run it with llama.cpp, e.g. `llama-cli -m {path}`; transformers reads it "
            f"with from_pretrained({str(args.output_dir)!r}, gguf_file={path.name!r})."]


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_arguments([ExportArguments], argv)
    if args.format == "transformers" and args.outtype == "q8_0":
        raise UsageError("--outtype q8_0 is a GGUF type; for --format transformers choose f32, f16 or bf16.")
    model, tokenizer = load_checkpoint(args.model_name_or_path, needs_tokenizer=args.format == "gguf")
    export = export_gguf if args.format == "gguf" else export_transformers
    for line in export(model, tokenizer, args):
        print(line)


if __name__ == "__main__":
    run_script(main)
