"""Compiled decoding: `generate` with a static KV cache and the decoding step compiled, on CPU as on GPU.

Batch-1 decoding reads every weight once per token, so its limit is memory bandwidth; what keeps it from that limit
is per-step overhead — a few hundred small operators, Python, a cache that grows by concatenation — and, on CPU,
matrix-vector products too small to stream at full speed. transformers' generate already knows the cure: with
`cache_implementation="static"` the cache is preallocated and the decoding step is compiled once
(`generation_config.compile_config`), but it compiles on accelerators only. `compiled_decoding_config` gives the
settings that reach the bandwidth roofline on each device:

- CUDA: transformers' default (`reduce-overhead`: the step replayed as one CUDA graph).
- CPU: inductor with `freezing` (parameters become constants of the graph) and `cpp_wrapper` (the step runs from
  C++, not from generated Python). On AVX-512 CPUs, float32 products (and bf16 ones with AVX-512 BF16) run lmblocks'
  own kernel on weights packed once per compilation (`packed_products`, `lmblocks.packed_matmul`: about twice the
  bandwidth of MKL's and oneDNN's batch-1 products). Where MKL's products stay, `cpp.enable_concat_linear` makes the
  products of one input — q/k/v, gate/up — one larger product, read in one stream, and the LM head reads a
  contiguous transposed copy of its float32 weight (`contiguous_wide_weights`: MKL's matrix-vector product reads the
  transposed view at half the speed; 13 % off a SmolLM2-135M fp32 step). The checkpoint keeps its layout; only the
  compiled graph changes. `enable_compiled_decoding` also sets the attention to lmblocks' CPU kernel
  (`lmblocks.cpu_attention`), which reads only the cache positions written so far.

Compiled once per model for every prompt length and `max_new_tokens`: transformers sizes a static cache to each
call's `max_length`, and every new length compiled the step again; lmblocks sizes it in buckets instead
(`CACHE_BUCKETS`: powers of two from 256 up to the model's positions), so one compilation serves every generation up
to 256 tokens of prompt + output, the next up to 512, and so on. Measured on SmolLM2-135M, one CPU thread,
2026-12-06: a dynamic cache length (`dynamic=True`: one graph for every length) decodes as fast (53 against 53
ms/token of CPU time, interleaved) but compiles 2.3 times longer (101 s against 43 s of CPU time), in every new
process too.
On a CPU (float32 and bf16 products lmblocks' kernel's where it runs, ATen's elsewhere; int8 in lmblocks' int8
kernel's layout), the step is compiled ahead of time instead (`lmblocks.packaged_step`): exported and built by
AOTInductor into a package on disk that holds the code, not the weights, which every later process loads in about
a second and hands the model's own tensors; with `background=True` another process compiles it while the first
`generate` decodes eagerly (`lmblocks.background_build`). SmolLM2-135M, `scripts/generate.py --compile --weights
int8` (background), the chat prompt, 200 new tokens, two threads, the whole script, 2026-12-07: 12.0 s on a machine
whose compile cache is empty, 7.2 s the next time, against 17.2 s eager fp32. Where a package cannot serve (another
device, a call with other arguments, `ahead_of_time=False`), torch.compile's step runs, as follows.

A new process reuses torch.compile's step from inductor's on-disk FX graph cache (`TORCHINDUCTOR_CACHE_DIR`, by
default a folder in the temporary directory): frozen weights are keyed by their shape only and read from the model
at load, so the cache holds the compiled C++ while the weights stay the model's. MKL's prepacked weights
(`cpp.weight_prepack`) cannot be pickled and turned the cache off ("mkldnn tensors unpickleable"); at batch 1 a plain
product is as fast (49–53 against 49–53 ms/token, measured), so prepacking is off. What a new process still pays is
tracing (dynamo, then AOTAutograd, whose own cache refuses frozen graphs) and freezing: 15–18 s for SmolLM2-135M on
one thread (int8, 2026-12-07: dynamo 4.8 s, AOTAutograd and freezing 8.8 s, loading the compiled step 1.4 s) — what
the package avoids.
Freezing off (weights as graph inputs) lets both caches hold everything, but decodes 1.35 times slower in float32
(66–69 against 49–53 ms/token); for int8 (whose products are lmblocks' operator either way) it decodes as fast and a
new process starts in 10 s, but its first compilation took 212 s instead of 93 (both measured before the C++ wrapper
was built apart), so freezing stays. torch's precompiled dynamo cache (`caching_precompile`, experimental in 2.13)
failed to pickle the step's guards.

Each model compiles its step as a function of its own (`compiled_step`): dynamo keeps compiled graphs per code
object and falls back to eager after `recompile_limit` (8) graphs on one, and every module's `__call__` is one code
object — several compiled models in one process (or eight weight updates) would silently decode uncompiled. Should
the step still run uncompiled, a warning says so.

Freezing must be on while dynamo traces, so lmblocks models run their compiled step through `frozen_call`
(`LmbPreTrainedModel.get_compiled_call`). Frozen graphs hold the weights as constants: lmblocks models notice
when a weight changed since the compilation (`weights_stamp`: an optimizer step, `load_state_dict`, `.to()`, a write
through `.data`) and compile again (from the on-disk cache: only tracing is paid again); a packaged step packs the
new weights and hands them to the same package (no compilation).
Another transformers model given this config compiles without freezing, unless its compiled call is wrapped in
`frozen_call` too (bench/harness.py does so for the built-ins) — then only for inference on fixed weights.

`enable_compiled_decoding(model, weights=...)` also chooses the weights' format: "fp32", "bf16", or "int8" (int8
linear layers with one scale per output channel, `Int8Linear`, multiplied on a CPU by lmblocks' int8 × int8 kernel,
`lmblocks.int8_matmul`, their weights in one block of huge pages, `lmblocks.huge_pages`). SmolLM2-135M-Instruct,
batch 1, one thread, ms per token on an AMD EPYC (AVX-512 BF16 and VNNI, no AMX), 2026-12-07
(bench/llama_cpp_decode.py): fp32 27.9, bf16 16.7, int8 9.8; eager 69.3; llama.cpp f32 33.2, q8_0 11.1; greedy
tokens equal fp32 eager's for 64 (fp32), the first 53 (bf16) and 24 (int8) of 64 on the chat prompt, llama.cpp q8_0
16; bits per byte of the main job's held-out text within 0.02 % of fp32's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import types
from collections.abc import Callable, Iterator

import torch
from transformers import CompileConfig, PreTrainedModel

from .compat import compile_on_every_device, size_static_caches, unmark_static_input
from .cpu_attention import CPU_DECODING_ATTENTION
from .cpu_attention import KERNEL_DTYPES as CPU_KERNEL_DTYPES
from .cpu_attention import kernel_available as cpu_attention_available
from .cpu_attention import library as cpu_attention_library
from .cpu_kernels import build_libraries, builds, cpu_flags
from .huge_pages import in_one_block
from .int8_matmul import BLOCK as INT8_BLOCK
from .int8_matmul import int8_linear, pack_weight, unpack_weight
from .int8_matmul import library as int8_library
from .int8_matmul import operator as int8_operator
from .layers import preferred_attention
from .packed_matmul import BLOCK_BYTES, kernel_runs
from .packed_matmul import library as packed_library
from .packed_matmul import operator as packed_operator
from .packaged_step import packaged_call, packaged_products

logger = logging.getLogger(__name__)


class FrozenWeightsInductor(dict):
    """`torch.compile` backend: inductor, for graphs traced under `frozen_weights()` (`frozen_call` enters it around
    the compiled step, so tracing and compiling both see it). Counts its compilations (`compilations`) and the calls
    of what it compiled (`steps`), so that `frozen_call` notices a step that ran uncompiled.

    A dict of its settings, so that the generation config that holds it still turns into JSON: transformers hashes
    and prints a generation config through `json.dumps` (`save_pretrained` hashes it too), which refuses any other
    object. Compared and hashed as itself, not as its settings: each model's step counts its own compilations."""

    freezes_weights = True  # read by duck typing: remote code has its own copy of this class
    __eq__, __ne__, __hash__ = object.__eq__, object.__ne__, object.__hash__

    def __init__(self, weight_prepack: bool = False, ahead_of_time: bool = False, concat_linear: bool = True,
                 background: bool = False) -> None:
        super().__init__(backend="lmblocks frozen-weights inductor", weight_prepack=weight_prepack,
                         ahead_of_time=ahead_of_time, concat_linear=concat_linear, background=background)
        self.compilations = self.steps = 0

    @property
    def weight_prepack(self) -> bool:  # see `frozen_weights`
        return self["weight_prepack"]

    @property
    def concat_linear(self) -> bool:  # see `frozen_weights`
        return self.get("concat_linear", True)

    def __deepcopy__(self, memo: dict) -> FrozenWeightsInductor:
        # generate() deep-copies its generation config; a copied backend would be a new backend to dynamo and to
        # transformers' compiled-call cache, and every generate would compile again.
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(weight_prepack={self.weight_prepack}, ahead_of_time={self['ahead_of_time']}, "
                f"concat_linear={self.concat_linear}, background={self.get('background', False)})")

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.compilations += 1
        if self.weight_prepack:
            register_weight_packing()
        compiled = compile_fx(graph_module, example_inputs)

        def counted(*args):
            self.steps += 1
            return compiled(*args)

        return counted


@contextlib.contextmanager
def frozen_weights(weight_prepack: bool = False, concat_linear: bool = True) -> Iterator[None]:
    """Inductor's `freezing`, `cpp.enable_concat_linear` (unless `concat_linear` is False) and `cpp_wrapper` for what
    compiles inside, and
    `cpp.weight_prepack` off unless asked for: oneDNN's packed weights cannot be pickled, so the FX graph cache
    refuses a graph that holds them. Float32 products are as fast without (measured at batch 1); bfloat16 ones are
    1.4–1.9 times faster packed (oneDNN's packed bf16 product against ATen's bf16 `mm`, 30 distinct SmolLM2-sized
    matrices, one thread, AVX-512 BF16), and slower than float32 unpacked: where lmblocks' bf16 kernel does not run
    (`packed_products`: CPUs without AVX-512 BF16), bf16 keeps oneDNN's packing and compiles in every process. The
    C++ wrapper calls the step's ~150 kernels and products from C++ instead of generated Python: a fifth of a
    base-size LLaMA step on CPU was that Python. It is built apart from the kernels (`cpp_wrapper_build_separate`):
    a first compilation of SmolLM2-135M's step took 46 s instead of 65 (fp32) and 89 (int8), decoding as fast
    (45.0 against 45.3, 14.1 against 13.9 ms/token, interleaved in one process, one thread, 2026-12-07).

    Dynamo reads `freezing` while it traces (parameters become constants of the graph only then) and inductor while
    it compiles, so both are set around the compiled call. Passed as `torch.compile(options=...)` they reach inductor
    only: the weights stay graph inputs and nothing is frozen (torch 2.13; tests/test_decoding.py checks this)."""
    import torch._inductor.config as config  # not imported by `import torch`; imported here, when first needed

    names = ("freezing", "cpp.enable_concat_linear", "cpp_wrapper", "cpp_wrapper_build_separate", "cpp.weight_prepack",
             "joint_custom_post_pass")
    values = (True, concat_linear, True, True, weight_prepack, weight_layouts_pass())
    with config.patch(dict(zip(names, values))):
        yield


def register_weight_packing() -> None:
    """Registers inductor's oneDNN weight-packing patterns, which inductor itself registers only once per process, at
    the first frozen compilation, and only if `cpp.weight_prepack` is on then (torch 2.13: `freezing_patterns.lazy_init`
    runs once). A bf16 model compiled after a float32 one (prepacking off) used to get no packing at all: 46 against
    27–30 ms/token for SmolLM2-135M on one thread, silently. Called by `FrozenWeightsInductor` before it compiles
    with prepacking; idempotent (inductor caches it). The other way round
    is left: once registered, the patterns also pack a float32 model's weights compiled later in that process (as
    fast, measured: 45.0 against 44.2 ms/token), and that step then bypasses the on-disk cache."""
    try:
        from torch._inductor.fx_passes.mkldnn_fusion import _mkldnn_weight_pack_init
    except ImportError:  # another torch: its own registration stands
        return
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    with torch._guards.tracing(None), unset_fake_temporarily(), FakeTensorMode():  # as inductor's lazy_init does
        _mkldnn_weight_pack_init()


WIDE_PRODUCT = 2  # outputs per input from which a float32 product reads a contiguous transposed weight


def contiguous_wide_weights(graph: torch.fx.Graph) -> None:
    """In an inference graph about to be frozen: a product `x @ W.T` whose float32 weight W has at least
    `WIDE_PRODUCT` times as many outputs as inputs (the LM head) reads a contiguous copy of W.T instead of W's
    transposed view. Freezing folds the copy into a constant of the graph, made once per compilation from the live
    weights; the model keeps its own layout (the copy costs the weight's size again while the graph lives).

    Why: MKL's float32 matrix-vector product reads the transposed view at about half the speed. SmolLM2-135M's head
    (49152 × 576) streamed from memory on one AMD EPYC thread, 2026-12-06: 11.5 ms against 5.6 ms contiguous; a
    whole fp32 compiled decoding step 47.5–48.6 against 40.8–42.7 CPU ms/token, same tokens. Products whose input
    feeds another product too (q/k/v, gate/up) are left to `cpp.enable_concat_linear`, which already makes their
    weight one contiguous transposed block; square and narrow ones (attention output, down projection) measured
    slower transposed (bf16 products too), and keep the view."""
    aten = torch.ops.aten
    views = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    products = (aten.mm.default, aten.addmm.default)

    def readers(node: torch.fx.Node) -> list[torch.fx.Node]:  # what reads `node`, through views of it
        source = node.args[0] if node.target in views else node
        direct = list(source.users)
        return direct + [user for view in direct if view.target in views for user in view.users]

    for product, x, weight_t, weight in parameter_products(graph):
        if weight.dtype != torch.float32 or weight.shape[0] < WIDE_PRODUCT * weight.shape[1]:
            continue
        if isinstance(x, torch.fx.Node) and any(r is not product and r.target in products for r in readers(x)):
            continue
        with graph.inserting_after(weight_t):
            copy = graph.call_function(aten.clone.default, (weight_t,), {"memory_format": torch.contiguous_format})
        copy.meta["val"] = weight_t.meta["val"].contiguous()
        product.replace_input_with(weight_t, copy)


def parameter_products(graph: torch.fx.Graph) -> list[tuple[torch.fx.Node, object, torch.fx.Node, torch.Tensor]]:
    """The products `x @ W.T (+ b)` (`mm`, `addmm`) of an inference graph about to be frozen whose W is one of the
    model's parameters or buffers (AOTAutograd puts them first among the placeholders; freezing makes them
    constants), read as W.T (`permute(W, [1, 0])`, as a linear layer's product reads it): (the product, x, the W.T
    node, W's fake value)."""
    context = torch._guards.TracingContext.try_get()
    n_params = len(context.params_flat or ()) if context is not None else 0
    params = set(graph.find_nodes(op="placeholder")[:n_params])
    aten = torch.ops.aten
    found = []
    for target in (aten.mm.default, aten.addmm.default):
        for product in graph.find_nodes(op="call_function", target=target):
            x, weight_t = product.args[-2], product.args[-1]
            if (isinstance(weight_t, torch.fx.Node) and weight_t.target is aten.permute.default
                    and list(weight_t.args[1]) == [1, 0] and weight_t.args[0] in params
                    and weight_t.args[0].meta.get("val") is not None):
                found.append((product, x, weight_t, weight_t.args[0].meta["val"]))
    return found


def packed_products(graph: torch.fx.Graph) -> None:
    """In an inference graph about to be frozen: every float32 or bfloat16 product `x @ W.T (+ b)` of a parameter W
    whose dtype lmblocks' packed kernel runs on this CPU (`packed_kernel_available`) becomes that kernel on W packed
    in its layout (`lmblocks.packed_matmul`); freezing folds the packing into a constant, made once per compilation
    from the live weights (the model keeps its own). SmolLM2-135M's products streamed 10.5–14 GB/s (MKL, float32)
    and 12.5 (oneDNN, bf16) against about 25 and 22 with the kernel (one AMD EPYC thread, 2026-12-07)."""
    for product, x, weight_t, weight in parameter_products(graph):
        bias = product.args[0] if product.target is torch.ops.aten.addmm.default else None
        x_value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if (not packed_kernel_takes(weight) or x_value is None or x_value.dtype != weight.dtype or product.kwargs
                or (bias is not None and not (isinstance(bias, torch.fx.Node) and bias.meta["val"].dim() == 1))):
            continue
        operator = packed_operator()
        with graph.inserting_before(product):
            packed = graph.call_function(operator.pack.default, (weight_t.args[0],))
            packed.meta["val"] = weight
            linear = graph.call_function(operator.linear.default, (x, packed, bias))
            linear.meta["val"] = product.meta["val"]
        product.replace_all_uses_with(linear)
        graph.erase_node(product)


def packed_kernel_takes(weight: torch.Tensor) -> bool:
    """Whether lmblocks' packed kernel multiplies by `weight` here: on a CPU, in a dtype whose kernel runs
    (`packed_kernel_available`), rows a whole number of the layout's blocks. Read by both compiled steps: the graph
    pass of torch.compile's (`packed_products`) and the packaged step's linear layers (`lmblocks.packaged_step`)."""
    return (weight.device.type == "cpu" and packed_kernel_available(weight.dtype)
            and weight.shape[1] * weight.element_size() % BLOCK_BYTES == 0)


@functools.cache
def packed_kernel_available(dtype: torch.dtype) -> bool:
    """Whether `dtype` products use lmblocks' packed kernel (`packed_products`): where this CPU runs its fast path
    (`lmblocks.packed_matmul.kernel_runs`: float32 on AVX-512, bfloat16 on AVX-512 BF16), once it is built (or
    loaded). Without a C++ compiler, MKL's and oneDNN's products stay, and this says so once."""
    return kernel_runs(dtype) and builds(packed_operator, "packed float kernels",
                                         "products use MKL's and oneDNN's instead.")


@functools.cache
def weight_layouts_pass():
    """`packed_products` and `contiguous_wide_weights`, the weight layouts of a decoding step, as an inductor custom
    pass (made on first use: `torch._inductor` is not imported by `import torch`). Its `uuid` is this file's hash
    and which packed kernels run here, so inductor's on-disk cache keeps compiled steps across processes and
    drops them when this file changes."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class WeightLayouts(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            packed_products(graph)
            contiguous_wide_weights(graph)  # what the packed kernel does not take

        def uuid(self) -> bytes:
            kernels = [packed_kernel_available(dtype) for dtype in (torch.float32, torch.bfloat16)]
            return get_hash_for_files((__file__,)) + str(kernels).encode()

    return WeightLayouts()


def frozen_call(compiled: Callable, backend: FrozenWeightsInductor | None = None, name: str = "model") -> Callable:
    """`compiled` (a decoding step) run under `frozen_weights()`, with the KV cache's tensors as ordinary inputs.

    transformers marks a static cache's tensors as static addresses (for CUDA graphs); freezing turns static inputs
    into constants of the graph, the cache's length counter among them, which then stops advancing (the next
    `generate` on the reused cache writes past its end). Unmarked, they stay inputs the graph updates in place.
    Given the `backend`, a step that ran without its compiled graph (dynamo fell back to eager) is logged once."""
    warned = []

    def call(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and not getattr(cache, "_inputs_unmarked", False):  # once per cache, not per step
            for layer in getattr(cache, "layers", ()):
                for tensor in (getattr(layer, name, None) for name in ("keys", "values", "cumulative_length")):
                    if torch.is_tensor(tensor):
                        unmark_static_input(tensor)
            cache._inputs_unmarked = True
        steps = backend.steps if backend is not None else None
        with frozen_weights(getattr(backend, "weight_prepack", False), getattr(backend, "concat_linear", True)):
            out = compiled(*args, **kwargs)
        if backend is not None and backend.steps == steps and not warned:
            warned.append(True)
            logger.warning(
                f"The compiled decoding step of {name} ran uncompiled (torch.compile fell back to eager: a graph "
                "break, an error or a recompile limit; TORCH_LOGS=recompiles,graph_breaks says which). Decoding goes "
                "on at eager speed.")
        return out

    return call


def compiled_step(model: torch.nn.Module, compile_config: CompileConfig) -> Callable:
    """`model`'s decoding step compiled with `compile_config` (a frozen-weights one), reused while the weights are
    unchanged (`weights_stamp`), compiled again when they changed.

    Compiled as a function of its own (a fresh code object): dynamo keeps graphs per code object and gives up after
    `recompile_limit` of them, and `model.__call__` (transformers compiles that) is one code object for every module
    — another compiled model in the process, or weight updates, would use up the limit of this one."""
    stamp = weights_stamp(model)
    entry = model.__dict__.get("_frozen_step")
    if entry is None or entry[0] != stamp or entry[1] != compile_config:

        def step(*args, **kwargs):
            return model(*args, **kwargs)

        step = types.FunctionType(step.__code__.replace(), step.__globals__, "decoding_step", None, step.__closure__)
        compiled = torch.compile(step, **compile_config.to_dict())
        entry = (stamp, compile_config, frozen_call(compiled, compile_config.backend, type(model).__name__))
        model.__dict__["_frozen_step"] = entry
    compiled = reuse_guard_checks(entry[2], lambda: compile_config.backend.steps)
    if compile_config.backend.get("ahead_of_time") and packaged_products(model):
        return packaged_call(model, compile_config.backend, stamp, compiled)
    return compiled


def reuse_guard_checks(step: Callable, compiled_runs: Callable[[], int]) -> Callable:
    """`step` (a compiled function) for one generation: transformers asks for the compiled call once per `generate`
    and calls it for every token. Each call's dynamo guard checks choose its compiled graph (about 4,000 of them for
    SmolLM2-135M's step, checked in C++: 0.7 of 12.6 ms/token in int8, measured); a call whose arguments match those
    of the last checked call — the same names, tensors of the same shape, strides, dtype and device, equal numbers and
    strings, the same other objects (the cache) — runs without them (`skip_guard_eval_unsafe`: the graph that the
    check chose before), and any other call is checked. What the skipped guards would catch besides the arguments —
    the model, its config, global state — does not change between the tokens of one generation. Only a checked call
    that ran a compiled graph (`compiled_runs()`, a count of the compiled graph's runs, went up) is reused: a call
    that dynamo ran eagerly has no graph to reuse."""
    checked = []

    def call(*args, **kwargs):
        signature = call_signature(args, kwargs)
        if checked and checked[0] == signature:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return step(*args, **kwargs)
        runs = compiled_runs()
        out = step(*args, **kwargs)
        checked[:] = [signature] if compiled_runs() > runs else []
        return out

    return call


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """What `reuse_guard_checks` compares between calls: per argument, a tensor's shape, strides, dtype and device, a
    number's or string's type and value, or any other object's identity (compared while the arguments are alive)."""

    def of(value):
        if isinstance(value, torch.Tensor):
            return value.shape, value.stride(), value.dtype, value.device, value.requires_grad
        if value is None or isinstance(value, (bool, int, float, str)):
            return type(value), value
        return id(value)

    return tuple(map(of, args)), tuple((name, of(value)) for name, value in kwargs.items())


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_stamp(model: torch.nn.Module) -> tuple[int, ...]:
    """A checksum of every parameter and buffer (the graphs freeze both): the sum of its bytes read as integers of its
    width (of 4 bytes for 1- and 2-byte types where the size allows: ATen sums int8 about 10 times slower than int32;
    an int8 SmolLM2-135M took 77 ms, 8 ms read as int32), modulo 2^32. A change of any one element changes it (several
    could cancel only by an exact coincidence of their bits), whatever path wrote it: an optimizer step, a
    `load_state_dict`, `.to()`, or a write through `.data` (`p.data.add_()`), which changes neither the tensor's
    address nor its version counter (measured, torch 2.13: `p.data` is a new tensor with its own counter each time).

    One read of the weights per `generate`, about one batch-1 decoding step (which reads every weight too): 19 ms for
    the 56M parameters of LLaMA "small" on one CPU thread. An integer sum, not a float one: a float32 sum misses an
    update smaller than the rounding of the running total, and summing in float64 costs 14 times as much."""
    sums = []
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type == "meta":  # offloaded (device_map): its values live elsewhere, loaded per forward
            continue
        tensor = tensor.detach().reshape(-1)
        if tensor.element_size() < 4 and tensor.numel() * tensor.element_size() % 4 == 0:
            tensor = tensor.view(torch.uint8).view(torch.int32)  # int8 weights: ATen sums int32 ~10x faster
        width = tensor.element_size()
        sums.append(tensor.view(_SAME_WIDTH_INT[width]).sum(dtype=torch.int64 if width == 8 else torch.int32))
    return tuple(torch.stack([s.to(torch.int64) for s in sums]).tolist()) if sums else ()


def compiled_decoding_config(device: torch.device | str, dtype: torch.dtype = torch.float32,
                             ahead_of_time: bool = True, background: bool = False) -> CompileConfig:
    """The `CompileConfig` for decoding on `device` with weights of `dtype` (see the module docstring), forced on for
    every device. `ahead_of_time`: on a CPU, a step a package can serve (`lmblocks.packaged_step.packaged_products`)
    is compiled into a package on disk instead of by torch.compile; `background`: by another process, while this
    one decodes eagerly (`lmblocks.background_build`)."""
    if torch.device(device).type == "cpu":
        # bf16 products: lmblocks' kernel where it runs (`packed_products`), else oneDNN's, packed. Without bf16 dot
        # products the weights keep eager's layout: inductor's concatenated q/k/v and gate/up weights, one contiguous
        # transposed block, took ATen's bf16 product 8 times as long as the transposed view eager reads (AVX2 code
        # paths on an AVX-512 machine, `LMBLOCKS_CPU_MARCH=haswell`, one thread: SmolLM2-135M's step 156.6 ms/token
        # against 18.5 unconcatenated and eager's 29.1)
        bf16 = dtype == torch.bfloat16
        backend = FrozenWeightsInductor(weight_prepack=bf16 and not packed_kernel_available(dtype),
                                        ahead_of_time=ahead_of_time, concat_linear=not bf16 or native_bf16_products(),
                                        background=background)
        config = CompileConfig(fullgraph=True, dynamic=False, mode=None, backend=backend)
    else:
        config = CompileConfig(fullgraph=True, dynamic=False)
    return compile_on_every_device(config)


CACHE_BUCKETS = tuple(2**n for n in range(8, 21))  # 256 ... 1M tokens, then the model's positions


def cache_bucket(length: int, positions: int | None = None) -> int:
    """The static cache length for a `generate` that needs `length` positions: the smallest of `CACHE_BUCKETS` that
    holds it, at most the model's `positions` (a cache longer than the model's positions is never needed)."""
    bucket = next((b for b in CACHE_BUCKETS if b >= length), length)
    return max(length, min(bucket, positions)) if positions else bucket


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights, one scale per output channel (symmetric: weight ≈ int8 × scale), for
    decoding. On a CPU, with float32 inputs and `in_features` a multiple of 64, the product is lmblocks' int8 × int8
    kernel (`lmblocks.int8_matmul`: the activations quantized to int8 with one scale per 16 values, as llama.cpp's
    q8_0 does per 32; the weight stored in the kernel's packed layout); elsewhere ATen's weight-only int8 kernel
    (`_weight_int8pack_mm`) on bfloat16 activations (its float32 path is 7–15 times slower on AVX-512, measured).
    The output is in the input's dtype."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight_int8 = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        # The kernel's layout (`pack_weight`: tiles of four rows, block by block) where the kernel can take it.
        self.packed = self.in_features % INT8_BLOCK == 0 and int8_kernel_available()
        self.register_buffer("weight_int8", pack_weight(weight_int8) if self.packed else weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and x.device.type == "cpu" and x.dtype == torch.float32:
            return int8_linear(x, self.weight_int8, self.scales, self.bias)
        weight = unpack_weight(self.weight_int8) if self.packed else self.weight_int8
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), weight,
                                                 self.scales.to(torch.bfloat16))
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        kernel = "lmblocks int8 x int8" if self.packed else "ATen weight-only int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kernel}"


@functools.cache
def int8_kernel_available() -> bool:
    """Whether lmblocks' int8 kernel is built (or loaded) for this machine: built on first use, which needs a C++
    compiler. Without one, `Int8Linear` uses ATen's weight-only kernel, and this says so once. Loaded here, when a
    layer is made, not while `torch.compile` traces one."""
    return builds(int8_operator, "int8 kernel",
                  "int8 layers use ATen's weight-only int8 kernel instead (slower at batch 1).")


WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}  # by format: what is not int8
WEIGHT_FORMATS = tuple(WEIGHT_DTYPES)


def native_bf16_products() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX-512 BF16 or AMX); without them a compiled bf16 step
    keeps eager's weight layout (`compiled_decoding_config`). x86; True elsewhere: not measured there."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def convert_weights(model: PreTrainedModel, weights: str) -> PreTrainedModel:
    """`model` (in place) with its weights in `weights` format: "fp32" or "bf16" (the whole model in that dtype), or
    "int8" (every `nn.Linear`, the output head included, replaced by an `Int8Linear`, their weights in one block
    of huge pages; the rest in float32)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r} is not one of {', '.join(WEIGHT_FORMATS)}.")
    model.to(WEIGHT_DTYPES[weights])
    if weights == "int8":
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, child_name, Int8Linear(child))
        # The kernel's weights in one block of huge pages, in the order of the modules (the order a decoding step
        # reads them): 12.6 against 14.4–14.9 ms/token for SmolLM2-135M (`lmblocks.huge_pages`).
        packed = [m for m in model.modules() if isinstance(m, Int8Linear) and m.packed and m.weight_int8.is_cpu]
        if packed:
            for layer, weight in zip(packed, in_one_block([layer.weight_int8 for layer in packed])):
                layer.weight_int8 = weight
    return model


def build_kernels(device: torch.device, dtype: torch.dtype, weights: str | None) -> None:
    """Builds, all at once, lmblocks' CPU kernels that compiled decoding of weights in `weights` format (None: as
    they are, in `dtype`) on `device` will load, side by side: on a machine's first use, the attention library and
    the int8 or packed one in 6.3–6.7 s on two cores instead of 13–14 (`lmblocks.cpu_kernels.build_libraries`).
    Unknown `weights`: nothing (the caller refuses them)."""
    if device.type != "cpu" or weights not in (None, *WEIGHT_FORMATS):
        return
    dtype = WEIGHT_DTYPES.get(weights, dtype)
    needed = [cpu_attention_library()] if dtype in CPU_KERNEL_DTYPES else []
    needed += [int8_library()] if weights == "int8" else [packed_library()] if kernel_runs(dtype) else []
    build_libraries(needed)


def decoding_attention(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """The attention implementation that a compiled decoding step on `device` with weights of `dtype` runs fastest
    with, or None for transformers' default (sdpa): on a CPU, lmblocks' kernel (`lmblocks.cpu_attention`: it reads
    only the cache positions written so far), or where it cannot be built `preferred_attention`'s choice."""
    if torch.device(device).type == "cpu" and dtype in CPU_KERNEL_DTYPES and cpu_attention_available():
        return CPU_DECODING_ATTENTION
    return preferred_attention(device, dtype)


def enable_compiled_decoding(model: PreTrainedModel, weights: str | None = None,
                             ahead_of_time: bool = True, background: bool = False) -> PreTrainedModel:
    """Makes `model.generate` decode with a static cache and a compiled step on the model's device.

    `weights`: None keeps the model's dtype; "fp32", "bf16" or "int8" convert it in place (`convert_weights`; int8
    is for inference: the model then holds `Int8Linear` layers). On a CPU the model switches from sdpa to lmblocks'
    decoding attention (`decoding_attention`), which reads only the cache positions written so far. The first
    `generate` compiles (17–22 s for SmolLM2-135M on two CPU cores, in two parts side by side; 23–24 s on one);
    every later generation that fits the same cache bucket (`cache_bucket`: 256, 512, ... positions) reuses it.
    `ahead_of_time` (on a CPU): the step is compiled into a package on disk (`lmblocks.packaged_step`), which a new
    process loads in about a second; False, or elsewhere: torch.compile's step, which a new process takes from
    inductor's cache in 15–18 s (bf16 with oneDNN's packed weights, where lmblocks' bf16 kernel does not run,
    compiles anew) — on CPUs without lmblocks' float kernels (AVX2) it decodes 3–4 % faster than the package.
    `background` (with `ahead_of_time`): a package not compiled before is compiled by a new process while `generate`
    decodes eagerly, and used from the first call after it is written (`lmblocks.background_build`): no wait, and
    the next process finds it. Returns the model. Only for models that declare static-cache compilation support
    (`_can_compile_fullgraph`)."""
    if not getattr(model, "_can_compile_fullgraph", False):
        raise ValueError(f"{type(model).__name__} does not support a compiled static-cache decoding step.")
    build_kernels(model.device, model.dtype, weights)
    if weights is not None:
        convert_weights(model, weights)
    faster = decoding_attention(model.device, model.dtype)
    if faster and model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(faster)
    positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    size_static_caches(model, lambda length: cache_bucket(length, positions))
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = compiled_decoding_config(model.device, model.dtype, ahead_of_time,
                                                                      background)
    return model


__all__ = [
    "FrozenWeightsInductor",
    "CACHE_BUCKETS",
    "Int8Linear",
    "WEIGHT_FORMATS",
    "native_bf16_products",
    "cache_bucket",
    "compiled_step",
    "reuse_guard_checks",
    "convert_weights",
    "frozen_call",
    "frozen_weights",
    "compiled_decoding_config",
    "decoding_attention",
    "enable_compiled_decoding",
    "weights_stamp",
]
