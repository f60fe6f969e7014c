"""How close each model gets to the machine's limits, measured in the same run as everything else.

- **Memory of training.** Peak RSS rise of one training step with labels (forward, backward, AdamW step) at batch
  8 × 512 and width 6 × 384, for GPT-2 (vocabulary 50,257) and LLaMA with a 128,256-token vocabulary: the
  (tokens × vocab) logits matrix, its gradient and the softmax work are most of it in transformers' classes
  (2.1 GB per copy for the 128k vocabulary), which lmblocks' fused LM-head loss never builds.
- **Memory bandwidth.** A STREAM-like probe: copy (`b = a`, 2 × 8 bytes per element moved), triad
  (`a = b + s·c`, 3 ×) over 256 MiB arrays, and a 128 MiB float32 matrix-vector product (what decoding does),
  best of several reps, with the run's torch thread count.
- **Decoding against the roofline.** Batch-1 decoding is bound by reading the weights: per token it reads every
  matmul weight once (the LM head included, tied or not; not the embedding tables, of which it reads one row) and the
  KV cache so far. roofline fraction = (bytes read per token ÷ seconds per token) ÷ the best bandwidth the probe
  measured. The built-in's fraction is given beside lmblocks'.
- **bf16 against fp32 decoding**, for both implementations: what halving the bytes does on this CPU. Reported, not a
  speed-up over the built-ins (both can do it).

The jobs carry `section="limits"` so their rows stay out of the main table; `table()` renders them.
"""

from __future__ import annotations

import time
from typing import Any

import torch

# (family, size) trained at 8 × 512 for the memory rows; the 128k-vocabulary LLaMA also gets a timed training row.
MEMORY_MODELS = (("gpt2", "small"), ("llama", "small_v128k"))
TIMED_TRAINING_MODEL = MEMORY_MODELS[1]
MEMORY_WORK = dict(train_batch=8, train_seq=512, fwd_batch=8, fwd_seq=512, prompt=16, new_tokens=128)
TARGETS = {"gpt2": 0.45, "llama": 0.30}  # issue 17: peak-rise ratio lmblocks ÷ transformers
STREAM_BYTES = 256 * 2**20
MATVEC_BYTES = 128 * 2**20


def jobs(mode: str, families: list[str], work: dict[str, dict[str, Any]], reps: dict[str, int], common: dict,
         ) -> list[dict[str, Any]]:
    """The limits section of a run: the bandwidth probe; in full runs the 8 × 512 training-memory jobs (one
    training step each), the 128k-vocabulary training timing, and bf16 batch-1 decoding at the small size."""
    section = dict(section="limits", **common)
    out: list[dict[str, Any]] = [dict(kind="bandwidth", **section)]
    if mode not in ("full", "limits"):
        return out
    for family, size in MEMORY_MODELS:
        if family not in families:
            continue
        for impl in ("lmblocks", "transformers"):
            out.append(dict(kind="memory", family=family, size=size, phase="train_eager", impl=impl,
                            work=MEMORY_WORK, steps=1, **section))
    family, size = TIMED_TRAINING_MODEL
    if family in families:
        # 4 reps, not the full run's 6: each step is seconds on 2 cores, and the run has a 20-minute budget.
        out.append(dict(kind="time", family=family, size=size, phase="train_eager", work=work["small"],
                        reps=4, warmup=1, **section))
    for family in TARGETS:  # the families the memory targets are set for
        if family in families:
            out.append(dict(kind="time", family=family, size="small", phase="generate_dynamic_b1",
                            work=work["small"], reps=reps["generate"], warmup=1,
                            **{**section, "dtype": "bfloat16"}))
    return out


def _best_seconds(fn, reps: int, device: str) -> float:
    best = float("inf")
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bandwidth_probe(job: dict[str, Any], reps: int = 8) -> list[dict[str, Any]]:
    """STREAM copy and triad, and a float32 matrix-vector product, on `job["device"]`: GB/s (10⁹ bytes per
    second), best of `reps` (the first rep also faults the pages in)."""
    device = job["device"]
    n = STREAM_BYTES // 4
    a, b, c = (torch.rand(n, device=device) for _ in range(3))
    copy_s = _best_seconds(lambda: b.copy_(a), reps, device)
    triad_s = _best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a), reps, device)
    del a, b, c
    cols = 4096
    matrix, vector = torch.rand(MATVEC_BYTES // 4 // cols, cols, device=device), torch.rand(cols, device=device)
    matvec_s = _best_seconds(lambda: torch.mv(matrix, vector), reps, device)
    return [dict(kind="bandwidth", device=device, threads=job["threads"], section="limits",
                 copy_gbs=2 * STREAM_BYTES / copy_s / 1e9, triad_gbs=3 * STREAM_BYTES / triad_s / 1e9,
                 matvec_gbs=MATVEC_BYTES / matvec_s / 1e9)]


def matvec_ceiling(model: torch.nn.Module, prompt: torch.Tensor, reps: int = 8) -> dict[str, float]:
    """The matrix-vector products of one batch-1 decoding step, timed alone, back to back: what no removal of
    per-step overhead can beat. Captured from a real step (forward hooks on every nn.Linear, in call order), then
    timed two ways: each product as the model makes it (`matvec_separate_gbs`), and the products that share an input
    concatenated into one (`matvec_grouped_gbs`: q/k/v and gate/up, what compiled decoding's concat-linear pass
    does); and where lmblocks' packed kernel takes every product, through it, as the packaged step makes them
    (`matvec_packed_gbs`). GB/s of weight bytes, best of `reps`; the weights exceed the caches, so every rep streams
    them again."""
    calls: list[tuple[torch.nn.Linear, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda module, args, _: calls.append((module, args[0])))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.inference_mode():
            past = model(prompt[:1], use_cache=True).past_key_values
            calls.clear()
            model(prompt[:1, -1:], past_key_values=past, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[tuple[torch.Tensor, list[torch.nn.Linear]]] = []
    for module, x in calls:
        if groups and groups[-1][0] is x:
            groups[-1][1].append(module)
        else:
            groups.append((x, [module]))
    separate = [(x, m.weight, m.bias) for x, ms in groups for m in ms]
    grouped = [(x, torch.cat([m.weight for m in ms]),
                None if ms[0].bias is None else torch.cat([m.bias for m in ms])) for x, ms in groups]
    nbytes = sum(w.numel() * w.element_size() for _, w, _ in separate)

    def run(products, linear=torch.nn.functional.linear):
        for x, weight, bias in products:
            linear(x.reshape(-1, x.shape[-1]), weight, bias)

    with torch.inference_mode():
        result = dict(matvec_separate_gbs=nbytes / _best_seconds(lambda: run(separate), reps, "cpu") / 1e9,
                      matvec_grouped_gbs=nbytes / _best_seconds(lambda: run(grouped), reps, "cpu") / 1e9,
                      matvec_products=len(separate), matvec_grouped_products=len(grouped))
        # As the packaged decoding step makes them, where lmblocks' packed kernel takes every product: its own
        # packed weights (one block of huge pages, in module order).
        from lmblocks.packaged_step import PackedLinears
        from lmblocks.packed_matmul import operator

        packed_weights = {id(linear): layer.weight for _, _, linear, layer in PackedLinears(model).places}
        if all(id(m) in packed_weights for _, ms in groups for m in ms):
            packed = [(x, packed_weights[id(m)], m.bias) for x, ms in groups for m in ms]
            seconds = _best_seconds(lambda: run(packed, operator().linear), reps, "cpu")
            result.update(matvec_packed_gbs=nbytes / seconds / 1e9)
    return result


def bytes_per_token(model: torch.nn.Module, context: float) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) one batch-1 decoding step reads at `context` cached positions."""
    from harness import matmul_params

    element = next(model.parameters()).element_size()
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * context * element
    return float(matmul_params(model) * element), float(kv)


def harness_vocab(family: str, size: str) -> int:
    """The vocabulary of a benchmark model (the size's own, or the config class's default)."""
    import harness

    vocab = harness.FAMILIES[family].sizes[size].get("vocab_size")
    if vocab is None:
        vocab = harness.FAMILIES[family].lmb_classes()[0]().vocab_size
    return vocab


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "–"


def _pair(records, **match) -> dict[str, dict]:
    return {r["impl"]: r for r in records if all(r.get(k) == v for k, v in match.items())}


MATVEC_KEYS = ("matvec_separate_gbs", "matvec_grouped_gbs", "matvec_packed_gbs")  # `matvec_ceiling`'s bandwidths


def table(records: list[dict[str, Any]]) -> list[str]:
    """The limits section of the report (Markdown lines); empty if the run had none of it."""
    probes = [r for r in records if r["kind"] == "bandwidth"]
    if not probes:
        return []
    probed = max(max(p["copy_gbs"], p["triad_gbs"], p["matvec_gbs"]) for p in probes)
    probe = probes[0]
    lines = ["## Limits", "",
             f"Memory bandwidth ({probe['threads']} torch thread(s)): copy {probe['copy_gbs']:.1f} GB/s, triad "
             f"{probe['triad_gbs']:.1f} GB/s, float32 matrix-vector product (128 MiB) {probe['matvec_gbs']:.1f} GB/s; "
             f"the best, {probed:.1f} GB/s, is the roofline below, unless a model's own products alone streamed "
             "faster.", ""]
    limits = [r for r in records if r.get("section") == "limits"]
    mem_rows = []
    for family, size in dict.fromkeys((r["family"], r["size"]) for r in limits if r["kind"] == "memory"):
        pair = _pair(limits, kind="memory", family=family, size=size)
        if len(pair) == 2:
            a, b = pair["lmblocks"], pair["transformers"]
            target = f"≤ {TARGETS[family]:.2f}×" if (family, size) in MEMORY_MODELS else "–"
            vocab = harness_vocab(family, size)
            mem_rows.append(f"| {family} {size} (vocab {vocab:,}) | {a['work']['train_batch']} × "
                            f"{a['work']['train_seq']} | {a['phase_mb']:,.0f} | {b['phase_mb']:,.0f} | "
                            f"**{_ratio(a['phase_mb'], b['phase_mb'])}** | {target} |")
    if mem_rows:
        metric = "peak RSS" if limits[0]["device"] == "cpu" else "peak `torch.cuda.max_memory_allocated`"
        lines += [f"One training step with labels (forward, backward, AdamW): {metric} rise over the loaded model, "
                  "one model per process (CPU) or per reset of the allocator statistics (CUDA).", "",
                  "| model | tokens | lmblocks MB | transformers MB | ratio | target |", "|---|---|---|---|---|---|",
                  *mem_rows, ""]
    family, size = TIMED_TRAINING_MODEL
    train = _pair(limits, kind="time", family=family, size=size, phase="train_eager")
    if len(train) == 2:
        a, b = train["lmblocks"]["tokens_per_s"]["median"], train["transformers"]["tokens_per_s"]["median"]
        lines += [f"Training LLaMA small with the 128k vocabulary ({train['lmblocks']['reps']} interleaved reps, "
                  f"median): lmblocks {a:,.0f} tok/s, transformers {b:,.0f} tok/s, **{a / b:.2f}×** (paired "
                  f"{train['lmblocks']['paired_ratio_median']:.2f}×).", ""]
    roof_rows = []
    for r in records:
        if r["kind"] != "time" or r.get("impl") != "lmblocks" or not r["phase"].endswith("_b1") or \
                "bytes_per_token" not in r or r["dtype"] != "float32":
            continue
        other = _pair(records, kind="time", family=r["family"], size=r["size"], phase=r["phase"],
                      device=r["device"], dtype=r["dtype"], section=r.get("section"))
        if len(other) != 2:
            continue
        # The step's products alone read memory too: where they streamed faster than the probe (lmblocks' packed
        # kernel over weights in huge pages did, on an AMD EPYC thread), the roofline is theirs.
        bw = max(probed, *(r[key] for key in MATVEC_KEYS if key in r))
        fractions = []
        for impl in ("lmblocks", "transformers"):
            s = other[impl]["ms_per_step"]["median"] / 1e3
            fractions.append((other[impl]["bytes_per_token"] / s / 1e9, other[impl]["ms_per_step"]["median"]))
        ceiling = (f"{100 * r['matvec_separate_gbs'] / bw:.0f} % / {100 * r['matvec_grouped_gbs'] / bw:.0f} % / "
                   + (f"{100 * r['matvec_packed_gbs'] / bw:.0f} %" if "matvec_packed_gbs" in r else "–")
                   if "matvec_separate_gbs" in r else "–")
        roof_rows.append(f"| {r['family']} | {r['size']} | {r['phase']} | "
                         f"{r['bytes_per_token'] / 1e6:,.0f} | {bw:.1f} | "
                         f"{fractions[0][1]:.1f} / {fractions[1][1]:.1f} | "
                         f"{fractions[0][0]:.1f} / {fractions[1][0]:.1f} | "
                         f"**{100 * fractions[0][0] / bw:.0f} %** / {100 * fractions[1][0] / bw:.0f} % | {ceiling} |")
    if roof_rows:
        lines += ["Batch-1 decoding against the bandwidth roofline, float32 (bytes per token: matmul weights, LM head "
                  "included, + KV cache at the mean context; GB/s = bytes ÷ median ms per step). *static* phases "
                  "decode with `lmblocks.decoding.compiled_decoding_config` and, on a CPU, lmblocks' decoding "
                  "attention (`decoding_attention`), given to both implementations: a static cache and a compiled "
                  "step (on a CPU, the step compiled ahead of time, `lmblocks.packaged_step`: where lmblocks' "
                  "kernel runs, packed weights in one block of huge pages). *matvecs alone*: the step's "
                  "matrix-vector products timed back to back with nothing else — MKL's, as the model makes them / "
                  "with those of one input concatenated / lmblocks' packed kernel, as the packaged step makes them "
                  "— the ceiling for removing per-step overhead.",
                  "",
                  "| family | size | phase | MB per token | roofline GB/s | ms/step lmb / tf | GB/s lmb / tf | "
                  "roofline lmb / tf | "
                  "matvecs alone: MKL separate / MKL grouped / packed |",
                  "|---|---|---|---|---|---|---|---|---|", *roof_rows, ""]
    bf16_rows = []
    for family in TARGETS:
        low = _pair(limits, kind="time", family=family, size="small", phase="generate_dynamic_b1", dtype="bfloat16")
        full = _pair([r for r in records if r.get("section") != "limits"], kind="time", family=family,
                     size="small", phase="generate_dynamic_b1", dtype="float32")
        if len(low) == 2 and len(full) == 2:
            cells = []
            for impl in ("lmblocks", "transformers"):
                f32, b16 = full[impl]["ms_per_step"]["median"], low[impl]["ms_per_step"]["median"]
                cells.append(f"{f32:.1f} → {b16:.1f} ms (**{f32 / b16:.2f}×**)")
            bf16_rows.append(f"| {family} small | {cells[0]} | {cells[1]} |")
    if bf16_rows:
        lines += ["Batch-1 decoding, fp32 → bf16 weights (ms per step, speed-up): a property of the CPU, the same for "
                  "both implementations, not a speed-up over the built-ins.", "",
                  "| model | lmblocks | transformers |", "|---|---|---|", *bf16_rows, ""]
    return lines
