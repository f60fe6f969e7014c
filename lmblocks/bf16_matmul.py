"""A bfloat16 matrix product for CPU decoding on processors with AVX-512 BF16, built for the machine it runs on.

Batch-1 decoding reads every weight once per token, so a bf16 step should take half a float32 one. With oneDNN's
packed bf16 product (what inductor uses for frozen bf16 weights) SmolLM2-135M's products streamed 12.5 GB/s on one
AMD EPYC thread (21.5 of 27.4 ms a token, 2026-12-07) against about 19 GB/s for lmblocks' int8 kernel on the same
machine. This kernel reads the weight the way the int8 one does — tiles of `ROWS` rows stored block by block
(`pack`, as `lmblocks.int8_matmul.pack_weight` with 32 bf16 values a block), one sequential stream per tile — and multiplies with
`vdpbf16ps` (pairs of bf16 products summed into float32 lanes), the activations in bf16 as the model's already are.

It runs where the CPU has AVX-512 BF16 (`HAS_BF16_INSTRUCTIONS`), the only kind it was measured on; elsewhere
inductor keeps oneDNN's product. A plain C++ loop stands in on other builds (tests/test_bf16_matmul.py compares
the two). Built on first use (`lmblocks.cpu_kernels`), an operator of its own (`torch.ops.<namespace>.linear`).
"""

from __future__ import annotations

import torch

from .cpu_kernels import cpu_flags, load_operators

BLOCK = 32  # bf16 values in one 512-bit register: the unit of the packed layout

SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

namespace {

constexpr int64_t BLOCK = 32;
constexpr int ROWS = 4;  // weight rows per pass (`ROWS` in Python): one load of the activations serves all four

float to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// R packed weight rows (block b of row r at w + (b * R + r) * BLOCK) times one row of activations x: out[r].
template <int R>
void dot_rows(const uint16_t* x, const uint16_t* w, int64_t K, float* out) {
  const int64_t blocks = K / BLOCK;
#if defined(__AVX512BF16__)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512bh xb = (__m512bh)_mm512_loadu_si512(x + b * BLOCK);
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_dpbf16_ps(acc[r], xb, (__m512bh)_mm512_loadu_si512(w + (b * R + r) * BLOCK));
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
#else
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t i = 0; i < BLOCK; ++i) total += to_float(x[b * BLOCK + i]) * to_float(w[(b * R + r) * BLOCK + i]);
    out[r] = total;
  }
#endif
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kBFloat16, "bf16 linear: input must be a 2-D bfloat16 "
              "tensor, got ", input.sizes(), " ", input.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.size(1) == input.size(1),
              "bf16 linear: weight must be bfloat16 of shape (out_features, ", input.size(1), "), got ",
              weight.sizes(), " ", weight.scalar_type());
  TORCH_CHECK(input.size(1) % BLOCK == 0, "bf16 linear: in_features (", input.size(1), ") must be a multiple of ",
              BLOCK);
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  const float* bias_data = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const auto* x_data = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  const auto* w_data = reinterpret_cast<const uint16_t*>(w.const_data_ptr<at::BFloat16>());
  at::BFloat16* out_data = out.data_ptr<at::BFloat16>();
  // Each tile of weight rows is read from memory once, for every row of activations.
  at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile * ROWS, count = std::min<int64_t>(ROWS, N - n);
      for (int64_t m = 0; m < M; ++m) {
        float dots[ROWS];
        const uint16_t* x_row = x_data + m * K;
        switch (count) {  // the last tile may be shorter: packed with `count` rows
          case 1: dot_rows<1>(x_row, w_data + n * K, K, dots); break;
          case 2: dot_rows<2>(x_row, w_data + n * K, K, dots); break;
          case 3: dot_rows<3>(x_row, w_data + n * K, K, dots); break;
          default: dot_rows<ROWS>(x_row, w_data + n * K, K, dots); break;
        }
        for (int64_t r = 0; r < count; ++r)
          out_data[m * N + n + r] = static_cast<at::BFloat16>(dots[r] + (bias_data ? bias_data[n + r] : 0.f));
      }
    }
  });
  return out;
}

// The (N, K) weight in `linear`'s layout (`pack_weight` in Python): inductor folds this into a constant of a
// frozen graph, so it is an operator too.
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.size(1) % BLOCK == 0,
              "bf16 pack: weight must be 2-D bfloat16 with in_features a multiple of ", BLOCK, ", got ",
              weight.sizes(), " ", weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor packed = at::empty({N, K}, w.options());
  const auto* source = w.const_data_ptr<at::BFloat16>();
  auto* target = packed.data_ptr<at::BFloat16>();
  for (int64_t n = 0; n < N; n += ROWS) {
    const int64_t count = std::min<int64_t>(ROWS, N - n);
    for (int64_t b = 0; b < K / BLOCK; ++b)
      for (int64_t r = 0; r < count; ++r)
        std::memcpy(target + n * K + (b * count + r) * BLOCK, source + (n + r) * K + b * BLOCK,
                    BLOCK * sizeof(at::BFloat16));
  }
  return packed;
}

}  // namespace

TORCH_LIBRARY(LMBLOCKS_NAMESPACE, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("pack(Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(LMBLOCKS_NAMESPACE, CPU, m) {
  m.impl("linear", &linear);
  m.impl("pack", &pack);
}
"""

_LOADED: dict[str, str] = {}  # -march → the loaded library's operator namespace (names: module globals must pickle)


def operator(march: str = "native") -> torch._ops.OpOverloadPacket:
    """The bf16 linear operator compiled for `march` (`-march=`; "native": this machine), built on first use or
    loaded from torch's extension folder (`lmblocks.cpu_kernels`)."""
    if march not in _LOADED:
        name = load_operators("bf16", SOURCE, march)

        @torch.library.register_fake(f"{name}::linear")
        def _(input, weight, bias):
            return input.new_empty(input.shape[0], weight.shape[0])

        @torch.library.register_fake(f"{name}::pack")
        def _(weight):
            return torch.empty_like(weight, memory_format=torch.contiguous_format)

        _LOADED[march] = name
    return getattr(torch.ops, _LOADED[march])


def has_bf16_instructions() -> bool:
    """Whether this CPU has AVX-512 BF16 (`vdpbf16ps`), where the kernel was measured faster than oneDNN's."""
    return "avx512_bf16" in cpu_flags()


__all__ = ["BLOCK", "has_bf16_instructions", "operator"]
