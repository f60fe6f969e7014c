#!/usr/bin/env python
"""Generate text from a causal-LM checkpoint, streaming tokens as they are produced.

Works for lmblocks checkpoints (with lmblocks installed, or through their remote code with `--trust_remote_code`),
for a folder holding only remote code, and for any other causal LM transformers can load. The class that runs is
named on stderr; a transformers `gpt2` / `llama` folder (SmolLM2, for one) runs in transformers' class unless
`--lmblocks` asks for lmblocks' own. Generation options are checked before the model loads; the speed (new tokens
per second) is printed on stderr at the end.

Examples:
    python scripts/generate.py --model_name_or_path outputs/main/gpt2 --prompt "Alice was" --max_new_tokens 40
    python scripts/generate.py --model_name_or_path some-folder --trust_remote_code --do_sample --temperature 0.8 \\
        --top_k 50 --top_p 0.95 --num_return_sequences 2 --prompt "Once upon a time"
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # --help without the heavy imports below, when it was printed before
    from _help_cache import print_cached_help

    print_cached_help(__file__)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lmblocks.cli import parse_arguments, run_script  # noqa: E402
from lmblocks.training import UsageError  # noqa: E402

WEIGHT_FORMATS = ("fp32", "bf16", "int8")  # lmblocks.decoding.WEIGHT_FORMATS, checked before the heavy imports
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
        "help": "Decode with a static cache and a compiled step (lmblocks.decoding). On a CPU the step is compiled "
                "ahead of time into a package on disk: the first run decodes eagerly while a background process "
                "compiles it (about 20 s for a 135M model on two cores; it names its log), and every later run "
                "loads it in about a second, for every prompt length and --max_new_tokens. Elsewhere the first call "
                "compiles. Greedy or sampled decoding only (transformers does not compile beam search)."})
    weights: str | None = field(default=None, metadata={
        "help": "Convert the weights after loading: fp32, bf16, or int8 (one scale per output channel, a quarter "
                "of fp32's bytes to read per token; on a CPU the activations are quantized to int8 too, one scale "
                "per 16 values, as llama.cpp's q8_0 does); mostly with --compile. Instead of --dtype."})
    lmblocks: bool = field(default=False, metadata={
        "help": "Run a transformers gpt2 / llama checkpoint in lmblocks' class of its family instead of "
                "transformers' own (the weights load as they are)."})



def generation_options(args: GenerateArguments) -> dict:
    """The keyword arguments of `model.generate` for `args`, checked the way `generate` would check them (the
    generation config's own rules, then each sampling option's range), so that a bad combination is one error before
    the model loads rather than a traceback after."""
    from transformers import GenerationConfig
    from transformers.generation import logits_process as processors

    if args.max_new_tokens < 1:
        raise UsageError("--max_new_tokens must be at least 1.")
    if args.num_beams < 1 or args.num_return_sequences < 1:
        raise UsageError("--num_beams and --num_return_sequences must be at least 1.")
    if args.weights is not None and args.weights not in WEIGHT_FORMATS:
        raise UsageError(f"--weights {args.weights} is not one of {', '.join(WEIGHT_FORMATS)}.")
    if args.weights is not None and DTYPES.get(args.dtype) != "float32":
        raise UsageError(f"--weights {args.weights} sets the weights' format itself; drop --dtype {args.dtype}.")
    if args.compile and args.num_beams > 1:
        raise UsageError(f"--compile decodes greedily or by sampling: transformers does not compile beam search, so "
                         f"--num_beams {args.num_beams} would run uncompiled. Drop --compile or --num_beams.")
    options = dict(do_sample=args.do_sample, num_beams=args.num_beams, num_return_sequences=args.num_return_sequences)
    if args.do_sample:
        options.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.repetition_penalty is not None:
        options["repetition_penalty"] = args.repetition_penalty
    try:
        GenerationConfig(max_new_tokens=args.max_new_tokens, **options).validate(strict=True)
        if args.do_sample:
            processors.TemperatureLogitsWarper(args.temperature)
            if args.top_k is not None:
                processors.TopKLogitsWarper(args.top_k)
            if args.top_p is not None:
                processors.TopPLogitsWarper(args.top_p)
        if args.repetition_penalty is not None:
            processors.RepetitionPenaltyLogitsProcessor(args.repetition_penalty)
    except ValueError as error:
        message = " ".join(str(error).split()).replace("GenerationConfig is invalid: - ", "")
        for name in ("num_return_sequences", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty",
                     "do_sample"):  # transformers' names are ours with "--"
            message = message.replace(f"`{name}`", f"--{name}")
        raise UsageError(f"Generation options: {message}") from None
    return options


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
                        dtype: str = "float32", device: str = "cpu", use_lmblocks: bool = False):
    """(model, tokenizer) through the Auto classes; lmblocks is imported first (by this script) so its families load
    without remote code. Bad names, folders and files are `UsageError`s naming the real problem: a file given for a
    folder, a config.json that does not parse, a model without a causal-LM head, a folder without tokenizer files.
    With `use_lmblocks`, a transformers gpt2 / llama checkpoint loads into lmblocks' class of its family."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmblocks.cli import check_checkpoint_path, check_tokenizer_files, loading

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}.")
    check_device(device)
    check_checkpoint_path(path)
    if tokenizer_path:
        check_checkpoint_path(tokenizer_path, "tokenizer")
    with loading(path, "model config"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model_class = causal_lm_class(config, path, use_lmblocks)
    tokenizer_source = tokenizer_path or path
    check_tokenizer_files(tokenizer_source)
    with loading(tokenizer_source, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    with loading(path, "causal LM"):
        loader = model_class or AutoModelForCausalLM
        extra = {} if model_class else {"trust_remote_code": trust_remote_code}
        model = loader.from_pretrained(path, dtype=getattr(torch, DTYPES[dtype]), **extra)
    source = type(model).__module__.split(".")[0]
    source = {"transformers_modules": "the checkpoint's own code"}.get(source, source)
    print(f"[generate] {type(model).__name__} ({source}, model_type {config.model_type})"
          + (hint_lmblocks(config) if model_class is None else ""), file=sys.stderr, flush=True)
    return model.to(device).eval(), tokenizer


def causal_lm_class(config, path: str, use_lmblocks: bool):
    """lmblocks' causal-LM class for `config` with `--lmblocks` (None: the Auto class decides). A family without a
    causal-LM head (an encoder) is refused here, by name, rather than by transformers' list of every class it has."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from lmblocks.training import FAMILIES

    family = family_reading(config.model_type)
    if family is not None and not family.is_decoder:
        decoders = [name for name, spec in FAMILIES.items() if spec.is_decoder]
        decoders = " or ".join(filter(None, [", ".join(decoders[:-1]), decoders[-1]]))
        raise UsageError(f"{path} is a {family.name.upper()} checkpoint ({config.model_type}): an encoder with no "
                         f"causal-LM head, so it cannot generate text. Use a {decoders} checkpoint here; for "
                         f"{family.name.upper()}, fill masks (pipeline('fill-mask')) or fine-tune a classifier "
                         "(finetune.py --task seq_cls).")
    if use_lmblocks:
        if family is None:
            raise UsageError(f"--lmblocks: {path} is a {config.model_type!r} checkpoint, which no lmblocks family "
                             f"reads ({', '.join(n for n, f in FAMILIES.items() if f.is_decoder)} can).")
        return family.causal_lm_class
    if family is None and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not getattr(config, "auto_map", None):
        raise UsageError(f"{path} is a {config.model_type!r} checkpoint, which has no causal-LM class in "
                         "transformers: it cannot generate text.")
    return None


def family_reading(model_type: str):
    """The lmblocks family whose config reads `model_type`: its own (`lmb_llama`) or transformers' (`llama`)."""
    from lmblocks.training import FAMILIES

    return next((family for family in FAMILIES.values()
                 if model_type in (family.model_type, family.config_class.foreign_model_type)), None)


def hint_lmblocks(config) -> str:
    """For a transformers checkpoint of a family lmblocks implements: how to run it in lmblocks' class."""
    family = family_reading(config.model_type)
    if family is None or family.model_type == config.model_type or family.causal_lm_class is None:
        return ""
    return f"; --lmblocks runs it in lmblocks' {family.causal_lm_class.__name__}"


def generate(args: GenerateArguments) -> list[str]:
    """Generate for every prompt; returns the texts (prompt included). Prompts the model has no room for are refused
    and `--max_new_tokens` is clipped to the positions left, so generation never fails half-way."""
    import torch
    from transformers import TextStreamer, set_seed

    from lmblocks.cli import model_positions

    gen_kwargs = generation_options(args)
    model, tokenizer = load_for_generation(args.model_name_or_path, args.trust_remote_code,
                                           args.tokenizer_name_or_path, args.dtype, args.device, args.lmblocks)
    positions = model_positions(model.config)
    if args.weights is not None:
        from lmblocks.decoding import convert_weights

        convert_weights(model, args.weights)
    if args.compile:
        from lmblocks.decoding import enable_compiled_decoding

        try:
            enable_compiled_decoding(model, background=True)  # a first run never waits for the compiler
        except ValueError as error:
            raise UsageError(f"--compile: {error}") from error
    use_template = args.chat_template and bool(getattr(tokenizer, "chat_template", None))
    set_seed(args.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_prompt(tokenizer, prompt, use_template) for prompt in args.prompt]
    if positions is not None:
        too_long = [(p, ids.shape[1]) for p, ids in zip(args.prompt, encoded) if ids.shape[1] >= positions]
        if too_long:
            prompt, length = too_long[0]
            raise UsageError(f"The prompt {_short(prompt)!r} is {length} tokens; the model has {positions} positions, "
                             f"so it can take at most {positions - 1} prompt tokens. Shorten the prompt.")
    outputs = []
    new_tokens, seconds = 0, 0.0
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
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad_id, streamer=streamer,
                                 max_new_tokens=max_new_tokens, **gen_kwargs)
        seconds += time.perf_counter() - start
        new_tokens += out[:, ids.shape[1]:].numel()
        for row in out:
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(text)
            if streamer is None:
                print(text, flush=True)
        print("-" * 40, flush=True)
    print(f"[generate] {new_tokens} new tokens in {seconds:.2f} s: {new_tokens / max(seconds, 1e-9):.1f} tokens/s"
          + (" (the first call loads the compiled decoding step, or decodes eagerly while a background process "
             "compiles it)" if args.compile else ""),
          file=sys.stderr, flush=True)
    return outputs


def encode_prompt(tokenizer, prompt: str, use_template: bool):
    """(1, T) ids of one prompt: through the chat template as a user turn, or as plain text; an empty plain prompt
    starts from the beginning-of-text token."""
    import torch

    if use_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"]
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"]
    if ids.shape[1] == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise UsageError("The prompt is empty and the tokenizer has no bos/eos token to start from.")
        ids = torch.tensor([[start]])
    return ids


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def main(argv: list[str] | None = None) -> list[str]:
    (args,) = parse_arguments((GenerateArguments,), argv, description=__doc__)
    return generate(args)


if __name__ == "__main__":
    run_script(main)
