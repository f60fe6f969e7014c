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

from transformers import HfArgumentParser  # noqa: E402

from lmblocks.training import UsageError, run_cli  # noqa: E402


@dataclass
class GenerateArguments:
    model_name_or_path: str = field(metadata={"help": "Checkpoint folder or Hub id."})
    prompt: list[str] = field(default_factory=lambda: [""], metadata={"help": "One or more prompts."})
    max_new_tokens: int = field(default=50)
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy / beam search."})
    temperature: float = field(default=1.0)
    top_k: int | None = field(default=None)
    top_p: float | None = field(default=None)
    repetition_penalty: float | None = field(default=None)
    num_beams: int = field(default=1)
    num_return_sequences: int = field(default=1)
    seed: int = field(default=0)
    stream: bool = field(default=True, metadata={"help": "Print tokens as they come (--no_stream to turn off)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the checkpoint's own modelling code."})
    tokenizer_name_or_path: str | None = field(default=None)
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16."})
    device: str = field(default="cpu")


def load_for_generation(path: str, trust_remote_code: bool = False, tokenizer_path: str | None = None,
                        dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) through the Auto classes; lmblocks is imported first when installed so its families load
    without remote code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import lmblocks  # noqa: F401  (registers the lmblocks families)
    except ImportError:
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                     dtype=getattr(torch, dtype))
    except (OSError, ValueError) as error:
        raise UsageError(f"Cannot load a causal LM and tokenizer from {path}: {error}") from error
    return model.to(device).eval(), tokenizer


def generate(args: GenerateArguments) -> list[str]:
    import torch
    from transformers import TextStreamer, set_seed

    if args.max_new_tokens < 1:
        raise UsageError("--max_new_tokens must be at least 1.")
    model, tokenizer = load_for_generation(args.model_name_or_path, args.trust_remote_code,
                                           args.tokenizer_name_or_path, args.dtype, args.device)
    set_seed(args.seed)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
                      num_return_sequences=args.num_return_sequences)
    if args.do_sample:
        gen_kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.repetition_penalty is not None:
        gen_kwargs["repetition_penalty"] = args.repetition_penalty
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for prompt in args.prompt:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] == 0:  # an empty prompt starts from the beginning-of-text token
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if start is None:
                raise UsageError("The prompt is empty and the tokenizer has no bos/eos token to start from.")
            ids = torch.tensor([[start]])
        ids = ids.to(args.device)
        # Streaming shows one sequence as it grows; with several return sequences or beams the result is printed.
        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True) \
            if args.stream and args.num_return_sequences == 1 and args.num_beams == 1 else None
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad_id, streamer=streamer,
                                 **gen_kwargs)
        for row in out:
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(text)
            if streamer is None:
                print(text, flush=True)
        print("-" * 40, flush=True)
    return outputs


def main(argv: list[str] | None = None) -> list[str]:
    (args,) = HfArgumentParser(GenerateArguments).parse_args_into_dataclasses(args=argv)
    return generate(args)


if __name__ == "__main__":
    run_cli(main)
