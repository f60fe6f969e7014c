"""The building blocks that lmblocks' model families share: normalisation, rotary position embeddings, the
SwiGLU feed-forward and multi-head attention.

Each family keeps its own checkpoint names (`c_attn` for GPT-2, `query`/`key`/`value` for BERT, `q_proj`... for
LLaMA) by owning its projections; everything after the projections — splitting heads, rotary embeddings, the KV
cache, the attention kernel, merging heads — is written once here. The attention kernel is picked per call from
transformers' registry (`config._attn_implementation`: eager, sdpa, flash_attention_2, flex_attention, ...), with
`eager_attention_forward` below as the reference implementation.

Shapes in comments: B batch, T query length, S key length (cache included), nh heads, nkv key-value heads,
hs head size, C model width.
"""

from __future__ import annotations


import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers import PreTrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019): x / rms(x) · gain (+ bias, off by default).

    PyTorch's fused `rms_norm`: one kernel instead of the five ops of the written-out formula (a fifth of the
    elementwise time of a LLaMA layer on CPU), with the statistics in float32 whatever the input dtype — the mean of
    squares overflows or loses precision in fp16/bf16. In fp32 it gives transformers' `LlamaRMSNorm` to the bit.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        return hidden_states if self.bias is None else hidden_states + self.bias

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, bias={self.bias is not None}"


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (Su et al. 2021): returns the (cos, sin) tables for the given positions.

    The base model computes them once per forward and hands them to every layer. `config.rope_parameters` selects
    the variant (`default`, `linear`, `dynamic`, `yarn`, `llama3`, ... — whatever transformers' `ROPE_INIT_FUNCTIONS`
    provides); `dynamic_rope_update` recomputes the frequencies when a dynamic variant sees longer sequences.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = rope_init_fn(config)
        # Not persistent: derived from the config, so checkpoints do not carry it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: PreTrainedConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """inv_freq[i] = theta^(-2i / head_dim), the frequencies of the original RoPE."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32: positions times frequencies lose precision in half types for long sequences.
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates query (B, nh, T, hs) and key (B, nkv, T, hs) by the angles of their positions; cos/sin are (B, T, hs)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


class SwiGLUMLP(nn.Module):
    """Gated feed-forward (Shazeer 2020): down(act(gate(x)) · up(x)), with act = SiLU for SwiGLU."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, S, hs) -> (B, nkv·n_rep, S, hs): each key-value head serves n_rep query heads (grouped-query attention)."""
    if n_rep == 1:
        return hidden_states
    batch, num_key_value_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ·scaling + mask) · v, written out. Returns the output as (B, T, nh, hs) and the weights.

    Grouped-query attention without copying the keys and values: the n_rep query heads that share a key-value head
    are multiplied with it as one matrix of n_rep·T rows, (B, nkv, n_rep·T, hs) — the same products as `repeat_kv`'s
    (B, nh, T, hs) against n_rep copies, without writing the copies. A decoding step against a static cache copied
    the whole cache n_rep times per layer: in a profile of SmolLM2-135M's compiled int8 step (3 query heads per
    key-value head, one CPU thread), the kernels making those copies took about a fifth of the step."""
    batch, heads, seq_len, head_dim = query.shape
    groups, n_rep, kv_len = key.shape[1], module.num_key_value_groups, key.shape[2]
    grouped_query = query.reshape(batch, groups, n_rep * seq_len, head_dim)  # head h = group h // n_rep, as repeat_kv
    attn_weights = torch.matmul(grouped_query, key.transpose(2, 3)) * scaling  # (B, nkv, n_rep·T, S)
    attn_weights = attn_weights.view(batch, heads, seq_len, kv_len)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask  # additive: 0 where allowed, dtype-min where masked
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights.view(batch, groups, n_rep * seq_len, kv_len), value)
    return attn_output.view(batch, heads, seq_len, head_dim).transpose(1, 2).contiguous(), attn_weights


def preferred_attention(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """"eager" where PyTorch's fused attention (sdpa) is the slower kernel, None (transformers' default, sdpa)
    elsewhere: in bf16 on a CPU it is. Measured on a 2-core AVX512-BF16 EPYC, 2026-12-06: its backward pass takes
    4.5× as long in bf16 as in fp32 (a SmolLM2 LoRA step 2.44 s against 1.83 s with eager attention), and in a
    compiled bf16 SmolLM2 decoding step it took 7.8 of 36 ms against 2.7 in fp32 (eager: 28.3 against 37.1 ms a
    token). In fp32 the two kernels are even."""
    return "eager" if torch.device(device).type == "cpu" and dtype == torch.bfloat16 else None

class MultiHeadAttention(nn.Module):
    """Self-attention shared by every family: projections → heads → RoPE → KV cache → kernel → merged heads → output.

    A family's attention module subclasses this, creates its projections under its checkpoint's names and says how
    to use them in two hooks: `project_qkv` (hidden states → q, k, v as (B, T, heads·hs)) and `project_output`.
    `forward` itself holds the lookup in transformers' `ALL_ATTENTION_FUNCTIONS` and the kernel call: serving engines
    (vLLM's Transformers backend) read the attention module's `forward` source to find exactly that. The attributes
    set here are the ones transformers' kernels read from `module` (`is_causal`, `num_key_value_groups`, `scaling`).
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        layer_idx: int,
        num_heads: int,
        num_key_value_heads: int,
        head_dim: int,
        dropout: float,
        is_causal: bool,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = num_heads // num_key_value_heads
        self.head_dim = head_dim
        self.scaling = head_dim**-0.5
        self.attention_dropout = dropout
        self.is_causal = is_causal

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q (B, T, nh·hs), k and v (B, T, nkv·hs)."""
        raise NotImplementedError

    def project_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        """(B, T, nh·hs) -> (B, T, C); the identity where the output projection lives outside (BERT)."""
        return attn_output

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden states (B, T, C) -> output (B, T, C) and the attention weights (eager kernel only)."""
        batch, seq_len = hidden_states.shape[:2]
        query, key, value = self.project_qkv(hidden_states)
        query = query.view(batch, seq_len, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        key = key.view(batch, seq_len, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        value = value.view(batch, seq_len, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)

        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # (B, nkv, S, hs)

        # Looked up and called here, in `forward` itself: vLLM's Transformers backend finds attention by parsing this.
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, seq_len, -1).contiguous()  # (B, T, nh·hs)
        return self.project_output(attn_output), attn_weights


def check_cache_capacity(past_key_values: Cache | None, new_tokens: int) -> None:
    """Raises a clear error when `new_tokens` more tokens do not fit a fixed-size cache (`StaticCache`).

    A static cache writes each token at its position in a preallocated buffer; past its end the write fails deep in
    `index_copy_` on CPU and as a device-side assert on GPU. The cache's position counter is a tensor on the cache's
    device: it is read only where that costs no device sync (a Python int, or a CPU tensor) and never while compiling,
    so decoding on an accelerator never stalls on this check.
    """
    if past_key_values is None or torch.compiler.is_compiling():
        return
    max_length = past_key_values.get_max_length(0)  # -1 for caches that grow
    if max_length < 0:
        return
    cached = past_key_values.get_seq_length()
    if torch.is_tensor(cached):
        if cached.device.type != "cpu":
            return
        cached = int(cached)
    if cached + new_tokens > max_length:
        raise ValueError(
            f"The sequence does not fit the {type(past_key_values).__name__}: {cached} cached + {new_tokens} new "
            f"tokens = {cached + new_tokens} > max_cache_len={max_length}. Create the cache with a larger "
            f"max_cache_len (or generate with a larger max_length)."
        )


def last_token_index(
    input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad_token_id: int | None, device: torch.device
) -> torch.Tensor | int:
    """Index of each row's last real token, where a causal model has seen the whole sequence: from the attention mask
    if given, else the last non-pad token, which handles left and right padding alike. Without either, every row is
    taken as full length (-1), right for unpadded batches."""
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = torch.arange(attention_mask.shape[-1], device=device)
        return (positions * attention_mask.to(device, torch.long)).argmax(-1)
    if input_ids is not None and pad_token_id is not None:
        positions = torch.arange(input_ids.shape[-1], device=device)
        return (positions * (input_ids != pad_token_id).to(device, torch.long)).argmax(-1)
    return -1


def check_model_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> None:
    """One clear error for inputs a base model cannot take: neither or both of input_ids / inputs_embeds, or the
    wrong number of dimensions (a missing batch axis is the usual mistake)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}.")
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise ValueError(
            f"inputs_embeds must have shape (batch, sequence, hidden_size), got {tuple(inputs_embeds.shape)}."
        )


__all__ = [
    "check_model_inputs",
    "last_token_index",
    "check_cache_capacity",
    "RMSNorm",
    "RotaryEmbedding",
    "rotate_half",
    "apply_rotary_pos_emb",
    "SwiGLUMLP",
    "repeat_kv",
    "eager_attention_forward",
    "MultiHeadAttention",
]
