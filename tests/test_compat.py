"""Each shim in lmblocks/compat.py relies on something transformers (or torch) does through a private name; each test
here checks that it still does, so a transformers release that changes it fails here, by name, not somewhere deep
in a forward pass."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import torch
from safetensors.torch import load_file
from transformers import CompileConfig, GenerationConfig, GPT2Config, GPT2LMHeadModel, StaticCache, conversion_mapping
from transformers.core_model_loading import Transpose, WeightConverter

import lmblocks
from lmblocks import compat
from lmblocks.integrations import weight_conversions_while_loading
from lmblocks.modeling_gpt2 import CONV1D_PROJECTIONS

from families import LLAMA


def test_an_attention_class_on_nn_module_without_the_dispatch_refuses_set_attn_implementation(tmp_path) -> None:
    """Why `AttentionContainer` exists: transformers' source scan still refuses such a file..."""
    (tmp_path / "modeling_probe.py").write_text(textwrap.dedent("""
        from torch import nn
        from transformers import PreTrainedConfig, PreTrainedModel

        class ProbeAttention(nn.Module):
            pass

        class ProbeModel(PreTrainedModel):
            config_class = PreTrainedConfig
    """))
    spec = importlib.util.spec_from_file_location("modeling_probe", tmp_path / "modeling_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_probe"] = module
    try:
        spec.loader.exec_module(module)
        assert module.ProbeModel._can_set_attn_implementation() is False
    finally:
        del sys.modules["modeling_probe"]
    # ... and BERT's file, whose attention container subclasses the alias, passes the scan.
    assert lmblocks.LmbBertModel._can_set_attn_implementation() is True
    model = lmblocks.LmbBertModel(lmblocks.LmbBertConfig.from_preset("tiny", vocab_size=99))
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


def test_forget_checkpoint_conversions_unregisters() -> None:
    model_type = "lmb_compat_probe"
    conversions = [WeightConverter("w", "w", operations=[Transpose(0, 1)])]
    conversion_mapping.register_checkpoint_conversion_mapping(model_type, conversions, overwrite=True)
    assert conversion_mapping.get_checkpoint_conversion_mapping(model_type) is not None
    compat.forget_checkpoint_conversions(model_type)
    assert conversion_mapping.get_checkpoint_conversion_mapping(model_type) is None
    # Registering again without `overwrite` would raise if anything of the first registration were left.
    conversion_mapping.register_checkpoint_conversion_mapping(model_type, conversions)
    compat.forget_checkpoint_conversions(model_type)


def test_forget_load_conversions_makes_save_write_the_models_own_layout(tmp_path) -> None:
    theirs = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=99, n_positions=64))
    theirs.save_pretrained(tmp_path / "theirs")
    conv1d_to_linear = [WeightConverter(p, p, operations=[Transpose(0, 1)]) for p in CONV1D_PROJECTIONS]
    model_class = lmblocks.LmbGPT2LMHeadModel
    with weight_conversions_while_loading(lmblocks.LmbGPT2Config.model_type, conv1d_to_linear):
        # transformers' own loader (lmblocks' override would forget the conversions itself)
        model = super(lmblocks.LmbGPT2PreTrainedModel, model_class).from_pretrained(tmp_path / "theirs")
    assert model.transformer.h[0].attn.c_attn.weight.shape == (96, 32)  # converted on the way in
    # transformers remembers the load's conversions on the model, under this name, to reverse them on save.
    assert model._weight_conversions
    compat.forget_load_conversions(model)
    model.save_pretrained(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    assert saved["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)


def test_a_static_cache_marks_its_tensors_and_unmark_static_input_unmarks_them() -> None:
    model = LLAMA.causal_lm_class(LLAMA.tiny_config()).eval()
    cache = StaticCache(config=model.config, max_cache_len=8)
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]), past_key_values=cache)
    tensors = [layer.keys for layer in cache.layers] + [layer.values for layer in cache.layers]
    assert all(hasattr(tensor, "_dynamo_static_input_type") for tensor in tensors)
    for tensor in tensors:
        compat.unmark_static_input(tensor)
        compat.unmark_static_input(tensor)  # a second time is a no-op
    assert not any(hasattr(tensor, "_dynamo_static_input_type") for tensor in tensors)


def test_compile_on_every_device_lets_generate_compile_on_cpu() -> None:
    model = LLAMA.causal_lm_class(LLAMA.tiny_config()).eval()
    cache = StaticCache(config=model.config, max_cache_len=8)
    config = GenerationConfig(compile_config=CompileConfig())
    assert not model._valid_auto_compile_criteria({"past_key_values": cache}, config)  # CPU: not by default
    config.compile_config = compat.compile_on_every_device(CompileConfig())
    assert model._valid_auto_compile_criteria({"past_key_values": cache}, config)


def test_default_generation_params_names_the_generation_keys() -> None:
    params = compat.default_generation_params()
    assert {"max_length", "do_sample", "num_beams", "temperature"} <= set(params)
    assert "vocab_size" not in params
