"""Batch-1 CPU decoding, llama.cpp against lmblocks, on SmolLM2-135M-Instruct (`make bench-llama-cpp`).

    .venv-llamacpp/bin/python bench/llama_cpp_decode.py [--threads 2] [--reps 5] [--skip-compiled]
        [--cpu-march haswell]

Runs in `.venv-llamacpp` (`make llama-cpp-env`: llama-cpp-python built from source, with torch and lmblocks). The
fetched checkpoint (`.cache/models/smollm2-135m-instruct`, `make env`) is loaded into lmblocks' LLaMA and exported
by lmblocks to GGUF f32 and q8_0 (`lmblocks.export_gguf`); the four engines decode the same prompt ids (the chat
template around one question), greedy, with the same number of threads:

- llama.cpp (llama-cpp-python) f32 GGUF and q8_0 GGUF;
- transformers' own `LlamaForCausalLM`, eager;
- lmblocks fp32 eager, and `lmblocks.decoding.enable_compiled_decoding` with fp32, bf16 and int8 weights (each
  compiled once, before timing, into an empty compile cache of its own (a temporary `TORCHINDUCTOR_CACHE_DIR`), so
  that the warm-up column shows a first compilation; the next, the same in a new process (beside this process's
  llama.cpp models the first compilation ran 2–8 s slower); the next, a new process's first `generate` of 2 tokens
  (the model loaded and converted before the clock starts), reusing what the first one compiled; the last, a new
  process's `enable_compiled_decoding` and first `generate` with every cache empty (inductor's, its precompiled
  headers, lmblocks' kernels): a machine's first compilation).

ms/token = (time of generate 65 tokens − time of generate 1 token) / 64, so the prompt's prefill cancels out; every
generation runs its full length (no stop at end of sequence: `eos_token_id=None`). The engines take turns within
each repetition, in a rotating order (interleaved), and the table gives the median with min–max over the
repetitions, in wall-clock time and in CPU time of the calling thread (with --threads 1 both engines compute on it;
unlike wall time it does not count what the scheduler gave to other processes, so it is the figure to read on a
shared machine). Also printed:
whether each engine's 64 greedy tokens equal lmblocks fp32 eager's. After the timing, a second table gives the
quality of lmblocks' weight formats: bits per byte of the main job's held-out text (12,000 characters of the
Canterbury books, scripts/main.py's `held_out_text`; `--skip-quality` leaves it out). The tables go to stdout and to
`bench/results/llama-cpp-decode.md`. Measure on an idle machine: on a shared one the numbers say more about the
neighbours. `--cpu-march haswell` measures an AVX2 machine's code paths on this one (lmblocks' kernels built for
that CPU, `LMBLOCKS_CPU_MARCH`; torch's, MKL's and oneDNN's at AVX2; the memory system and llama.cpp's build stay
this machine's): there lmblocks' float kernels do not run, and the float steps are torch.compile's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SMOLLM2 = REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct"
RESULT = REPO_ROOT / "bench" / "results" / "llama-cpp-decode.md"
QUESTION = "Write a short story about a lighthouse keeper."
LONG, SHORT = 65, 1


class LlamaCppEngine:
    def __init__(self, path: Path, threads: int):
        from lmblocks.export_gguf import llama_cpp_model

        self.llm = llama_cpp_model(path, n_ctx=512, n_threads=threads, n_threads_batch=threads)

    def generate(self, input_ids: list[int], n: int) -> list[int]:
        self.llm.reset()  # the whole prompt again each time, as in lmblocks' generate
        out = []
        for token in self.llm.generate(input_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                return out
        return out


class TransformersEngine:
    def __init__(self, model):
        self.model = model

    def generate(self, input_ids: list[int], n: int) -> list[int]:
        import torch

        # Every token is generated: no end-of-sequence token to stop at (eos_token_id=None), as llama.cpp's loop here.
        # Not min_new_tokens=n: its two logits processors each build a vocabulary-sized mask per token (1.1 ms per
        # token for SmolLM2's 49,152 ids, one thread), a cost of the benchmark, not of decoding. The attention mask
        # is given: without an end-of-sequence id, generate would read SmolLM2's padding id (<|im_end|>, in the chat
        # prompt) as padding and mask it out.
        ids = torch.tensor([input_ids])
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                      eos_token_id=None)
        return out[0, len(input_ids):].tolist()


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs"


def quality_table(tokenizer) -> list[str]:
    """Bits per byte of the main job's held-out text under lmblocks' SmolLM2-135M in each weight format (eager: the
    compiled step computes the same products)."""
    import torch

    import lmblocks
    from lmblocks.data import read_text_files
    from lmblocks.decoding import WEIGHT_FORMATS, convert_weights
    from lmblocks.evaluation import bits_per_byte

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from main import DEFAULT_CORPUS, held_out_text

    if not all(path.is_file() for path in DEFAULT_CORPUS):
        return ["(quality table left out: the main job's corpus is not fetched; `make env` fetches it)"]
    text = held_out_text(read_text_files([str(path) for path in DEFAULT_CORPUS], "utf-8"), 12000)
    lines = [f"Quality: bits per byte of the main job's held-out text ({len(text)} characters), lmblocks' "
             "SmolLM2-135M-Instruct.", "", "| weights | bits per byte | vs fp32 |", "|---|---|---|"]
    results = {}
    for weights in WEIGHT_FORMATS:
        model = lmblocks.LmbLlamaForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
        results[weights] = bits_per_byte(convert_weights(model, weights), tokenizer, text)["bits_per_byte"]
        lines.append(f"| {weights} | {results[weights]:.4f} | {results[weights] / results['fp32'] - 1:+.2%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per engine (default: 5)")
    parser.add_argument("--skip-compiled", action="store_true", help="leave out the compiled lmblocks rows")
    parser.add_argument("--skip-quality", action="store_true",
                        help="leave out the bits-per-byte table of lmblocks' weight formats")
    parser.add_argument("--cpu-march", metavar="MARCH",
                        help="take the code paths of an older CPU, a gcc -march name (e.g. haswell: AVX2 without "
                             "AVX-512): lmblocks' kernels built for it (LMBLOCKS_CPU_MARCH), torch's, MKL's and oneDNN's "
                             "at AVX2 (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, unless set); "
                             "llama.cpp keeps its own build. The table goes to "
                             "bench/results/llama-cpp-decode-<MARCH>.md")
    args = parser.parse_args(argv)
    result = RESULT
    if args.cpu_march:
        # Before torch is imported (it reads ATEN_CPU_CAPABILITY once); the new processes inherit both.
        os.environ["LMBLOCKS_CPU_MARCH"] = args.cpu_march  # lmblocks.cpu_kernels.TARGET_MARCH_VARIABLE
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
        os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # MKL and oneDNN pick their own: at most AVX2 too
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
        result = RESULT.with_name(f"{RESULT.stem}-{args.cpu_march}.md")
    if not (SMOLLM2 / "config.json").is_file():
        print(f"error: {SMOLLM2} is missing: `make env` fetches it.", file=sys.stderr)
        return 2
    try:
        import llama_cpp
    except ImportError:
        print("error: llama-cpp-python is not installed here: run this with .venv-llamacpp/bin/python "
              "(`make llama-cpp-env`).", file=sys.stderr)
        return 2

    compile_cache = tempfile.TemporaryDirectory(prefix="lmblocks-bench-compile-")  # a first compilation, measured
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache.name

    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaForCausalLM

    import lmblocks
    from lmblocks.decoding import enable_compiled_decoding
    from lmblocks.export_gguf import cpu_has_amx, export_to_gguf

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    input_ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                              return_dict=True)["input_ids"]
    eager = lmblocks.LmbLlamaForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    engines = {}
    with tempfile.TemporaryDirectory() as folder:
        for outtype in ("f32", "q8_0"):
            path = export_to_gguf(eager, tokenizer, Path(folder) / f"smollm2-{outtype}.gguf", outtype)
            engines[f"llama.cpp {outtype} GGUF"] = LlamaCppEngine(path, args.threads)
    engines["transformers LlamaForCausalLM fp32 eager"] = TransformersEngine(
        LlamaForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval())
    engines["lmblocks fp32 eager"] = TransformersEngine(eager)
    for weights in () if args.skip_compiled else ("fp32", "bf16", "int8"):
        model = lmblocks.LmbLlamaForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
        engines[f"lmblocks {weights} `enable_compiled_decoding`"] = TransformersEngine(
            enable_compiled_decoding(model, weights=weights))

    same, setup = {}, {}
    for name, engine in engines.items():  # warm up (compiles), and the greedy tokens
        start = time.perf_counter()
        tokens = engine.generate(input_ids, LONG)
        engine.generate(input_ids, SHORT)
        setup[name] = time.perf_counter() - start
        same[name] = tokens[: LONG - 1]
        print(f"{name}: warm-up {setup[name]:.1f} s", file=sys.stderr, flush=True)
    reference = same["lmblocks fp32 eager"]
    new_process = {name: new_process_first_generate(name.split()[1], args.threads, input_ids)
                   for name in engines if "enable_compiled_decoding" in name}
    first_compile = {name: first_compile_new_process(name.split()[1], args.threads, input_ids)
                     for name in new_process}
    fresh_machine = {name: fresh_machine_first_compile(name.split()[1], args.threads, input_ids)
                     for name in new_process}
    times: dict[str, list[float]] = {name: [] for name in engines}
    cpu_times: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            start, cpu = time.perf_counter(), time.thread_time()
            engines[name].generate(input_ids, SHORT)
            short, short_cpu = time.perf_counter() - start, time.thread_time() - cpu
            start, cpu = time.perf_counter(), time.thread_time()
            engines[name].generate(input_ids, LONG)
            long, long_cpu = time.perf_counter() - start, time.thread_time() - cpu
            times[name].append((long - short) / (LONG - SHORT) * 1000)
            cpu_times[name].append((long_cpu - short_cpu) / (LONG - SHORT) * 1000)

    lines = [
        f"SmolLM2-135M-Instruct, batch 1, greedy, prompt of {len(input_ids)} tokens, {args.threads} threads, "
        f"ms/token = (generate {LONG} − generate {SHORT}) / {LONG - SHORT}, {args.reps} interleaved repetitions "
        "(median, min–max).",
        f"{datetime.date.today().isoformat()}, {machine()}{' (AMX: extra buffer types off)' if cpu_has_amx() else ''}"
        + (f", lmblocks' kernels built for -march={args.cpu_march} and torch's ATEN_CPU_CAPABILITY="
           f"{os.environ['ATEN_CPU_CAPABILITY']}, MKL_ENABLE_INSTRUCTIONS={os.environ['MKL_ENABLE_INSTRUCTIONS']}, "
           f"ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']} (this CPU taking an older one's code paths; "
           "llama.cpp: its own build)"
           if args.cpu_march else "") + ";"
        f" llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        "",
        "| engine | ms/token | min–max | CPU ms/token (thread) | 64 greedy tokens = lmblocks fp32 eager's "
        "| warm-up (s) | first compilation, new process (s) | new process, first generate (s) "
        "| first compilation, fresh machine (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, values in times.items():
        agree = sum(a == b for a, b in zip(same[name], reference))
        first_diff = next((i for i, (a, b) in enumerate(zip(same[name], reference)) if a != b), None)
        verdict = "yes" if first_diff is None else f"no (first {first_diff} equal, {agree}/64 positions)"
        lines.append(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}–{max(values):.1f} "
                     f"| {statistics.median(cpu_times[name]):.1f} | {verdict} | {setup[name]:.1f} "
                     f"| {f'{first_compile[name]:.1f}' if name in first_compile else ''} "
                     f"| {f'{new_process[name]:.1f}' if name in new_process else ''} "
                     f"| {f'{fresh_machine[name]:.1f}' if name in fresh_machine else ''} |")
    if not args.skip_quality:
        lines += ["", *quality_table(tokenizer)]
    text = "\n".join(lines)
    print(text)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(text + "\n")
    compile_cache.cleanup()
    return 0


_NEW_PROCESS = """
import sys, time, torch, lmblocks
from lmblocks.decoding import enable_compiled_decoding
torch.set_num_threads(int(sys.argv[2]))
model = lmblocks.LmbLlamaForCausalLM.from_pretrained(sys.argv[3], dtype=torch.float32).eval()
enabled = time.perf_counter()
enable_compiled_decoding(model, weights=sys.argv[1])
ids = torch.tensor([[int(i) for i in sys.argv[4].split(",")]])
start = time.perf_counter()
model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
print(time.perf_counter() - enabled, time.perf_counter() - start)
"""


def new_process_first_generate(weights: str, threads: int, input_ids: list[int]) -> float:
    """Seconds of a new process's first `generate` (2 tokens) with compiled decoding in `weights` format, after
    this process compiled it: what a second run of a script pays before decoding at full speed."""
    return float(run_new_process(weights, threads, input_ids, {}).split()[1])


def first_compile_new_process(weights: str, threads: int, input_ids: list[int]) -> float:
    """Seconds from `enable_compiled_decoding` to the end of the first `generate` (2 tokens) in a new process with
    an empty compile cache of its own, on this machine (lmblocks' kernels and inductor's headers built before): a
    model's first compilation as a script meets it. The warm-up column's runs in this process, beside llama.cpp's
    models: 2–8 s slower there for the first compiled engine (measured; llama.cpp's loaded models are the one
    difference found, the cause not pinned down)."""
    with tempfile.TemporaryDirectory(prefix="lmblocks-bench-first-") as folder:
        return float(run_new_process(weights, threads, input_ids, {"TORCHINDUCTOR_CACHE_DIR": folder}).split()[0])


def fresh_machine_first_compile(weights: str, threads: int, input_ids: list[int]) -> float:
    """Seconds from `enable_compiled_decoding` to the end of the first `generate` (2 tokens) in a new process whose
    every cache is empty (inductor's, its precompiled headers under TMPDIR, lmblocks' kernels under
    TORCH_EXTENSIONS_DIR): a first compilation on a machine that never compiled before."""
    with tempfile.TemporaryDirectory(prefix="lmblocks-bench-fresh-") as folder:
        env = {"TMPDIR": folder, "TORCHINDUCTOR_CACHE_DIR": f"{folder}/inductor",
               "TORCH_EXTENSIONS_DIR": f"{folder}/extensions"}
        return float(run_new_process(weights, threads, input_ids, env).split()[0])


def run_new_process(weights: str, threads: int, input_ids: list[int], env: dict[str, str]) -> str:
    """What `_NEW_PROCESS` prints for `weights`, run with `threads` and the environment changed by `env`."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **env}
    out = subprocess.run([sys.executable, "-c", _NEW_PROCESS, weights, str(threads), str(SMOLLM2),
                          ",".join(map(str, input_ids))], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit(main())
