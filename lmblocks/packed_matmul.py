"""Float32 and bfloat16 matrix products for CPU decoding on AVX-512 processors, built for the machine they run on.

Batch-1 decoding reads every weight once per token: its products are matrix-vector products, and their speed is how
fast the weights stream from memory. The library kernels do not stream at full speed there. One AMD EPYC thread,
SmolLM2-135M's 211 products back to back, 2026-12-07: MKL's float32 product 10.5 GB/s on the transposed view a linear
layer reads, 14 on a contiguous copy; oneDNN's packed bf16 product (inductor's, for frozen bf16 weights) 12.5 GB/s in
a compiled step. These kernels read the weight the way lmblocks' int8 kernel does — tiles of `ROWS` rows stored block
by block, 64 bytes a block (`pack`, `lmblocks.int8_matmul.pack_weight`'s layout), each tile one sequential stream:
22–25 GB/s in float32 (FMA), 19–22 in bfloat16 (`vdpbf16ps`: pairs of bf16 products summed into float32 lanes; the
activations are the model's bf16); 31 GB/s in float32 with the weights in one block of huge pages
(`lmblocks.huge_pages`, as a packaged step holds them), the rate of a plain read loop on that memory. (Two accumulators per row, software
prefetches 256 B–4 KiB ahead, 8 rows a tile, two tiles from far apart at once: tried, measured no faster.)

They run where they were measured faster (`kernel_runs`): float32 on AVX-512 CPUs, bfloat16 on CPUs with AVX-512
BF16; elsewhere inductor keeps MKL's and oneDNN's products. Plain C++ loops stand in on other builds
(tests/test_packed_matmul.py compares the paths this machine can run). Built on first use (`lmblocks.cpu_kernels`),
operators of their own: `torch.ops.<namespace>.linear`, `.pack` and `.pack_into`, which
`lmblocks.decoding.packed_products` puts into a compiled decoding step.
"""

from __future__ import annotations

import torch

from .cpu_kernels import cpu_flags, load_operators

BLOCK_BYTES = 64  # one 512-bit register: 16 float32 or 32 bfloat16 values, the unit of the packed layout
KERNEL_FLAGS = {torch.float32: "avx512f", torch.bfloat16: "avx512_bf16"}  # where each kernel was measured faster

SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

namespace {

constexpr int64_t BLOCK_BYTES = 64;
#if defined(__AVX512BF16__)
constexpr bool AVX512_BF16 = true;
#else
constexpr bool AVX512_BF16 = false;
#endif
constexpr int ROWS = 4;  // weight rows per pass (`ROWS` in Python): one load of the activations serves all four


// R packed weight rows (block b of row r at w + (b * R + r) * block) times one row of activations x: out[r].
template <int R, typename T>
void dot_rows(const T* x, const T* w, int64_t K, float* out) {
  constexpr int64_t block = BLOCK_BYTES / sizeof(T);
  const int64_t blocks = K / block;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> || (std::is_same_v<T, at::BFloat16> && AVX512_BF16)) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      if constexpr (std::is_same_v<T, float>) {
        const __m512 xb = _mm512_loadu_ps(x + b * block);
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(xb, _mm512_loadu_ps(w + (b * R + r) * block), acc[r]);
      } else {
#if defined(__AVX512BF16__)
        const __m512bh xb = (__m512bh)_mm512_loadu_si512(x + b * block);
        for (int r = 0; r < R; ++r)
          acc[r] = _mm512_dpbf16_ps(acc[r], xb, (__m512bh)_mm512_loadu_si512(w + (b * R + r) * block));
#endif
      }
    }
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
    return;
  }
#endif
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t i = 0; i < block; ++i)
        total += static_cast<float>(x[b * block + i]) * static_cast<float>(w[(b * R + r) * block + i]);
    out[r] = total;
  }
}

template <typename T>
void product(const at::Tensor& x, const at::Tensor& w, const float* bias, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* x_data = x.const_data_ptr<T>();
  const T* w_data = w.const_data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  // Each tile of weight rows is read from memory once, for every row of activations.
  at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile * ROWS, count = std::min<int64_t>(ROWS, N - n);
      for (int64_t m = 0; m < M; ++m) {
        float dots[ROWS];
        const T* x_row = x_data + m * K;
        switch (count) {  // the last tile may be shorter: packed with `count` rows
          case 1: dot_rows<1>(x_row, w_data + n * K, K, dots); break;
          case 2: dot_rows<2>(x_row, w_data + n * K, K, dots); break;
          case 3: dot_rows<3>(x_row, w_data + n * K, K, dots); break;
          default: dot_rows<ROWS>(x_row, w_data + n * K, K, dots); break;
        }
        for (int64_t r = 0; r < count; ++r)
          out_data[m * N + n + r] = static_cast<T>(dots[r] + (bias ? bias[n + r] : 0.f));
      }
    }
  });
}

void check_weight(const at::Tensor& weight, const char* what) {
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16) &&
              weight.size(1) * weight.element_size() % BLOCK_BYTES == 0, what, ": weight must be 2-D float32 or "
              "bfloat16 with in_features a multiple of ", BLOCK_BYTES, " bytes, got ", weight.sizes(), " ",
              weight.scalar_type());
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_weight(weight, "packed linear");
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == weight.scalar_type() && input.size(1) == weight.size(1),
              "packed linear: input must be 2-D ", weight.scalar_type(), " with ", weight.size(1), " features, got ",
              input.sizes(), " ", input.scalar_type());
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->to(at::kFloat).contiguous();
  const float* bias_data = b.defined() ? b.const_data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    product<float>(x, w, bias_data, out);
  else
    product<at::BFloat16>(x, w, bias_data, out);
  return out;
}

// The (N, K) weight in `linear`'s layout (`pack_weight` in Python), written into `packed` (N, K, contiguous).
void pack_into(const at::Tensor& weight, at::Tensor& packed) {
  check_weight(weight, "packed pack");
  const at::Tensor w = weight.contiguous();
  TORCH_CHECK(packed.is_contiguous() && packed.sizes() == w.sizes() && packed.scalar_type() == w.scalar_type(),
              "packed pack_into: the target must be a contiguous tensor of the weight's shape and dtype");
  const int64_t N = w.size(0), K = w.size(1), bytes = w.element_size(), block = BLOCK_BYTES / bytes;
  const auto* source = static_cast<const char*>(w.const_data_ptr());
  auto* target = static_cast<char*>(packed.data_ptr());
  for (int64_t n = 0; n < N; n += ROWS) {
    const int64_t count = std::min<int64_t>(ROWS, N - n);
    for (int64_t b = 0; b < K / block; ++b)
      for (int64_t r = 0; r < count; ++r)
        std::memcpy(target + (n * K + (b * count + r) * block) * bytes, source + ((n + r) * K + b * block) * bytes,
                    BLOCK_BYTES);
  }
}

// The same, as a new tensor: inductor folds this into a constant of a frozen graph, so it is an operator too.
at::Tensor pack(const at::Tensor& weight) {
  at::Tensor packed = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  pack_into(weight, packed);
  return packed;
}

}  // namespace

TORCH_LIBRARY(LMBLOCKS_NAMESPACE, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def("pack(Tensor weight) -> Tensor");
  m.def("pack_into(Tensor weight, Tensor(a!) packed) -> ()");
}

TORCH_LIBRARY_IMPL(LMBLOCKS_NAMESPACE, CPU, m) {
  m.impl("linear", &linear);
  m.impl("pack", &pack);
  m.impl("pack_into", &pack_into);
}
"""

def library(march: str = "native") -> tuple[str, str, str, dict[str, object]]:
    """The packed float operator library for `march`, as `lmblocks.cpu_kernels.load_operators` builds it."""
    return "packed", SOURCE, march, {}


_LOADED: dict[str, str] = {}  # -march → the loaded library's operator namespace (names: module globals must pickle)


def operator(march: str = "native") -> torch._ops.OpOverloadPacket:
    """The packed float32 / bf16 linear operators compiled for `march` (`-march=`; "native": this machine), built on
    first use or loaded from torch's extension folder (`lmblocks.cpu_kernels`)."""
    if march not in _LOADED:
        name = load_operators(*library(march))

        @torch.library.register_fake(f"{name}::linear")
        def _(input, weight, bias):
            return input.new_empty(input.shape[0], weight.shape[0])

        @torch.library.register_fake(f"{name}::pack")
        def _(weight):
            return torch.empty_like(weight, memory_format=torch.contiguous_format)

        @torch.library.register_fake(f"{name}::pack_into")
        def _(weight, packed):
            return None

        _LOADED[march] = name
    return getattr(torch.ops, _LOADED[march])


class PackedLinear(torch.nn.Module):
    """A linear layer's product through the packed kernel, its weight packed once, when the layer is made (the
    weight's size again; into `place` when given, e.g. a slice of one block of huge pages): for a step compiled ahead
    of time, which takes the packed weight as one of its constants (`lmblocks.packaged_step`). Shares the layer's
    bias."""

    def __init__(self, linear: torch.nn.Linear, place: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        if place is None:
            place = operator().pack(weight)
        else:  # written in place: a 540 MB model's weights not allocated a second time
            operator().pack_into(weight, place)
        self.register_buffer("weight", place, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = operator().linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)


def kernel_runs(dtype: torch.dtype) -> bool:
    """Whether this CPU runs the `dtype` kernel's fast path (float32: AVX-512; bfloat16: AVX-512 BF16): where it was
    measured faster than MKL's and oneDNN's products."""
    return KERNEL_FLAGS.get(dtype) in cpu_flags()


__all__ = ["BLOCK_BYTES", "PackedLinear", "kernel_runs", "operator"]
