"""Compiled decoding: `generate` with a static KV cache and the decoding step compiled, on CPU as on GPU.

Batch-1 decoding reads every weight once per token, so its limit is memory bandwidth; what keeps it from that limit
is per-step overhead — a few hundred small operators, Python, a cache that grows by concatenation — and, on CPU,
matrix-vector products too small to stream at full speed. transformers' generate already knows the cure: with
`cache_implementation="static"` the cache is preallocated and the decoding step is compiled once
(`generation_config.compile_config`), but it compiles on accelerators only. `compiled_decoding_config` gives the
settings that reach the bandwidth roofline on each device:

- CUDA: transformers' default (`reduce-overhead`: the step replayed as one CUDA graph).
- CPU: inductor with `freezing` (parameters become constants of the graph, prepacked for MKL's matrix products),
  `cpp.enable_concat_linear` (products of one input — q/k/v, gate/up — become one larger product, read in one
  stream) and `cpp_wrapper` (the step runs from C++, not from generated Python). The checkpoint keeps its layout;
  only the compiled graph changes.

Freezing must be on while dynamo traces, so lmblocks models run their compiled step through `frozen_call`
(`LmbPreTrainedModel.get_compiled_call`). Frozen graphs hold their own copies of the weights: lmblocks models notice
when a weight changed since the compilation (`weights_stamp`: an optimizer step, `load_state_dict`, `.to()`, a write
through `.data`) and compile again.
Another transformers model given this config compiles without freezing, unless its compiled call is wrapped in
`frozen_call` too (bench/harness.py does so for the built-ins) — then only for inference on fixed weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from transformers import CompileConfig, PreTrainedModel

from .compat import compile_on_every_device, unmark_static_input


class FrozenWeightsInductor:
    """`torch.compile` backend: inductor, for graphs traced under `frozen_weights()` (`frozen_call` enters it around
    the compiled step, so tracing and compiling both see it). Each instance is a distinct backend to dynamo, so a new
    instance compiles anew rather than reusing graphs frozen with older weights."""

    freezes_weights = True  # read by duck typing: remote code has its own copy of this class

    def __deepcopy__(self, memo: dict) -> FrozenWeightsInductor:
        # generate() deep-copies its generation config; a copied backend would be a new backend to dynamo and to
        # transformers' compiled-call cache, and every generate would compile again.
        return self

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph_module, example_inputs)


@contextlib.contextmanager
def frozen_weights() -> Iterator[None]:
    """Inductor's `freezing`, `cpp.enable_concat_linear` and `cpp_wrapper` for what compiles inside. The C++
    wrapper calls the step's ~150 kernels and products from C++ instead of generated Python: a fifth of a base-size
    LLaMA step on CPU was that Python.

    Dynamo reads `freezing` while it traces (parameters become constants of the graph only then) and inductor while
    it compiles, so both are set around the compiled call. Passed as `torch.compile(options=...)` they reach inductor
    only: the weights stay graph inputs and nothing is frozen (torch 2.13; tests/test_decoding.py checks this)."""
    import torch._inductor.config as config  # not imported by `import torch`; imported here, when first needed

    saved = config.freezing, config.cpp.enable_concat_linear, config.cpp_wrapper
    config.freezing, config.cpp.enable_concat_linear, config.cpp_wrapper = True, True, True
    try:
        yield
    finally:
        config.freezing, config.cpp.enable_concat_linear, config.cpp_wrapper = saved


def frozen_call(compiled: Callable) -> Callable:
    """`compiled` (a decoding step) run under `frozen_weights()`, with the KV cache's tensors as ordinary inputs.

    transformers marks a static cache's tensors as static addresses (for CUDA graphs); freezing turns static inputs
    into constants of the graph, the cache's length counter among them, which then stops advancing (the next
    `generate` on the reused cache writes past its end). Unmarked, they stay inputs the graph updates in place."""

    def call(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        if cache is not None and not getattr(cache, "_inputs_unmarked", False):  # once per cache, not per step
            for layer in getattr(cache, "layers", ()):
                for tensor in (getattr(layer, name, None) for name in ("keys", "values", "cumulative_length")):
                    if torch.is_tensor(tensor):
                        unmark_static_input(tensor)
            cache._inputs_unmarked = True
        with frozen_weights():
            return compiled(*args, **kwargs)

    return call


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_stamp(model: torch.nn.Module) -> tuple[int, ...]:
    """A checksum of every parameter and buffer (the graphs freeze both): the sum of its bytes read as integers of its
    width, modulo 2^32. A change of any one element changes it (several could cancel only by an exact coincidence
    of their bits), whatever path wrote it: an optimizer step, a
    `load_state_dict`, `.to()`, or a write through `.data` (`p.data.add_()`), which changes neither the tensor's
    address nor its version counter (measured, torch 2.13: `p.data` is a new tensor with its own counter each time).

    One read of the weights per `generate`, about one batch-1 decoding step (which reads every weight too): 19 ms for
    the 56M parameters of LLaMA "small" on one CPU thread. An integer sum, not a float one: a float32 sum misses an
    update smaller than the rounding of the running total, and summing in float64 costs 14 times as much."""
    sums = []
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type == "meta":  # offloaded (device_map): its values live elsewhere, loaded per forward
            continue
        width = tensor.element_size()
        sums.append(tensor.detach().view(_SAME_WIDTH_INT[width]).sum(dtype=torch.int64 if width == 8 else torch.int32))
    return tuple(torch.stack([s.to(torch.int64) for s in sums]).tolist()) if sums else ()


def compiled_decoding_config(device: torch.device | str) -> CompileConfig:
    """The `CompileConfig` for decoding on `device` (see the module docstring), forced on for every device."""
    if torch.device(device).type == "cpu":
        config = CompileConfig(fullgraph=True, dynamic=False, mode=None, backend=FrozenWeightsInductor())
    else:
        config = CompileConfig(fullgraph=True, dynamic=False)
    return compile_on_every_device(config)


def enable_compiled_decoding(model: PreTrainedModel) -> PreTrainedModel:
    """Makes `model.generate` decode with a static cache and a compiled step on the model's device.

    The first `generate` compiles (tens of seconds on CPU); later calls with the same cache length reuse it. Returns
    the model. Only for models that declare static-cache compilation support (`_can_compile_fullgraph`)."""
    if not getattr(model, "_can_compile_fullgraph", False):
        raise ValueError(f"{type(model).__name__} does not support a compiled static-cache decoding step.")
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = compiled_decoding_config(model.device)
    return model


__all__ = [
    "FrozenWeightsInductor",
    "frozen_call",
    "frozen_weights",
    "compiled_decoding_config",
    "enable_compiled_decoding",
    "weights_stamp",
]
