"""Qwen2 (lmblocks.modeling_qwen2) against transformers' Qwen2ForCausalLM: the Hub's config.json files, the official
tensor names, the same logits and greedy tokens from the same weights in both directions (transformers' folder ->
lmblocks, lmblocks' state dict -> transformers), with and without sliding-window layers.

The shared behaviours (generation, Trainer, peft LoRA without target_modules, remote code without lmblocks, gradient
accumulation) run for Qwen2 through tests/families.py; transformers' common tests in tests/test_qwen2_common.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from lmblocks import LmbQwen2Config, LmbQwen2ForCausalLM

FIXTURES = Path(__file__).parent / "fixtures" / "hub_configs"
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            initializer_range=0.1, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
# Layers 1 and 2 attend to the last 4 tokens only: inputs of 12 tokens and more see the window.
WINDOW = dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial biases and norm gains: transformers initialises them to 0 and 1, which would hide a missing one."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                param.copy_(float(name.endswith("norm.weight")) + 0.2 * torch.randn_like(param))


def make_pair(direction: str, window: bool, tmp_path: Path, attn: str = "sdpa"):
    """transformers' Qwen2ForCausalLM and LmbQwen2ForCausalLM with the same weights, in eval mode."""
    kwargs = {**TINY, **(WINDOW if window else {}), "attn_implementation": attn}
    torch.manual_seed(0)
    if direction == "transformers_folder":
        hf = Qwen2ForCausalLM(Qwen2Config(**kwargs))
        _randomise(hf)
        hf.save_pretrained(tmp_path)
        ours, info = LmbQwen2ForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation=attn)
        assert not any(info.values()), info
    else:  # lmblocks' state dict into transformers' class
        ours = LmbQwen2ForCausalLM(LmbQwen2Config(**kwargs))
        _randomise(ours)
        hf = Qwen2ForCausalLM(Qwen2Config(**kwargs))
        hf.load_state_dict(ours.state_dict(), strict=True)
    assert ours.config.layer_types == hf.config.layer_types and ours.config.sliding_window == hf.config.sliding_window
    return hf.eval(), ours.eval()


def batch(seq_len: int = 14, pad: int = 3):
    torch.manual_seed(1)
    input_ids = torch.randint(3, TINY["vocab_size"], (2, seq_len))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :pad], attention_mask[1, :pad] = 0, 0
    return input_ids, attention_mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [False, True], ids=["full", "sliding"])
@pytest.mark.parametrize("direction", ["transformers_folder", "lmblocks_state_dict"])
def test_logits_and_greedy_tokens_match_transformers(direction, window, attn, tmp_path):
    hf, ours = make_pair(direction, window, tmp_path, attn)
    input_ids, attention_mask = batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        expected = hf(input_ids, attention_mask=attention_mask, labels=labels)
        actual = ours(input_ids, attention_mask=attention_mask, labels=labels)
    real = attention_mask.bool()
    assert expected.logits.abs().max() > 1.0
    torch.testing.assert_close(actual.logits[real], expected.logits[real], rtol=0, atol=1e-5)
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-5
    for cache in ("dynamic", "static"):
        settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, cache_implementation=cache)
        assert ours.generate(input_ids, attention_mask=attention_mask, **settings).tolist() == \
            hf.generate(input_ids, attention_mask=attention_mask, **settings).tolist(), cache


def test_sliding_window_changes_what_layers_see(tmp_path):
    """The parity above means something for the window: with it, the logits of long inputs differ from without."""
    _, windowed = make_pair("lmblocks_state_dict", True, tmp_path)
    full = LmbQwen2ForCausalLM(LmbQwen2Config(**TINY)).eval()
    full.load_state_dict(windowed.state_dict())
    input_ids, _ = batch()
    with torch.no_grad():
        short, long = (torch.equal(windowed(input_ids[:, :n]).logits, full(input_ids[:, :n]).logits) for n in (4, 14))
    assert short and not long
    assert windowed.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert windowed.model.layers[1].sliding_window == 4 and windowed.model.layers[0].sliding_window is None


@pytest.mark.parametrize("name", ["Qwen2.5-0.5B.json", "Qwen2.5-1.5B.json", "DeepSeek-R1-Distill-Qwen-1.5B.json"])
def test_hub_config_reads_as_transformers_reads_it_and_builds_the_official_tensors(name, tmp_path):
    (tmp_path / "config.json").write_text((FIXTURES / name).read_text())
    ours, theirs = LmbQwen2Config.from_pretrained(tmp_path), Qwen2Config.from_pretrained(tmp_path)
    assert ours.model_type == "lmb_qwen2" and ours.use_sliding_window is False
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "rope_parameters", "sliding_window", "layer_types", "bos_token_id", "eos_token_id"):
        assert getattr(ours, key) == getattr(theirs, key), key
    with torch.device("meta"):
        ours_model, their_model = LmbQwen2ForCausalLM(ours), Qwen2ForCausalLM(theirs)
    shapes = lambda model: {key: tuple(t.shape) for key, t in model.state_dict().items()}  # noqa: E731
    assert shapes(ours_model) == shapes(their_model)
    assert ours_model.model.layers[0].self_attn.q_proj.bias is not None
    assert ours_model.model.layers[0].self_attn.o_proj.bias is None
    tied = ours_model.lm_head.weight is ours_model.model.embed_tokens.weight
    assert tied == ours.tie_word_embeddings == (their_model.lm_head.weight is their_model.model.embed_tokens.weight)
    if name == "Qwen2.5-0.5B.json":  # Qwen's published parameter count, embeddings tied
        assert sum(p.numel() for p in ours_model.parameters()) == 494_032_768


@pytest.mark.parametrize("preset, name", [("0.5B", "Qwen2.5-0.5B.json"), ("1.5B", "Qwen2.5-1.5B.json")])
def test_presets_are_the_hub_configs(preset, name):
    hub = LmbQwen2Config.from_dict(json.loads((FIXTURES / name).read_text()))
    config = LmbQwen2Config.from_preset(preset)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "rope_parameters", "max_window_layers", "bos_token_id", "eos_token_id", "layer_types"):
        assert getattr(config, key) == getattr(hub, key), key


@pytest.mark.parametrize("kwargs, message", [
    (dict(use_sliding_window=True, sliding_window=None), "positive sliding_window"),
    (dict(use_sliding_window=True, sliding_window=0), "positive sliding_window"),
    (dict(num_hidden_layers=2, layer_types=["full_attention", "chunked_attention"]), "layer_types may name only"),
])
def test_window_settings_that_cannot_be_honoured_are_clear_errors(kwargs, message):
    with pytest.raises(Exception, match=message):
        LmbQwen2Config(**{**TINY, **kwargs}).validate()
