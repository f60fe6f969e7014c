#!/usr/bin/env python
"""Generate text from a causal-LM checkpoint, streaming tokens as they are produced.

Works for lmblocks checkpoints (with lmblocks installed, or through their remote code with `--trust_remote_code`),
for a folder holding only remote code, and for any other causal LM transformers can load.

Examples:
    python scripts/generate.py --model_name_or_path outputs/main/gpt2 --prompt "Alice was" --max_new_tokens 40
    python scripts/generate.py --model_name_or_path some-folder --trust_remote_code --do_sample --temperature 0.8 \\
        --top_k 50 --top_p 0.95 --num_return_sequences 2 --prompt "Once upon a time"
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lmblocks.cli import parse_arguments, run_script  # noqa: E402
from lmblocks.training import UsageError  # noqa: E402

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
          "fp16": "float16", "half": "float16"}


@dataclass
class GenerateArguments:
    model_name_or_path: str = field(metadata={"help": "Checkpoint folder or Hub id."})
    prompt: list[str] = field(default_factory=lambda: [""], metadata={"help": "One or more prompts."})
    max_new_tokens: int = field(default=50, metadata={
        "help": "Tokens to generate per prompt; clipped (with a warning) to what the model's positions leave."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy / beam search."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_k: int | None = field(default=None, metadata={"help": "Sample from the k likeliest tokens."})
    top_p: float | None = field(default=None, metadata={"help": "Sample from the smallest set of mass p."})
    repetition_penalty: float | None = field(default=None, metadata={"help": "> 1 discourages repeats."})
    num_beams: int = field(default=1, metadata={"help": "Beam search with this many beams."})
    num_return_sequences: int = field(default=1, metadata={"help": "Sequences per prompt."})
    seed: int = field(default=0, metadata={"help": "Random seed for sampling."})
    stream: bool = field(default=True, metadata={"help": "Print tokens as they come (--no_stream to turn off)."})
    chat_template: bool = field(default=True, metadata={
        "help": "Format each prompt as a user turn with the tokenizer's chat template when it has one (models "
                "fine-tuned by finetune.py --task instruct do); --no_chat_template passes prompts as they are."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the checkpoint's own modelling code."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Default: the checkpoint's."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16 (fp32, bf16, fp16)."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, mps, ..."})
    compile: bool = field(default=False, metadata={
        "help": "Decode with a static cache and a compiled step (lmblocks.decoding): each new prompt length "
                "compiles first (tens of seconds on CPU), then every token is cheaper; for long generations."})


def check_device(device: str) -> None:
    """A device this machine has, or a clear error."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise UsageError(f"--device {device} is not a device name (cpu, cuda, cuda:0, mps, ...).") from error
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "xpu": hasattr(torch, "xpu") and torch.xpu.is_available()}.get(kind, True)
    if not available:
        raise UsageError(f"--device {device}: this machine (this torch build) has no {kind} device; use --device cpu.")


def load_for_generation(path: str, trust_remote_code: bool = False, tokenizer_path: str | None = None,
                        dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) through the Auto classes; lmblocks is imported first (by this script) so its families load
    without remote code. Bad names, folders and files are `UsageError`s."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmblocks.cli import check_checkpoint_path, loading

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}.")
    check_device(device)
    check_checkpoint_path(path)
    if tokenizer_path:
        check_checkpoint_path(tokenizer_path, "tokenizer")
    with loading(tokenizer_path or path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, trust_remote_code=trust_remote_code)
    with loading(path, "causal LM"):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     dtype=getattr(torch, DTYPES[dtype]))
    return model.to(device).eval(), tokenizer


def generate(args: GenerateArguments) -> list[str]:
    """Generate for every prompt; returns the texts (prompt included). Prompts the model has no room for are refused
    and `--max_new_tokens` is clipped to the positions left, so generation never fails half-way."""
    import torch
    from transformers import TextStreamer, set_seed

    from lmblocks.cli import model_positions

    if args.max_new_tokens < 1:
        raise UsageError("--max_new_tokens must be at least 1.")
    model, tokenizer = load_for_generation(args.model_name_or_path, args.trust_remote_code,
                                           args.tokenizer_name_or_path, args.dtype, args.device)
    positions = model_positions(model.config)
    if args.compile:
        from lmblocks.decoding import enable_compiled_decoding

        try:
            enable_compiled_decoding(model)
        except ValueError as error:
            raise UsageError(f"--compile: {error}") from error
    use_template = args.chat_template and bool(getattr(tokenizer, "chat_template", None))
    set_seed(args.seed)
    gen_kwargs = dict(do_sample=args.do_sample, num_beams=args.num_beams,
                      num_return_sequences=args.num_return_sequences)
    if args.do_sample:
        gen_kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.repetition_penalty is not None:
        gen_kwargs["repetition_penalty"] = args.repetition_penalty
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_prompt(tokenizer, prompt, use_template) for prompt in args.prompt]
    if positions is not None:
        too_long = [(p, ids.shape[1]) for p, ids in zip(args.prompt, encoded) if ids.shape[1] >= positions]
        if too_long:
            prompt, length = too_long[0]
            raise UsageError(f"The prompt {_short(prompt)!r} is {length} tokens; the model has {positions} positions, "
                             f"so it can take at most {positions - 1} prompt tokens. Shorten the prompt.")
    outputs = []
    for prompt, ids in zip(args.prompt, encoded):
        max_new_tokens = args.max_new_tokens
        if positions is not None and ids.shape[1] + max_new_tokens > positions:
            max_new_tokens = positions - ids.shape[1]
            print(f"warning: the model has {positions} positions and the prompt takes {ids.shape[1]}: generating "
                  f"{max_new_tokens} new tokens instead of {args.max_new_tokens}.", file=sys.stderr, flush=True)
        ids = ids.to(args.device)
        # Streaming shows one sequence as it grows; with several return sequences or beams the result is printed.
        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True) \
            if args.stream and args.num_return_sequences == 1 and args.num_beams == 1 else None
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad_id, streamer=streamer,
                                 max_new_tokens=max_new_tokens, **gen_kwargs)
        for row in out:
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(text)
            if streamer is None:
                print(text, flush=True)
        print("-" * 40, flush=True)
    return outputs


def encode_prompt(tokenizer, prompt: str, use_template: bool):
    """(1, T) ids of one prompt: through the chat template as a user turn, or as plain text; an empty plain prompt
    starts from the beginning-of-text token."""
    import torch

    if use_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise UsageError("The prompt is empty and the tokenizer has no bos/eos token to start from.")
        ids = torch.tensor([[start]])
    return ids


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def main(argv: list[str] | None = None) -> list[str]:
    (args,) = parse_arguments((GenerateArguments,), argv)
    return generate(args)


if __name__ == "__main__":
    run_script(main)
