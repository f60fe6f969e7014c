"""Convert a LLaMA / Llama 2 / Llama 3 checkpoint in Meta's original layout to an lmblocks folder.

Meta's release folders hold `params.json` (the shape) and `consolidated.00.pth` ... `consolidated.NN.pth` (one shard
per model-parallel rank). Two things differ from the Hugging Face layout that lmblocks keeps:

* Names: `tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1` (gate) / `w3` (up) / `w2` (down),
  `attention_norm`, `ffn_norm`, `norm`, `output` -> `model.embed_tokens`, `model.layers.N.self_attn.q_proj`, ...
* RoPE layout: Meta rotates interleaved pairs of dimensions (0, 1), (2, 3), ... of each head, where the HF layout
  (`rotate_half`) rotates dimension i with i + head_dim/2. The two are the same model once the rows of `wq` and `wk`
  are permuted within each head: row 2i of Meta's head goes to row i, row 2i+1 to row i + head_dim/2.

Shards are joined along the dimension Meta's model-parallel layers split: column-parallel weights (wq, wk, wv, w1,
w3, output) along dim 0, row-parallel ones (wo, w2) along dim 1, the token embeddings along dim 1 in LLaMA 1/2 and
along the vocabulary (dim 0) in Llama 3; norms are replicated.

Usage:
    python scripts/convert_llama_meta.py --input-dir llama-2-7b --output-dir llama-2-7b-lmb
    python scripts/convert_llama_meta.py --input-dir Meta-Llama-3.1-8B --output-dir llama31-8b --max-position-embeddings 131072

The tokenizer (`tokenizer.model`) is copied next to the weights when present; convert it with transformers' tokenizer
tools separately.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch

# Meta's per-layer names -> lmblocks (= transformers' LlamaForCausalLM) names.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# Split along the input dimension by Meta's row-parallel layers; everything else that is split uses dim 0.
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def permute_from_meta(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a Meta `wq` / `wk` (interleaved RoPE pairs) -> HF layout (half-split pairs), head by head."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // num_heads
    # (nh, hs/2, 2, C) -> (nh, 2, hs/2, C): row 2i -> i, row 2i+1 -> i + hs/2
    return weight.view(num_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_to_meta(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `permute_from_meta`: HF layout -> Meta's interleaved layout (used to build test checkpoints)."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // num_heads
    return weight.view(num_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _merge_shards(shards: list[dict[str, torch.Tensor]], dim: int) -> dict[str, torch.Tensor]:
    """Join the model-parallel shards of Meta's checkpoint into full tensors."""
    merged = {}
    for key in shards[0]:
        parts = [shard[key] for shard in shards]
        if len(parts) == 1 or parts[0].dim() == 1:  # single shard, or a replicated norm
            merged[key] = parts[0]
        elif key.endswith(_ROW_PARALLEL):
            merged[key] = torch.cat(parts, dim=1)
        elif key == "tok_embeddings.weight":
            # LLaMA 1/2 split the embedding width (ParallelEmbedding), Llama 3 the vocabulary.
            merged[key] = torch.cat(parts, dim=0 if parts[0].shape[1] == dim else 1)
        else:
            merged[key] = torch.cat(parts, dim=0)
    return merged


def config_from_params(
    params: dict[str, Any],
    vocab_size: int,
    intermediate_size: int,
    max_position_embeddings: int | None = None,
    tie_word_embeddings: bool = False,
) -> dict[str, Any]:
    """`params.json` -> LmbLlamaConfig keyword arguments. Sizes Meta derives at run time (`vocab_size: -1`,
    `multiple_of`, `ffn_dim_multiplier`) are read off the tensors instead."""
    rope_theta = float(params.get("rope_theta", 10000.0))
    llama3 = vocab_size >= 128000
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    if params.get("use_scaled_rope"):  # Llama 3.1 and later
        rope_parameters = {"rope_type": "llama3", "rope_theta": rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if max_position_embeddings is None:
        # Context lengths of the releases: LLaMA 2k, Llama 2 4k (norm_eps 1e-5), Llama 3 8k, Llama 3.1 128k.
        if params.get("use_scaled_rope"):
            max_position_embeddings = 131072
        elif llama3:
            max_position_embeddings = 8192
        else:
            max_position_embeddings = 4096 if params.get("norm_eps", 1e-6) == 1e-5 else 2048
    return dict(
        vocab_size=vocab_size,
        hidden_size=params["dim"],
        intermediate_size=intermediate_size,
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        rms_norm_eps=params.get("norm_eps", 1e-6),
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope_parameters,
        bos_token_id=128000 if llama3 else 1,
        eos_token_id=128001 if llama3 else 2,
        tie_word_embeddings=tie_word_embeddings,
    )


def convert_state_dict(meta: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Meta names and RoPE layout -> lmblocks' state dict."""
    num_heads = params["n_heads"]
    num_kv_heads = params.get("n_kv_heads") or num_heads
    converted = {}
    for key, tensor in meta.items():
        if key == "rope.freqs":  # LLaMA 1 stores its RoPE table; lmblocks recomputes it from the config
            continue
        if key in _GLOBAL_NAMES:
            converted[_GLOBAL_NAMES[key]] = tensor
            continue
        prefix, index, name = key.split(".", 2)
        if prefix != "layers" or name not in _LAYER_NAMES:
            raise ValueError(f"Unexpected tensor {key!r} in the Meta checkpoint.")
        if name == "attention.wq.weight":
            tensor = permute_from_meta(tensor, num_heads)
        elif name == "attention.wk.weight":
            tensor = permute_from_meta(tensor, num_kv_heads)
        converted[f"model.layers.{index}.{_LAYER_NAMES[name]}"] = tensor
    return converted


def convert(
    input_dir: str | Path,
    output_dir: str | Path,
    max_position_embeddings: int | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Convert the Meta checkpoint in `input_dir` and write an lmblocks folder (config.json + safetensors) to
    `output_dir`, loadable with `LmbLlamaForCausalLM.from_pretrained` (or `AutoModelForCausalLM` once lmblocks is
    imported). Returns `output_dir`."""
    from lmblocks import LmbLlamaConfig, LmbLlamaForCausalLM

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    params = json.loads((input_dir / "params.json").read_text())
    shard_paths = sorted(input_dir.glob("consolidated.*.pth"))
    if not shard_paths:
        raise FileNotFoundError(f"No consolidated.*.pth in {input_dir}.")
    shards = [torch.load(path, map_location="cpu", weights_only=True) for path in shard_paths]
    meta = _merge_shards(shards, params["dim"])
    del shards

    state_dict = convert_state_dict(meta, params)
    config = LmbLlamaConfig(
        **config_from_params(
            params,
            vocab_size=state_dict["model.embed_tokens.weight"].shape[0],
            intermediate_size=state_dict["model.layers.0.mlp.gate_proj.weight"].shape[0],
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings="lm_head.weight" not in state_dict,  # no `output.weight`: tied to the embeddings
        )
    )
    dtype = state_dict["model.embed_tokens.weight"].dtype
    config.dtype = dtype
    # Build on the meta device and take the tensors over as they are: no random init, no second copy in memory.
    with torch.device("meta"):
        model = LmbLlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"Checkpoint does not match the config: missing {missing}, unexpected {unexpected}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    # The RoPE frequencies are non-persistent buffers, still on the meta device: recompute them from the config.
    rotary = model.model.rotary_emb
    fresh = type(rotary)(config)
    rotary.inv_freq, rotary.original_inv_freq = fresh.inv_freq, fresh.original_inv_freq
    from lmblocks.training import staged_directory

    # Staged: config.json lands last, so an interrupted conversion never leaves a folder that looks complete.
    with staged_directory(output_dir) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if (input_dir / "tokenizer.model").exists():
            shutil.copy(input_dir / "tokenizer.model", staging / "tokenizer.model")
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-dir", required=True, help="folder with params.json and consolidated.*.pth")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-position-embeddings", type=int, default=None,
                        help="context length (default: that of the release, guessed from params.json)")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    input_dir = Path(args.input_dir)
    if not (input_dir / "params.json").is_file() or not list(input_dir.glob("consolidated.*.pth")):
        parser.error(f"{input_dir} is not a Meta LLaMA release folder: it needs params.json and "
                     "consolidated.00.pth ... (one file per model-parallel shard).")
    out = convert(args.input_dir, args.output_dir, args.max_position_embeddings, args.max_shard_size)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
