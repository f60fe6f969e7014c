"""LLaMA-specific tests: parity with transformers' own `LlamaForCausalLM`, checkpoints (Hub layout and Meta's original
layout), the tensor-parallel plan, and a clear error for every input that cannot be honoured.

Parity runs both models on the same weights: lmblocks' parameter names are transformers', so the state dict copies
over as it is. Weights are drawn wider than the default init (and the RMSNorm gains randomised), so that a wrong
head split, RoPE layout or key-value grouping shows up as a large difference rather than drowning in near-zero logits.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.testing_utils import slow

import lmblocks  # noqa: F401  (registers the Auto classes)
from lmblocks import LmbLlamaConfig, LmbLlamaForCausalLM, LmbLlamaForSequenceClassification, LmbLlamaModel

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.1,
)
ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    # max_position_embeddings is lowered to 16 for "dynamic", so the 24-token inputs below trigger the rescaling.
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}
ATTENTION = ["eager", "sdpa"]
KV_HEADS = {"mha": 4, "gqa": 2}  # 4 query heads: plain multi-head attention, or 2 query heads per key-value head


def _kwargs(kv: str, rope: str, **overrides) -> dict:
    kwargs = {**TINY, "num_key_value_heads": KV_HEADS[kv], "rope_parameters": copy.deepcopy(ROPE[rope])}
    if rope == "dynamic":
        kwargs["max_position_embeddings"] = 16
    return {**kwargs, **overrides}


def make_pair(attn: str = "sdpa", kv: str = "gqa", rope: str = "default", **overrides):
    """transformers' LlamaForCausalLM and lmblocks' LmbLlamaForCausalLM with identical weights, in eval mode."""
    torch.manual_seed(0)
    kwargs = _kwargs(kv, rope, **overrides)
    hf = LlamaForCausalLM(LlamaConfig(**kwargs, attn_implementation=attn)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    ours = LmbLlamaForCausalLM(LmbLlamaConfig(**copy.deepcopy(kwargs), attn_implementation=attn)).eval()
    ours.load_state_dict(hf.state_dict())
    assert ours.config._attn_implementation == hf.config._attn_implementation == attn
    return hf, ours


def batch(seq_len: int = 24, pad: int = 5):
    """Two rows; the second left-padded by `pad` tokens. Token ids avoid the pad id 0 and eos 2."""
    torch.manual_seed(1)
    input_ids = torch.randint(3, TINY["vocab_size"], (2, seq_len))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :pad] = 0
    attention_mask[1, :pad] = 0
    return input_ids, attention_mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers' LlamaForCausalLM


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("kv", list(KV_HEADS))
@pytest.mark.parametrize("rope", list(ROPE))
def test_logits_and_loss_match_transformers(attn, kv, rope):
    hf, ours = make_pair(attn, kv, rope)
    input_ids, attention_mask = batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        expected = hf(input_ids, attention_mask=attention_mask, labels=labels)
        actual = ours(input_ids, attention_mask=attention_mask, labels=labels)
    real = attention_mask.bool()  # padded query positions attend to nothing; their outputs are not used
    assert expected.logits.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert max_diff(actual.logits[real], expected.logits[real]) <= 1e-4
    assert abs(actual.loss.item() - expected.loss.item()) <= 1e-5


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("kv", list(KV_HEADS))
def test_greedy_tokens_match_transformers(cache, attn, kv):
    hf, ours = make_pair(attn, kv)
    input_ids, attention_mask = batch(seq_len=10, pad=3)
    settings = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12, cache_implementation=cache)
    expected = hf.generate(input_ids, attention_mask=attention_mask, **settings)
    actual = ours.generate(input_ids, attention_mask=attention_mask, **settings)
    assert actual.tolist() == expected.tolist()
    # And the cache changes nothing: the same tokens recomputing the whole prefix at every step.
    no_cache = ours.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, use_cache=False)
    assert no_cache.tolist() == expected.tolist()


@pytest.mark.parametrize("rope", ["linear", "dynamic", "llama3"])
def test_greedy_tokens_match_transformers_with_rope_scaling(rope):
    # "dynamic" with max_position_embeddings=16: generation runs past it, so the frequencies are rescaled mid-way.
    hf, ours = make_pair("sdpa", "gqa", rope)
    input_ids, attention_mask = batch(seq_len=10, pad=3)
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours.generate(input_ids, attention_mask=attention_mask, **settings).tolist() == \
        hf.generate(input_ids, attention_mask=attention_mask, **settings).tolist()


def test_variants_match_transformers():
    """Biases on the projections, tied embeddings, an explicit head_dim: the options LlamaConfig shares with us."""
    hf, ours = make_pair("eager", "gqa", attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    input_ids, attention_mask = batch()
    with torch.no_grad():
        assert max_diff(ours(input_ids).logits, hf(input_ids).logits) <= 1e-4


def test_base_model_and_cache_continuation_match_transformers():
    hf, ours = make_pair("sdpa", "gqa")
    input_ids, _ = batch(pad=0)
    with torch.no_grad():
        expected = hf.model(input_ids[:, :16]).last_hidden_state
        first = ours.model(input_ids[:, :16], use_cache=True)
        assert max_diff(first.last_hidden_state, expected) <= 1e-4
        # Continue from the returned cache: the same hidden states as one pass over the whole sequence.
        rest = ours.model(input_ids[:, 16:], past_key_values=first.past_key_values, use_cache=True)
        full = hf.model(input_ids).last_hidden_state
    assert max_diff(rest.last_hidden_state, full[:, 16:]) <= 1e-4


def test_rms_norm_bias_is_learnable_and_off_by_default():
    assert LmbLlamaModel(LmbLlamaConfig.from_preset("tiny")).norm.bias is None
    model = LmbLlamaForCausalLM(LmbLlamaConfig.from_preset("tiny", rms_norm_bias=True))
    names = {name for name, _ in model.named_parameters()}
    assert {"model.norm.bias", "model.layers.0.input_layernorm.bias"} <= names
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    assert model.model.norm.bias.grad is not None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_transformers_llama_folder_loads_and_exports_back(tmp_path):
    hf, _ = make_pair("sdpa", "gqa")
    hf.save_pretrained(tmp_path / "hf")
    input_ids, attention_mask = batch()
    with torch.no_grad():
        expected = hf(input_ids, attention_mask=attention_mask).logits

        ours = LmbLlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert ours.config.model_type == "lmb_llama"
        assert max_diff(ours(input_ids, attention_mask=attention_mask).logits, expected) <= 1e-4

        # Export: the same tensor names, and transformers' own class reads the folder back with the same logits.
        ours.save_pretrained(tmp_path / "ours")
        back = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert max_diff(back(input_ids, attention_mask=attention_mask).logits, expected) <= 1e-4
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert isinstance(reloaded, LmbLlamaForCausalLM)
        assert max_diff(reloaded(input_ids, attention_mask=attention_mask).logits, expected) <= 1e-4

    def keys(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return set(f.keys())

    assert keys(tmp_path / "ours") == keys(tmp_path / "hf")


def test_transformers_llama_config_json_translates():
    hf_config = LlamaConfig(**_kwargs("gqa", "linear"))
    config = LmbLlamaConfig.from_dict(hf_config.to_dict())
    for name in ("hidden_size", "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(config, name) == getattr(hf_config, name)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    # Legacy files (rope_theta / rope_scaling at the top level, as in Llama 2 / 3.1 config.json files).
    legacy = {**hf_config.to_dict(), "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}
    legacy.pop("rope_parameters")
    config = LmbLlamaConfig.from_dict(legacy)
    assert config.rope_parameters["rope_theta"] == 500000.0 and config.rope_parameters["factor"] == 4.0


def test_presets():
    assert set(LmbLlamaConfig.presets) >= {"llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama2-7b", "llama2-13b",
                                           "llama2-70b", "llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.1-70b",
                                           "tiny", "small"}
    # Parameter counts of the published models (embeddings and LM head included), from the shapes alone.
    expected_billions = {"llama-7b": 6.74, "llama-13b": 13.0, "llama-33b": 32.5, "llama-65b": 65.3,
                         "llama2-70b": 69.0, "llama3-8b": 8.03, "llama3-70b": 70.6}
    for name, billions in expected_billions.items():
        c = LmbLlamaConfig.from_preset(name)
        attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        per_layer = attn + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
        total = c.num_hidden_layers * per_layer + 2 * c.vocab_size * c.hidden_size + c.hidden_size
        assert math.isclose(total / 1e9, billions, rel_tol=0.01), (name, total)
    c = LmbLlamaConfig.from_preset("llama3.1-8b")
    assert c.rope_parameters["rope_type"] == "llama3" and c.max_position_embeddings == 131072
    # The preset table is not modified by building configs from it.
    LmbLlamaConfig.from_preset("llama3.1-8b", num_hidden_layers=1)
    assert LmbLlamaConfig.presets["llama3.1-8b"]["rope_parameters"]["rope_type"] == "llama3"


def _load_converter():
    spec = importlib.util.spec_from_file_location("convert_llama_meta", REPO_ROOT / "scripts" / "convert_llama_meta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _meta_reference_logits(meta: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's own forward pass (llama/model.py, written out): RoPE on *interleaved* pairs as complex rotations. An
    independent check that the converter's permutation goes the right way, not just that it inverts the test's."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv, head_dim, eps = params["n_kv_heads"], params["dim"] // params["n_heads"], params["norm_eps"]
    batch_size, seq_len = tokens.shape
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs_cis = torch.polar(torch.ones(seq_len, head_dim // 2), torch.outer(torch.arange(seq_len).float(), freqs))

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # (B, T, h, hs): pairs (0, 1), (2, 3), ... are complex numbers
        x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_complex * freqs_cis[None, :, None, :]).flatten(3)

    h = meta["tok_embeddings.weight"][tokens]
    mask = torch.full((seq_len, seq_len), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = {k.split(".", 2)[2]: v for k, v in meta.items() if k.startswith(f"layers.{i}.")}
        x = norm(h, p["attention_norm.weight"])
        q = rope((x @ p["attention.wq.weight"].T).view(batch_size, seq_len, n_heads, head_dim))
        k = rope((x @ p["attention.wk.weight"].T).view(batch_size, seq_len, n_kv, head_dim))
        v = (x @ p["attention.wv.weight"].T).view(batch_size, seq_len, n_kv, head_dim)
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim) + mask, dim=-1)
        h = h + ((scores @ v).transpose(1, 2).reshape(batch_size, seq_len, dim)) @ p["attention.wo.weight"].T
        x = norm(h, p["ffn_norm.weight"])
        gated = torch.nn.functional.silu(x @ p["feed_forward.w1.weight"].T) * (x @ p["feed_forward.w3.weight"].T)
        h = h + gated @ p["feed_forward.w2.weight"].T
    return norm(h, meta["norm.weight"]) @ meta["output.weight"].T


def test_convert_meta_checkpoint(tmp_path):
    """A fake two-shard Meta checkpoint made from a HF-layout model (names mapped back, q/k rows permuted to Meta's
    interleaved RoPE layout, weights split as Meta's model-parallel layers split them) converts back to that model."""
    converter = _load_converter()
    hf, _ = make_pair("eager", "gqa")
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    cfg = hf.config
    to_meta = {v: k for k, v in converter._LAYER_NAMES.items()}
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        for hf_name, meta_name in to_meta.items():
            tensor = sd[f"model.layers.{i}.{hf_name}"]
            if hf_name == "self_attn.q_proj.weight":
                tensor = converter.permute_to_meta(tensor, cfg.num_attention_heads)
            elif hf_name == "self_attn.k_proj.weight":
                tensor = converter.permute_to_meta(tensor, cfg.num_key_value_heads)
            meta[f"layers.{i}.{meta_name}"] = tensor
    meta["rope.freqs"] = torch.zeros(cfg.head_dim // 2)  # LLaMA 1 checkpoints carry this; it is dropped

    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": -1, "multiple_of": 32, "norm_eps": 1e-6,
              "rope_theta": 10000.0}
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    (meta_dir / "params.json").write_text(json.dumps(params))
    for rank in range(2):  # model-parallel shards, split along the dimension Meta's layer types split
        shard = {}
        for key, tensor in meta.items():
            if tensor.dim() == 1:
                shard[key] = tensor
            else:
                split_dim = 1 if key.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
                shard[key] = tensor.chunk(2, dim=split_dim)[rank].clone()
        torch.save(shard, meta_dir / f"consolidated.{rank:02d}.pth")

    converter.convert(meta_dir, tmp_path / "converted")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    assert isinstance(model, LmbLlamaForCausalLM)
    assert model.config.num_key_value_heads == 2 and model.config.intermediate_size == cfg.intermediate_size
    input_ids, _ = batch(pad=0)
    with torch.no_grad():
        expected = hf(input_ids).logits
        assert max_diff(model(input_ids).logits, expected) <= 1e-4
        assert max_diff(_meta_reference_logits(meta, params, input_ids), expected) <= 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Bad input: each a clear error


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=100, num_attention_heads=8), r"hidden_size \(100\) must be divisible by num_attention_heads \(8\)"),
        (dict(num_attention_heads=8, num_key_value_heads=3),
         r"num_attention_heads \(8\) must be divisible by num_key_value_heads \(3\)"),
        (dict(rope_parameters={"rope_type": "ntk-by-parts", "rope_theta": 10000.0}), r"Unknown rope_type 'ntk-by-parts'"),
        (dict(n_heads=8), r"unknown option\(s\) \['n_heads'\]"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        LmbLlamaConfig.from_preset("tiny", **kwargs)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="Available presets: .*llama2-7b"):
        LmbLlamaConfig.from_preset("llama-8b")


def test_sequence_past_static_cache_is_a_clear_error():
    _, ours = make_pair()
    input_ids, _ = batch(pad=0)
    cache = StaticCache(config=ours.config, max_cache_len=16)
    with torch.no_grad():
        ours(input_ids[:, :12], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"12 cached \+ 6 new tokens = 18 > max_cache_len=16"):
            ours(input_ids[:, 12:18], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"0 cached \+ 24 new tokens = 24 > max_cache_len=16"):
            ours(input_ids, past_key_values=StaticCache(config=ours.config, max_cache_len=16), use_cache=True)


def test_bad_inputs_are_clear_errors():
    model = LmbLlamaModel(LmbLlamaConfig.from_preset("tiny"))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.embed_tokens(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, sequence\), got \(1, 1, 3\)"):
        model(ids[None])


def test_sequence_classification_pools_the_last_real_token():
    torch.manual_seed(0)
    model = LmbLlamaForSequenceClassification(LmbLlamaConfig.from_preset("tiny", pad_token_id=0, num_labels=3)).eval()
    row = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        alone = model(row).logits
        right = model(torch.tensor([[5, 6, 7, 8, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]])).logits
        by_pad = model(torch.tensor([[5, 6, 7, 8, 0, 0]])).logits  # no mask: the last non-pad token
    assert max_diff(alone, right) <= 1e-5 and max_diff(alone, by_pad) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Tensor parallelism: 2 CPU processes on gloo


_TP_WORKER = textwrap.dedent(
    """
    import json, os, sys, warnings
    import torch
    import lmblocks
    from lmblocks import LmbLlamaForCausalLM

    folder, out = sys.argv[1], sys.argv[2]
    warnings.simplefilter("ignore", FutureWarning)  # tp_plan= is to move into DistributedConfig in a later release
    model = LmbLlamaForCausalLM.from_pretrained(folder, tp_plan="auto").eval()
    ref = torch.load(os.path.join(folder, "reference.pt"))
    q = model.model.layers[0].self_attn.q_proj.weight
    down = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        logits = model(ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    tokens = model.generate(ref["input_ids"], attention_mask=ref["attention_mask"], max_new_tokens=8,
                            min_new_tokens=8, do_sample=False)
    real = ref["attention_mask"].bool()
    result = {
        "world_size": torch.distributed.get_world_size(),
        "q_proj": [type(q).__name__, str(q.placements), list(q.to_local().shape), list(q.shape)],
        "down_proj": [type(down).__name__, str(down.placements), list(down.to_local().shape), list(down.shape)],
        "max_diff": (logits[real] - ref["logits"][real]).abs().max().item(),
        "tokens_match": tokens.tolist() == ref["tokens"].tolist(),
    }
    with open(f"{out}.{torch.distributed.get_rank()}.json", "w") as f:
        json.dump(result, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensor_parallel_from_pretrained_on_two_cpu_processes(tmp_path):
    """`from_pretrained(..., tp_plan="auto")` under torchrun, 2 processes on gloo: the config's base_model_tp_plan
    shards q/k/v/gate/up by rows and o/down by columns (DTensors), and the sharded model gives the logits and greedy
    tokens of the unsharded one. About 20-30 s, most of it process start-up."""
    _, ours = make_pair("sdpa", "gqa")
    input_ids, attention_mask = batch(seq_len=10, pad=3)
    with torch.no_grad():
        logits = ours(input_ids, attention_mask=attention_mask).logits
    tokens = ours.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, min_new_tokens=8,
                           do_sample=False)
    ours.save_pretrained(tmp_path)
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask, "logits": logits, "tokens": tokens},
               tmp_path / "reference.pt")
    worker = tmp_path / "tp_worker.py"
    worker.write_text(_TP_WORKER)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(worker), str(tmp_path), str(tmp_path / "result")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    for rank in range(2):
        result = json.loads((tmp_path / f"result.{rank}.json").read_text())
        assert result["world_size"] == 2
        # Column-parallel: each rank holds half of q_proj's output rows; row-parallel: half of down_proj's inputs.
        assert result["q_proj"] == ["DTensor", "(Shard(dim=0),)", [32, 64], [64, 64]]
        assert result["down_proj"] == ["DTensor", "(Shard(dim=1),)", [64, 48], [64, 96]]
        assert result["max_diff"] <= 1e-5
        assert result["tokens_match"]


def test_tp_and_pp_plans_name_real_modules():
    config = LmbLlamaConfig.from_preset("tiny")
    model = LmbLlamaModel(config)
    names = {name for name, _ in model.named_modules()}
    for pattern in config.base_model_tp_plan:
        assert pattern.replace("*", "0") in names, pattern
    for name in config.base_model_pp_plan:
        assert name in names
    assert AutoConfig.for_model("lmb_llama").base_model_tp_plan == LmbLlamaConfig.base_model_tp_plan


@slow
def test_compiled_static_cache_decoding_with_inductor():
    """The decoding step compiled for real (inductor, fullgraph) on a StaticCache gives generate's greedy tokens.
    About a minute of compilation on 2 CPU cores, hence RUN_SLOW=1; tests/test_generation.py traces the same path on
    every run with the "eager" backend."""
    _, ours = make_pair("sdpa", "gqa")
    input_ids, _ = batch(seq_len=6, pad=0)
    input_ids = input_ids[:1]
    expected = ours.generate(input_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             cache_implementation="static")
    cache = StaticCache(config=ours.config, max_cache_len=32)
    step = torch.compile(ours.forward, fullgraph=True)
    with torch.no_grad():
        token = ours(input_ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens = [token]
        for _ in range(7):
            token = step(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(token)
    assert torch.cat([input_ids, *tokens], dim=1).tolist() == expected.tolist()


@slow
def test_flex_attention_matches_transformers_and_eager():
    """flex_attention runs on CPU too, but compiles its kernel first (about 50 s on 2 cores), hence RUN_SLOW=1."""
    hf, ours = make_pair("flex_attention", "gqa")
    _, eager = make_pair("eager", "gqa")
    input_ids, _ = batch(pad=0)
    with torch.no_grad():
        actual = ours(input_ids).logits
        assert max_diff(actual, hf(input_ids).logits) <= 1e-4
        assert max_diff(actual, eager(input_ids).logits) <= 1e-4
