"""Export an lmblocks decoder to a GGUF file for llama.cpp (and transformers' own GGUF loader), with the `gguf`
package: architecture, hyper-parameters, tensors (f32, f16, bf16 or q8_0) and the tokenizer.

Nothing here names a family. Each decoder's modeling file says, in `GGUF_EXPORT`, llama.cpp's architecture, which
config field gives each hyper-parameter, the options llama.cpp computes only one way, and the tensors whose layout
differs (LLaMA's q/k rows: llama.cpp rotates interleaved pairs where transformers rotates the two halves). Tensor
names come from `gguf`'s own map for that architecture, which knows the official checkpoint names lmblocks keeps.

The tokenizer is read from its `tokenizers` model, not from the family:
- byte-level BPE (the gpt2 kind): `tokenizer.ggml.model = "gpt2"`, the tokens, their types and the merges, which
  llama.cpp's BPE applies by rank exactly as `tokenizers` does.
- BPE on `▁`-marked text with byte fallback (the llama kind, a SentencePiece-style BPE with no SentencePiece model):
  `tokenizer.ggml.model = "llama"`, which llama.cpp runs as SentencePiece does, merging the adjacent pair whose
  joined text is the vocabulary token of highest score. Each token's score is minus the rank of the merge that
  creates it, so llama.cpp meets the merges in the BPE's order (the `-1000` placeholder llama.cpp's own converter
  gives a vocabulary with no scores leaves it no order at all). llama.cpp's "gpt2" BPE cannot run this vocabulary:
  it maps text to GPT-2's byte alphabet before merging and knows no `▁`, no byte fallback, no prefix space. The
  merges are written too: transformers' GGUF loader rebuilds the exact BPE from them (llama.cpp's SentencePiece
  tokenizer ignores them).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from .export import ExportError
from .cpu_kernels import cpu_flags

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def gguf_table(model: PreTrainedModel) -> dict[str, Any]:
    """The family's `GGUF_EXPORT` table, from the modeling file of its registered classes."""
    import importlib

    from .families import FAMILY_OF_MODEL_TYPE

    spec = FAMILY_OF_MODEL_TYPE.get(model.config.model_type)
    if spec is None:
        raise ExportError(f"{model.config.model_type!r} is not an lmblocks model type.")
    table = getattr(importlib.import_module(spec.base_class.__module__), "GGUF_EXPORT", None)
    if table is None:
        raise ExportError(f"The {spec.name} family has no GGUF export (GGUF_EXPORT in {spec.base_class.__module__}); "
                          "GGUF holds decoders for llama.cpp.")
    return table


def _config_value(config, path: str) -> Any:
    """`config.a` or, for `a.b`, `config.a["b"]`."""
    head, _, rest = path.partition(".")
    value = getattr(config, head)
    return value.get(rest) if rest else value


def check_gguf_supported(model: PreTrainedModel) -> dict[str, Any]:
    """The table, after checking the options llama.cpp computes only one way (`required`: field -> allowed values)."""
    table = gguf_table(model)
    if not model.can_generate():
        raise ExportError(f"{type(model).__name__} is not a causal language model; GGUF export takes the family's "
                          "causal-LM class.")
    for path, allowed in table.get("required", {}).items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        value = _config_value(model.config, path)
        if value not in allowed:
            raise ExportError(f"{path}={value!r}: llama.cpp's {table['architecture']} computes only "
                              f"{' or '.join(map(repr, allowed))}, so this model cannot be exported to GGUF.")
    return table


# --- tensors ------------------------------------------------------------------------------------------------------

def _rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a q/k projection's rows from rotate-half pairs (i, i + d/2) to llama.cpp's interleaved (2i, 2i + 1),
    per head; transformers' GGUF loader undoes it."""
    rows, *rest = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def _tensor_type(name: str, array: np.ndarray, outtype: str):
    """llama.cpp's convention: 1-D tensors (norms, biases) stay f32; q8_0 needs rows in blocks of 32 (else f16)."""
    from gguf import GGMLQuantizationType as Q

    if outtype == "f32" or array.ndim == 1:
        return Q.F32
    if outtype == "q8_0":
        return Q.Q8_0 if array.shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[outtype]


def _encode(array: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == Q.F32:
        return array.astype(np.float32)
    if qtype == Q.F16:
        return array.astype(np.float16)
    return quants.quantize(array.astype(np.float32), qtype)


def gguf_tensors(model: PreTrainedModel, table: dict[str, Any]) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names and layout, as fp32 arrays (a tied LM head is left out: llama.cpp
    reads the token embeddings in its place)."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, table["architecture"].upper())
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    tied = set(model.all_tied_weights_keys or {}) if model.config.tie_word_embeddings else set()
    transforms = table.get("tensor_transforms", {})
    out = {}
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{name} has no GGUF name in llama.cpp's {table['architecture']} architecture.")
        tensor = tensor.detach().float()
        for suffix, (operation, config_field) in transforms.items():
            if name.endswith(suffix):
                assert operation == "rope_rows", operation
                tensor = _rope_rows(tensor, getattr(model.config, config_field))
        out[gguf_name] = tensor.contiguous().numpy()
    return out


# --- tokenizer ----------------------------------------------------------------------------------------------------

def _bpe_parts(tokenizer) -> tuple[dict, list[str]]:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"The tokenizer is a {model.get('type')} model; GGUF export takes a BPE tokenizer.")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return state, merges


# The two pre-tokenisers llama.cpp reproduces, as `tokenizers` writes them: GPT-2's regex split into its byte
# alphabet (llama.cpp's "gpt2" model with the "gpt-2" pre-tokeniser), and SentencePiece's `▁` with one prefixed at
# the start (its "llama" model with `add_space_prefix`).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_METASPACE = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}


def _matches(pre_tokenizer: dict | None, expected: dict) -> bool:
    return pre_tokenizer is not None and all(pre_tokenizer.get(key) == value for key, value in expected.items())


def add_tokenizer(writer, tokenizer, vocab_size: int) -> str:
    """Write the tokenizer metadata; returns llama.cpp's tokenizer model ("gpt2" or "llama")."""
    from gguf import TokenType

    state, merges = _bpe_parts(tokenizer)
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(f"The tokenizer has {len(vocab)} tokens, more than the model's {vocab_size} embeddings.")
    by_id = {index: token for token, index in vocab.items()}
    # Added tokens are matched in raw text before the BPE, by llama.cpp as by `tokenizers`: special ones as CONTROL
    # (e.g. SmolLM2's <file_sep>, which all_special_tokens leaves out), the others as USER_DEFINED, as llama.cpp's
    # own converter marks them.
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    special = set(tokenizer.all_special_tokens) | {content for content, is_special in added.items() if is_special}
    byte_level = _matches(state.get("pre_tokenizer"), _BYTE_LEVEL)
    sentencepiece_style = _matches(state.get("pre_tokenizer"), _METASPACE) and state["model"].get("byte_fallback")
    if state.get("normalizer") is not None or not (byte_level or sentencepiece_style):
        raise ExportError(f"The tokenizer (pre-tokenizer {json.dumps(state.get('pre_tokenizer'))}, normalizer "
                          f"{json.dumps(state.get('normalizer'))}) is neither a byte-level BPE with GPT-2's split (the "
                          "gpt2 kind) nor a BPE on ▁-marked text with byte fallback (the llama kind): llama.cpp would "
                          "split text differently.")
    # A token's score: minus the rank of the merge that creates it (see the module docstring).
    rank_of = {left + right: rank for rank, (left, right) in
               ((rank, merge.split(" ", 1)) for rank, merge in enumerate(merges))}
    tokens, scores, types = [], [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:  # rows of the embedding beyond the tokenizer, as llama.cpp's converter names them
            tokens.append(f"[PAD{index}]")
            scores.append(-1e6)
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        scores.append(-float(rank_of[token]) if token in rank_of else 0.0)
        if token in special:
            types.append(TokenType.UNKNOWN if token == tokenizer.unk_token and not byte_level else TokenType.CONTROL)
        elif token in added:
            types.append(TokenType.USER_DEFINED)
        elif not byte_level and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    kind = "gpt2" if byte_level else "llama"
    writer.add_tokenizer_model(kind)
    if byte_level:
        writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    if not byte_level:
        writer.add_add_space_prefix(True)  # Metaspace's prepend_scheme "first"
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return kind


# --- the file -----------------------------------------------------------------------------------------------------

def export_to_gguf(
    model: PreTrainedModel, tokenizer, path: str | os.PathLike, outtype: str = "f16", name: str | None = None
) -> Path:
    """Write `model` (an lmblocks causal LM) and its tokenizer as one GGUF file at `path`."""
    import gguf

    if outtype not in OUTTYPES:
        raise ExportError(f"Unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}.")
    table = check_gguf_supported(model)
    config = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), table["architecture"])
    writer.add_name(name or path.stem)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    arch = table["architecture"]
    for key, source in table["hyperparameters"].items():
        value = _config_value(config, source)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ExportError(f"{source}={value!r} cannot be written as {arch}.{key}.")
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f"{arch}.{key}", value)
    if tokenizer is not None:
        add_tokenizer(writer, tokenizer, config.vocab_size)
    for gguf_name, array in gguf_tensors(model, table).items():
        qtype = _tensor_type(gguf_name, array, outtype)
        writer.add_tensor(gguf_name, _encode(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- running it -----------------------------------------------------------------------------------------------------

def cpu_has_amx() -> bool:
    """Whether /proc/cpuinfo lists AMX (Linux; False elsewhere)."""
    return any(flag.startswith("amx_") for flag in cpu_flags())


def llama_cpp_model(path: str | os.PathLike, *, extra_buffer_types: bool | None = None, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)` (llama-cpp-python, `make llama-cpp-env`).

    `extra_buffer_types` is llama.cpp's `use_extra_bufts` (weights repacked for AMX or wider CPU kernels). Default:
    off on CPUs that list AMX, where inside some virtual machines the AMX kernels die with SIGILL although the flag
    is listed; on elsewhere. llama-cpp-python takes no such argument, so its default model parameters are patched
    for the time of the load."""
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    if extra_buffer_types is None:
        extra_buffer_types = not cpu_has_amx()
    kwargs.setdefault("verbose", False)
    defaults = low_level.llama_model_default_params

    def params():
        value = defaults()
        if hasattr(value, "use_extra_bufts"):
            value.use_extra_bufts = extra_buffer_types
        return value

    low_level.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        low_level.llama_model_default_params = defaults


__all__ = ["OUTTYPES", "gguf_table", "check_gguf_supported", "gguf_tensors", "add_tokenizer", "export_to_gguf",
           "cpu_has_amx", "llama_cpp_model"]
