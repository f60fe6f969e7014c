"""transformers' (and torch's) private names that lmblocks' modeling code leans on, in one place.

This file travels with a checkpoint as remote code (the modeling files import it as `from .compat import ...`), so it
imports nothing else of lmblocks and must import under every transformers from 5.16.1 to 5.23. Each shim below has a
test in tests/test_compat.py that fails when transformers changes the behaviour it relies on; when one fails, fix it
here, once.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from transformers import CompileConfig, GenerationConfig, PreTrainedModel, conversion_mapping

# transformers' `PreTrainedModel._can_set_attn_implementation` scans a modeling file's source for
# `class ...Attention...(nn.Module):` and, finding one, expects the attention kernel dispatch in the same file. An
# attention *container* (BERT's `self` + `output`) whose dispatch is in `layers.py` subclasses this name instead, so
# the scan finds no such class and `set_attn_implementation` stays allowed.
AttentionContainer = torch.nn.Module


def forget_checkpoint_conversions(model_type: str) -> None:
    """Undo `conversion_mapping.register_checkpoint_conversion_mapping(model_type, ...)`.

    transformers has no public way to unregister; these are the two places registration writes to."""
    cache = conversion_mapping._checkpoint_conversion_mapping_cache
    if cache is not None:
        cache.pop(model_type, None)
    conversion_mapping.USER_REGISTERED_MAPPINGS.discard(model_type)


def forget_load_conversions(model: PreTrainedModel) -> None:
    """Make `save_pretrained` write `model`'s own layout: transformers remembers the conversions a load applied (on
    the model, as `_weight_conversions`) to reverse them on save."""
    model._weight_conversions = None


def unmark_static_input(tensor: torch.Tensor) -> None:
    """Let a tensor that transformers marked as a static address (`torch._dynamo.mark_static_address`, done to a
    static cache's tensors for CUDA graphs) be an ordinary graph input again."""
    if hasattr(tensor, "_dynamo_static_input_type"):
        del tensor._dynamo_static_input_type


def compile_on_every_device(config: CompileConfig) -> CompileConfig:
    """transformers compiles the decoding step on accelerators only, unless the `CompileConfig` says otherwise."""
    config._compile_all_devices = True
    return config


def size_static_caches(model: PreTrainedModel, cache_length: Callable[[int], int]) -> None:
    """Make `generate` allocate `model`'s static caches `cache_length(n)` long where it would make them `n` long
    (its `max_length`): transformers sizes the cache to each call, and a compiled step with static shapes compiles
    again for every new length. Set on the instance (transformers' `_prepare_static_cache`, 5.16 to 5.23)."""
    prepare = type(model)._prepare_static_cache

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, *args, **kwargs):
        return prepare(self, cache_implementation, batch_size, cache_length(max_cache_len), *args, **kwargs)

    model._prepare_static_cache = types.MethodType(_prepare_static_cache, model)


def default_generation_params() -> dict[str, Any]:
    """The generation parameters a model config may carry (transformers moves them to the generation config)."""
    return GenerationConfig._get_default_generation_params()


__all__ = [
    "AttentionContainer",
    "forget_checkpoint_conversions",
    "forget_load_conversions",
    "unmark_static_input",
    "compile_on_every_device",
    "size_static_caches",
    "default_generation_params",
]
