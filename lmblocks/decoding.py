"""Compiled decoding: `generate` with a static KV cache and the decoding step compiled, on CPU as on GPU.

Batch-1 decoding reads every weight once per token, so its limit is memory bandwidth; what keeps it from that limit
is per-step overhead — a few hundred small operators, Python, a cache that grows by concatenation — and, on CPU,
matrix-vector products too small to stream at full speed. transformers' generate already knows the cure: with
`cache_implementation="static"` the cache is preallocated and the decoding step is compiled once
(`generation_config.compile_config`), but it compiles on accelerators only. `compiled_decoding_config` gives the
settings that reach the bandwidth roofline on each device:

- CUDA: transformers' default (`reduce-overhead`: the step replayed as one CUDA graph).
- CPU: inductor with `freezing` (parameters become constants of the graph, so their layout is prepacked for the
  matrix-vector products) and `cpp.enable_concat_linear` (products of the same input — q/k/v, gate/up — become one
  larger product, read in one stream). The checkpoint keeps its layout; only the compiled graph changes. Frozen
  graphs are for inference: in this torch version they still read the live parameters (tests/test_decoding.py
  updates weights in place and generates again), but compile again after changing a model's weights if you rely
  on it elsewhere.

The same settings work for any transformers causal LM (the benchmark gives them to both implementations).
"""

from __future__ import annotations

import torch
from transformers import CompileConfig, PreTrainedModel


def compiled_decoding_config(device: torch.device | str) -> CompileConfig:
    """The `CompileConfig` for decoding on `device` (see the module docstring), forced on for every device."""
    if torch.device(device).type == "cpu":
        config = CompileConfig(fullgraph=True, dynamic=False, mode=None,
                               options={"freezing": True, "cpp.enable_concat_linear": True})
    else:
        config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # transformers auto-compiles on accelerators only, unless told
    return config


def enable_compiled_decoding(model: PreTrainedModel) -> PreTrainedModel:
    """Makes `model.generate` (and pipelines) decode with a static cache and a compiled step on the model's device.

    The first `generate` compiles (tens of seconds on CPU); later calls with the same cache length reuse it. Returns
    the model. Only for models that declare static-cache compilation support (`_can_compile_fullgraph`)."""
    if not getattr(model, "_can_compile_fullgraph", False):
        raise ValueError(f"{type(model).__name__} does not support a compiled static-cache decoding step.")
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = compiled_decoding_config(model.device)
    return model


__all__ = ["compiled_decoding_config", "enable_compiled_decoding"]
