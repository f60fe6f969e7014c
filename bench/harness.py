"""What one benchmark subprocess does: build lmblocks' model and transformers' built-in one from the same weights,
check they compute the same logits, then time a phase with the two models interleaved, or measure one model's peak
memory in one phase.

`bench/run.py` starts a fresh subprocess per job (see `run_job`), so compiled graphs, allocator caches and the
peak-RSS high-water mark of one measurement never leak into the next.

Phases (`PHASES`):
- `train_eager` / `train_compile`: forward + backward + AdamW step, tokens/s (`torch.compile` on the module for the
  second; the optimizer step stays eager in both models).
- `forward`: inference forward (`torch.inference_mode`), tokens/s.
- `generate_{dynamic,static}_b{1,8}`: greedy `generate` with a KV cache — `DynamicCache`, or `StaticCache` with the
  decoding step compiled by transformers' own auto-compile (forced on CPU) — new tokens/s and ms per decoding step
  (timestamps taken by a logits processor, so prefill is excluded from ms/step).
- `train_eager_gc` (memory only): the training step with gradient checkpointing.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

IMPLS = ("lmblocks", "transformers")
PHASES = (
    "train_eager",
    "train_compile",
    "forward",
    "generate_dynamic_b1",
    "generate_dynamic_b8",
    "generate_static_b1",
    "generate_static_b8",
)
MEMORY_ONLY_PHASES = ("train_eager_gc",)


# ----------------------------------------------------------------------------------------------------------------
# Families and sizes: the same config built twice, once per implementation.


# Sizes of each lmblocks family (`lmblocks.families.FAMILIES`, the one registry; tests/test_registry.py checks that
# every family has an entry here), as config fields both implementations share.
_LLAMA_SIZES = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048),
    # The small model with Llama 3's 128,256-token vocabulary: the LM head is most of it (bench/limits.py).
    "small_v128k": dict(vocab_size=128256, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048),
    # GPT-2 124M's width and depth with LLaMA's blocks (SwiGLU 2048 ≈ 8/3·768, grouped-query attention).
    "base": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048),
}
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2": {
        "tiny": dict(vocab_size=1024, n_embd=64, n_layer=2, n_head=4, n_positions=128),
        "small": dict(n_embd=384, n_layer=6, n_head=6, n_positions=512),
        "base": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),  # GPT-2 124M
    },
    "llama": _LLAMA_SIZES,
    # LLaMA's shapes with Qwen2's q/k/v biases; untied, as transformers' Qwen2Config defaults to.
    "qwen2": {name: dict(sizes, tie_word_embeddings=False) for name, sizes in _LLAMA_SIZES.items()
              if name != "small_v128k"},
    "bert": {
        "tiny": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256),
        "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
        "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    },
}


@dataclass(frozen=True)
class FamilySpec:
    """A family as the benchmark uses it: its sizes here, everything else from `lmblocks.families` (imported when
    first needed, so that planning jobs does not import lmblocks)."""

    name: str
    sizes: dict[str, dict[str, Any]]

    @property
    def lmb(self):
        from lmblocks.families import FAMILIES as LMB_FAMILIES

        return LMB_FAMILIES[self.name]

    @property
    def is_decoder(self) -> bool:
        return self.lmb.is_decoder

    def lmb_classes(self) -> tuple[type, type]:
        """(config class, model class): the causal LM, or the masked LM for an encoder."""
        return self.lmb.config_class, self.lmb.causal_lm_class or self.lmb.masked_lm_class

    def hf_classes(self) -> tuple[type, type]:
        """transformers' own config and model class the lmblocks ones export to (`lmblocks.export`)."""
        import transformers
        from transformers import CONFIG_MAPPING

        from lmblocks.export import export_table

        config_class, model_class = self.lmb_classes()
        return (CONFIG_MAPPING[config_class.foreign_model_type],
                getattr(transformers, export_table(config_class())["classes"][model_class]))

    def to_lmb_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' tensors in lmblocks' layout (GPT-2's Conv1D weights transposed, as the export declares)."""
        from lmblocks.export import export_table

        transposed = tuple(export_table(self.lmb_classes()[0]()).get("transposed", ()))
        return {k: (v.t().contiguous() if transposed and k.endswith(transposed) else v)
                for k, v in state_dict.items()}


FAMILIES: dict[str, FamilySpec] = {name: FamilySpec(name, sizes) for name, sizes in SIZES.items()}


def family_available(name: str) -> str | None:
    """None if lmblocks has the family, else why not (the family is still being written)."""
    try:
        FAMILIES[name].lmb_classes()
    except (ImportError, AttributeError) as err:
        return f"lmblocks has no {name} yet ({err})"
    return None


def build(family: str, size: str, impl: str, attn: str, dtype: torch.dtype, device: str,
          weights_from: torch.nn.Module | None = None) -> torch.nn.Module:
    """One model of `family`/`size`. lmblocks' model gets `weights_from`'s weights (transformers' model) if given."""
    spec = FAMILIES[family]
    config_class, model_class = spec.lmb_classes() if impl == "lmblocks" else spec.hf_classes()
    config = config_class(**spec.sizes[size])
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = model_class(config)
    if weights_from is not None:
        model.load_state_dict(spec.to_lmb_state_dict(weights_from.state_dict()), strict=True)
    return model.to(device=device, dtype=dtype)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: every 2-D weight except the embedding tables (the LM head
    counts, tied or not: it is a matmul). Conv1D and nn.Linear alike."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    lm_head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings)
    if lm_head is not None and id(lm_head.weight) in embeddings:
        total += lm_head.weight.numel()
    return total


def flops_per_token(model: torch.nn.Module, context: int) -> float:
    """Forward FLOPs per token: 2 per matmul parameter, plus q·kᵀ and attn·v over `context` keys (2·2·C·context per
    layer, causal masking not discounted, the PaLM convention)."""
    cfg = model.config
    return 2.0 * matmul_params(model) + 4.0 * cfg.num_hidden_layers * cfg.hidden_size * context


# ----------------------------------------------------------------------------------------------------------------
# Timing.


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _StepClock:
    """Logits processor that only records when each decoding step reached sampling: differences of consecutive
    stamps are the decode steps' wall times, prefill excluded."""

    def __init__(self, device: str) -> None:
        self.stamps: list[float] = []
        self.device = device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def _inputs(family: str, model: torch.nn.Module, batch: int, seq: int, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    if FAMILIES[family].is_decoder:
        return dict(input_ids=ids.to(device), labels=ids.to(device))
    labels = ids.masked_fill(torch.rand(batch, seq, generator=g) > 0.15, -100)  # BERT's MLM: 15% of positions
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), labels=labels.to(device))


class Runner:
    """One model prepared for one phase; `step()` runs one timed unit and returns its measurements."""

    def __init__(self, family: str, model: torch.nn.Module, phase: str, work: dict[str, int], device: str) -> None:
        self.family, self.model, self.phase, self.device = family, model, phase, device
        self.work = work
        if phase.startswith("train"):
            model.train()
            if phase == "train_eager_gc":
                model.activation_checkpointing_enable({"use_reentrant": False})
            # The fused AdamW kernel (CPU and CUDA): the per-parameter for-loop default would spend a third of a small
            # model's step in the optimizer, identical in both implementations, and blur the models' difference.
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
            self.batch = _inputs(family, model, work["train_batch"], work["train_seq"], device)
            self.call = torch.compile(model) if phase == "train_compile" else model
            self.tokens = work["train_batch"] * work["train_seq"]
        elif phase == "forward":
            model.eval()
            self.batch = _inputs(family, model, work["fwd_batch"], work["fwd_seq"], device)
            self.batch.pop("labels")
            self.tokens = work["fwd_batch"] * work["fwd_seq"]
        else:
            from lmblocks.decoding import compiled_decoding_config, decoding_attention, frozen_call
            from lmblocks.modeling_common import LmbPreTrainedModel

            model.eval()
            batch = int(phase.rsplit("_b", 1)[1])
            self.prompt = _inputs(family, model, batch, work["prompt"], device)["input_ids"]
            self.new_tokens = work["new_tokens"]
            self.kwargs: dict[str, Any] = dict(
                max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, do_sample=False,
                pad_token_id=0, eos_token_id=None,
            )
            if "_static_" in phase:
                # lmblocks' decoding settings, given to both implementations alike (lmblocks/decoding.py): the
                # compiled step, and on a CPU lmblocks' decoding attention (it reads only the cache positions
                # written so far; transformers' sdpa reads the whole static cache and copies each key-value head
                # for every query head of its group).
                self.kwargs.update(cache_implementation="static", compile_config=compiled_decoding_config(device))
                attention = decoding_attention(device, next(model.parameters()).dtype)
                if device == "cpu" and attention and model.config._attn_implementation == "sdpa":
                    model.set_attn_implementation(attention)
                if device == "cpu" and not isinstance(model, LmbPreTrainedModel):
                    # lmblocks models run their frozen compiled step through `frozen_call` themselves
                    # (modeling_common.py); transformers' get the same wrapper here.
                    compiled_call = model.get_compiled_call
                    model.get_compiled_call = lambda config: frozen_call(compiled_call(config))
            else:
                self.kwargs.update(disable_compile=True)
            self.tokens = batch * self.new_tokens

    def step(self, warmup: bool = False) -> dict[str, float]:
        """One timed unit. `warmup`: a dynamic-cache generate warms up on 8 new tokens (same code path, same kernels,
        a sixteenth of the time); a static-cache one runs in full, since its compiled graph is specific to the cache
        length."""
        _sync(self.device)
        if self.phase.startswith("train"):
            start = time.perf_counter()
            loss = self.call(**self.batch).loss
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            _sync(self.device)
            seconds = time.perf_counter() - start
            return dict(seconds=seconds, tokens_per_s=self.tokens / seconds)
        if self.phase == "forward":
            start = time.perf_counter()
            with torch.inference_mode():
                self.model(**self.batch)
            _sync(self.device)
            seconds = time.perf_counter() - start
            return dict(seconds=seconds, tokens_per_s=self.tokens / seconds)
        from transformers import LogitsProcessorList

        clock = _StepClock(self.device)
        kwargs, new_tokens = self.kwargs, self.new_tokens
        if warmup and "_static_" not in self.phase:
            new_tokens = min(8, new_tokens)
            kwargs = {**kwargs, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        start = time.perf_counter()
        out = self.model.generate(self.prompt, logits_processor=LogitsProcessorList([clock]), **kwargs)
        _sync(self.device)
        seconds = time.perf_counter() - start
        assert out.shape[1] == self.prompt.shape[1] + new_tokens, out.shape
        self.last_output = out
        steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
        return dict(seconds=seconds, tokens_per_s=self.tokens / seconds, ms_per_step=1e3 * statistics.median(steps))


def _summary(values: list[float]) -> dict[str, float]:
    return dict(min=min(values), median=statistics.median(values), max=max(values))


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """The best FLOP/s of an n×n×n matmul over `reps` tries: the MFU denominator, measured on this machine, now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(reps + 2):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def parity(family: str, lmb: torch.nn.Module, hf: torch.nn.Module, device: str, dtype: torch.dtype) -> float:
    """Asserts both models give the same logits on one batch (eval mode); returns the max abs difference."""
    lmb.eval(), hf.eval()
    batch = _inputs(family, hf, 2, 32, device, seed=7)
    batch.pop("labels")
    with torch.inference_mode():
        a, b = lmb(**batch).logits.float(), hf(**batch).logits.float()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(a, b, **tol)
    return (a - b).abs().max().item()


def time_phase(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Builds both models from the same weights, checks parity, then times `job["phase"]` interleaved:
    rep 0 runs A then B, rep 1 B then A, and so on, so drift in machine load hits both alike."""
    family, size, phase, device = job["family"], job["size"], job["phase"], job["device"]
    dtype = getattr(torch, job["dtype"])
    hf = build(family, size, "transformers", job["attn"], dtype, device)
    lmb = build(family, size, "lmblocks", job["attn"], dtype, device, weights_from=hf)
    max_diff = parity(family, lmb, hf, device, dtype)
    runners = {"lmblocks": Runner(family, lmb, phase, job["work"], device),
               "transformers": Runner(family, hf, phase, job["work"], device)}
    warmup = job["warmup"] + (1 if "compile" in phase or "static" in phase else 0)
    compile_s = {}
    for impl, runner in runners.items():  # warm-up (and compilation) outside the timed reps
        start = time.perf_counter()
        for _ in range(warmup):
            runner.step(warmup=True)
        compile_s[impl] = time.perf_counter() - start
    samples: dict[str, list[dict[str, float]]] = {impl: [] for impl in IMPLS}
    for rep in range(job["reps"]):
        order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
        for impl in order:
            samples[impl].append(runners[impl].step())
    extra = {}
    if phase.startswith("generate"):
        extra["same_tokens"] = bool(torch.equal(runners["lmblocks"].last_output, runners["transformers"].last_output))
    model = lmb
    context = job["work"]["train_seq"] if phase.startswith("train") else (
        job["work"]["fwd_seq"] if phase == "forward" else job["work"]["prompt"] + job["work"]["new_tokens"] // 2)
    fpt = flops_per_token(model, context) * (3 if phase.startswith("train") else 1)
    if phase.startswith("generate"):
        import limits

        weights, kv = limits.bytes_per_token(model, context)
        extra.update(bytes_per_token=weights + kv, weight_bytes_per_token=weights, kv_bytes_per_token=kv)
        if phase.endswith("_b1") and not device.startswith("cuda"):
            extra.update(limits.matvec_ceiling(lmb, runners["lmblocks"].prompt))
    records = []
    for impl in IMPLS:
        record = dict(kind="time", family=family, size=size, phase=phase, impl=impl, device=device,
                      dtype=job["dtype"], attn=job["attn"], reps=job["reps"], warmup_s=compile_s[impl],
                      max_abs_logit_diff=max_diff, flops_per_token=fpt, matmul_params=matmul_params(model), **extra)
        for key in samples[impl][0]:
            record[key] = _summary([s[key] for s in samples[impl]])
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(samples["lmblocks"], samples["transformers"])]
        record["paired_ratio_median"] = statistics.median(ratios)
        records.append(record)
    return records


# ----------------------------------------------------------------------------------------------------------------
# Memory.


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Peak memory of one model in one phase, in a process that holds only that model: peak RSS (CPU) or peak
    allocated memory (CUDA) over the phase's warm-up and two steps, and its rise over the model-only baseline."""
    family, size, phase, impl, device = job["family"], job["size"], job["phase"], job["impl"], job["device"]
    dtype = getattr(torch, job["dtype"])
    model = build(family, size, impl, job["attn"], dtype, device)
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb("VmRSS")
        reset = _reset_peak_rss()
    runner = Runner(family, model, phase, job["work"], device)
    for _ in range(job.get("steps", 2) + (1 if "compile" in phase or "static" in phase else 0)):
        runner.step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb("VmHWM")
    record = dict(kind="memory", family=family, size=size, phase=phase, impl=impl, device=device, dtype=job["dtype"],
                  attn=job["attn"], baseline_mb=base, peak_mb=peak, phase_mb=peak - base, work=job["work"],
                  metric="cuda_max_allocated" if cuda else "VmHWM")
    if not cuda and not reset:
        record["note"] = "peak RSS could not be reset; includes model construction"
    return [record]


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    torch.set_num_threads(job["threads"])
    if job["kind"] == "peak":
        dtype = getattr(torch, job["dtype"])
        return [dict(kind="peak", device=job["device"], dtype=job["dtype"], threads=job["threads"],
                     matmul_flops=matmul_peak_flops(job["device"], dtype))]
    if job["kind"] == "device_name":
        return [dict(kind="device_name", name=torch.cuda.get_device_name(0))]
    if job["kind"] == "bandwidth":
        import limits

        return limits.bandwidth_probe(job)
    if job["kind"] == "time":
        return time_phase(job)
    return measure_memory(job)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
