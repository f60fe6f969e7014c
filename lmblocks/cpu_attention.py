"""Attention for decoding on CPU that reads only the cache positions the mask lets a query see.

A compiled decoding step keeps its KV cache in a static buffer (`lmblocks.decoding`: 256 positions, then 512, ...)
and attends over all of it, the positions not written yet masked out: every token reads the whole buffer, whatever
the length so far. And grouped-query attention, as transformers writes it, first copies each key-value head once per
query head that shares it (`repeat_kv`). This kernel, per query row, skips every position its mask excludes — keys
and values of those positions are never read — and reads each key-value head in place for the query heads of its
group. Exact: a masked position adds exp(-inf) = 0 to the softmax either way. SmolLM2-135M's compiled int8 step (3
query heads per key-value head, a 256-position cache, a 39-token prompt and 64 new tokens, one CPU thread) took 9.9
against 12.3 ms a token with transformers' sdpa (interleaved in one process, 2026-12-07), the same tokens.

`cpu_decoding_attention` is registered as transformers attention implementation `CPU_DECODING_ATTENTION` (with
sdpa's boolean masks): float32 and bfloat16 queries of up to `SHORT_QUERY` positions on a CPU (decoding steps) use
the kernel, and every other call — prompts, other dtypes and devices, training with dropout — transformers' sdpa. A
row whose mask excludes every position gets zeros (sdpa's math gives NaN there).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cpu_kernels import builds, load_operators

CPU_DECODING_ATTENTION = "lmblocks_cpu_decoding"  # the attention implementation's name in transformers' registries
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # bfloat16 summed in float32, as sdpa does
SHORT_QUERY = 16  # query positions up to which the kernel runs (one for decoding; a few for speculative steps)

SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr int LANES = 16;  // partial sums kept apart so that the compiler vectorizes a dot product

template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  float partial[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int lane = 0; lane < LANES; ++lane) partial[lane] += a[i + lane] * static_cast<float>(b[i + lane]);
  float total = 0.f;
  for (; i < n; ++i) total += a[i] * static_cast<float>(b[i]);
  for (int lane = 0; lane < LANES; ++lane) total += partial[lane];
  return total;
}

// query (B, H, T, D), key and value (B, G, S, D) with H a multiple of G (query head h reads key-value head
// h / (H / G)), mask broadcastable to (B, H, T, S): bool (true: attend) or float (added; -inf: skipped).
// Writes out (B, T, H, D), the layout transformers' attention functions return. T: float or BFloat16, summed in float.
template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m, bool bool_mask,
            float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), T_len = q.size(2), D = q.size(3), G = k.size(1), S = k.size(2);
  const T *q_data = q.const_data_ptr<T>(), *k_data = k.const_data_ptr<T>(), *v_data = v.const_data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const int64_t rep = H / G, mask_step = m.defined() ? m.stride(3) : 0;
  // One task per (batch, head, query position); neighbouring heads share a key-value head, still in cache.
  at::parallel_for(0, B * H * T_len, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S), q_row(D), o(D);
    std::vector<int64_t> seen(S);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (H * T_len), h = row / T_len % H, t = row % T_len;
      for (int64_t d = 0; d < D; ++d) q_row[d] = static_cast<float>(q_data[row * D + d]);
      const T* k_head = k_data + (b * G + h / rep) * S * D;
      const T* v_head = v_data + (b * G + h / rep) * S * D;
      const int64_t mask_row = m.defined() ? b * m.stride(0) + h * m.stride(1) + t * m.stride(2) : 0;
      const bool* allowed = m.defined() && bool_mask ? m.const_data_ptr<bool>() + mask_row : nullptr;
      const float* bias = m.defined() && !bool_mask ? m.const_data_ptr<float>() + mask_row : nullptr;
      int64_t count = 0;
      float highest = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < S; ++s) {
        float added = 0.f;
        if (allowed != nullptr && !allowed[s * mask_step]) continue;
        if (bias != nullptr) {
          added = bias[s * mask_step];
          if (added == -std::numeric_limits<float>::infinity()) continue;
        }
        const float score = dot(q_row.data(), k_head + s * D, D) * scale + added;
        scores[count] = score;
        seen[count++] = s;
        highest = std::max(highest, score);
      }
      std::fill(o.begin(), o.end(), 0.f);
      float total = 0.f;
      for (int64_t i = 0; i < count; ++i) {
        const float p = std::exp(scores[i] - highest);
        total += p;
        const T* v_row = v_head + seen[i] * D;
        for (int64_t d = 0; d < D; ++d) o[d] += p * static_cast<float>(v_row[d]);
      }
      const float inverse = count > 0 ? 1.f / total : 0.f;  // a row that sees nothing: zeros
      T* o_row = out_data + ((b * T_len + t) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o_row[d] = static_cast<T>(o[d] * inverse);
    }
  });
}

at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                     const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "cpu attention: query, key and value must be "
              "4-D (batch, heads, positions, head size)");
  const auto dtype = query.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && key.scalar_type() == dtype &&
              value.scalar_type() == dtype, "cpu attention: float32 or bfloat16 tensors of one dtype only, got ",
              query.scalar_type(), ", ", key.scalar_type(), ", ", value.scalar_type());
  const int64_t B = query.size(0), H = query.size(1), T = query.size(2), D = query.size(3);
  const int64_t G = key.size(1), S = key.size(2);
  TORCH_CHECK(key.size(0) == B && value.size(0) == B && value.size(1) == G && value.size(2) == S &&
              key.size(3) == D && value.size(3) == D && G > 0 && H % G == 0,
              "cpu attention: shapes do not match: query ", query.sizes(), ", key ", key.sizes(), ", value ",
              value.sizes());
  at::Tensor m;
  bool bool_mask = false;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 4, "cpu attention: the mask must be 4-D, got ", mask->sizes());
    bool_mask = mask->scalar_type() == at::kBool;
    m = (bool_mask ? *mask : mask->to(at::kFloat)).expand({B, H, T, S});  // strides 0 where broadcast: no copy
  }
  at::Tensor out = at::empty({B, T, H, D}, query.options());
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  if (dtype == at::kFloat)
    attend<float>(q, k, v, m, bool_mask, static_cast<float>(scale), out);
  else
    attend<at::BFloat16>(q, k, v, m, bool_mask, static_cast<float>(scale), out);
  return out;
}

}  // namespace

TORCH_LIBRARY(LMBLOCKS_NAMESPACE, m) {
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(LMBLOCKS_NAMESPACE, CPU, m) {
  m.impl("attention", &attention);
}
"""

def library() -> tuple[str, str, str, dict[str, object]]:
    """The attention operator library for this machine, as `lmblocks.cpu_kernels.load_operators` builds it."""
    return "attention", SOURCE, "native", {}


_LOADED: list[str] = []  # the loaded library's operator namespace (a name: module globals must pickle)


def operator() -> torch._ops.OpOverloadPacket:
    """The attention operator for this machine, built on first use or loaded (`lmblocks.cpu_kernels`)."""
    if not _LOADED:
        name = load_operators(*library())

        @torch.library.register_fake(f"{name}::attention")
        def _(query, key, value, mask, scale):
            return query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])

        _LOADED.append(name)
    return getattr(torch.ops, _LOADED[0])


_FAILED: list[str] = []  # not empty once a build failed (and was reported): not tried again


def kernel_available() -> bool:
    """Whether the kernel is built (or loaded) for this machine; it needs a C++ compiler. Without one, attention
    stays transformers' sdpa, and this says so once. `lmblocks.decoding` calls it before `torch.compile` traces a
    step, so that tracing finds the kernel loaded (a plain function, no cache wrapper: dynamo traces it)."""
    if not _LOADED and not _FAILED and not builds(operator, "CPU attention kernel",
                                                  "decoding attends with transformers' sdpa instead."):
        _FAILED.append("built and failed")
    return bool(_LOADED)


def cpu_decoding_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """A transformers attention function (module, query (B, H, T, D), key and value (B, G, S, D), mask) -> output
    (B, T, H, D), no weights: lmblocks' kernel for short float32 and bfloat16 queries on a CPU, sdpa for everything
    else."""
    short = query.shape[2] <= SHORT_QUERY and (attention_mask is not None or query.shape[2] == 1)
    # While torch.compile traces, only a kernel loaded before (building one there would be traced too).
    available = bool(_LOADED) if torch.compiler.is_compiling() else kernel_available()
    if (short and query.device.type == "cpu" and query.dtype == key.dtype == value.dtype
            and query.dtype in KERNEL_DTYPES and not (module.training and dropout) and available):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return operator().attention(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


AttentionInterface.register(CPU_DECODING_ATTENTION, cpu_decoding_attention)
AttentionMaskInterface.register(CPU_DECODING_ATTENTION, sdpa_mask)

__all__ = ["CPU_DECODING_ATTENTION", "SHORT_QUERY", "cpu_decoding_attention", "kernel_available", "operator"]
