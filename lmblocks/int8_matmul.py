"""An int8 × int8 matrix product for CPU decoding, built for the machine it runs on.

Batch-1 decoding is one matrix-vector product per weight matrix. With int8 weights, what decides its speed is how
few instructions a weight costs once loaded: PyTorch's weight-only kernel (`_weight_int8pack_mm`) converts every
weight to a float before multiplying, and inductor's own code for `(x * w.float()).sum(-1)` (tried) and its C++ GEMM
template for that kernel (`max_autotune`, tried) do the same: SmolLM2-135M int8 decoded at 27–36 ms/token with any
of them, one thread, against 10.3 for llama.cpp's q8_0. q8_0 quantizes the activations to int8 too and multiplies
int8 by int8, 64 products per instruction with AVX-512 VNNI (`vpdpbusd`); this kernel does the same:

- activations: one scale per `SCALE_BLOCK` (16) values of a row, q = round(x / scale), scale = max|x| / 127,
  computed per call (a row is a few thousand values: nothing beside the weights). A 32-bit lane of a VNNI product
  sums 4 neighbouring values, so any block of 4 or more costs the same instructions: one scale vector per 64 values
  instead of a broadcast. Per 16 values the logits are as close to fp32's as with bf16 activations (teacher-forced
  KL to fp32 on three chat answers, SmolLM2-135M: 0.0053, per 32: 0.0063, per 64: 0.0092; ATen's weight-only kernel
  0.0047); held-out bits per byte of the main job's text 1.3264 against fp32's 1.3268;
- weights: int8 with one scale per output channel (`Int8Linear`'s), packed in tiles of `ROWS` rows (`pack_weight`);
- per 4-value lane, the int32 dot product times the lane's activation scale, summed in float32; times the
  channel's scale at the end.

`vpdpbusd` multiplies unsigned by signed bytes: the activations enter as |q| and the weights take q's sign (as
llama.cpp does). Paths by what the compiler targets (`-march=native`): AVX-512 VNNI, AVX-512 BW (`vpmaddubsw` +
`vpmaddwd`), AVX2 (the same on 256 bits), and plain C++ elsewhere (tests/test_int8_matmul.py runs each path this
machine can). Built on first use for the machine it runs on (`lmblocks.cpu_kernels`), it is an operator of its own
(`torch.ops.<namespace>.linear`): `torch.compile` keeps it as one node, called from the compiled step's C++.
"""

from __future__ import annotations

import torch

from .cpu_kernels import cpu_flags, load_operators

BLOCK = 64  # int8 values in one 512-bit register: the unit of the packed weight layout
ROWS = 4  # weight rows read together (the C++ `ROWS`)
SCALE_BLOCK = 16  # activation values per scale (the C++ `SCALE_BLOCK`)

SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#if defined(__AVX2__) || defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr int64_t BLOCK = 64;
constexpr int64_t SCALE_BLOCK = SCALE_BLOCK_SIZE;  // activation values per scale (`SCALE_BLOCK` in Python)
constexpr int ROWS = 4;  // weight rows per pass (`ROWS` in Python): the activations' registers serve all four

// One row of activations: |q| (unsigned) and where q < 0 (one bit per value) by blocks of BLOCK, and the scale of
// each group of 4 values (the values one 32-bit lane of a VNNI product sums): the scale of its SCALE_BLOCK.
struct QuantizedRow {
  std::vector<uint8_t> magnitude;
  std::vector<uint64_t> negative;
  std::vector<int8_t> values;  // q itself, for the AVX2 and plain paths
  std::vector<float> lane_scale;
};

// Quantizes x (K values) into `row`, whose buffers keep their capacity from call to call.
void quantize(const float* x, int64_t K, QuantizedRow& row) {
  row.magnitude.resize(K);
  row.negative.assign(K / BLOCK, 0);
  row.values.resize(K);
  row.lane_scale.resize(K / 4);
  for (int64_t start = 0; start < K; start += SCALE_BLOCK) {
#if defined(__AVX512BW__) && SCALE_BLOCK_SIZE == 16
    // The scalar loop below, 16 values at a time: the same products, rounded the same way (to nearest even).
    const __m512 v = _mm512_loadu_ps(x + start);
    const float amax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
    const float inverse = amax > 0.f ? 127.f / amax : 0.f;
    const __m128i q = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inverse))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row.values.data() + start), q);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row.magnitude.data() + start), _mm_abs_epi8(q));
    row.negative[start / BLOCK] |= static_cast<uint64_t>(static_cast<uint16_t>(_mm_movemask_epi8(q)))
                                   << (start % BLOCK);
    for (int64_t lane = start / 4; lane < (start + SCALE_BLOCK) / 4; ++lane) row.lane_scale[lane] = amax / 127.f;
#else
    float amax = 0.f;
    for (int64_t i = start; i < start + SCALE_BLOCK; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float inverse = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t lane = start / 4; lane < (start + SCALE_BLOCK) / 4; ++lane) row.lane_scale[lane] = amax / 127.f;
    for (int64_t i = start; i < start + SCALE_BLOCK; ++i) {
      const int q = static_cast<int>(std::nearbyint(x[i] * inverse));
      row.values[i] = static_cast<int8_t>(q);
      row.magnitude[i] = static_cast<uint8_t>(q < 0 ? -q : q);
      row.negative[i / BLOCK] |= static_cast<uint64_t>(q < 0) << (i % BLOCK);
    }
#endif
  }
}

// For R weight rows stored block by block (block b of row r at w + (b * R + r) * BLOCK: `pack_weight`, so that the R
// rows are one sequential stream): the sum over 4-value groups of their scale times their int8 dot product.
template <int R>
void dot_rows(const QuantizedRow& x, const int8_t* w, int64_t K, float* out) {
  const int64_t blocks = K / BLOCK;
#if defined(__AVX512BW__)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512i magnitude = _mm512_loadu_si512(x.magnitude.data() + b * BLOCK);
    const __mmask64 negative = x.negative[b];
    const __m512 scale = _mm512_loadu_ps(x.lane_scale.data() + b * BLOCK / 4);
    for (int r = 0; r < R; ++r) {
      __m512i wb = _mm512_loadu_si512(w + (b * R + r) * BLOCK);
      wb = _mm512_mask_sub_epi8(wb, negative, zero, wb);  // w takes q's sign: |q| * (±w) = q * w
#if defined(__AVX512VNNI__)
      const __m512i dot = _mm512_dpbusd_epi32(zero, magnitude, wb);
#else
      const __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16(magnitude, wb), _mm512_set1_epi16(1));
#endif
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(__AVX2__)
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int half = 0; half < 2; ++half) {
      const int64_t k = b * BLOCK + half * 32;
      const __m256 scale = _mm256_loadu_ps(x.lane_scale.data() + k / 4);
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.values.data() + k));
      const __m256i magnitude = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.magnitude.data() + k));
      for (int r = 0; r < R; ++r) {
        const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (b * R + r) * BLOCK + half * 32));
        // |q| * sign(q)·w, in int16 pairs (127 * 127 * 2 fits), then int32
        const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(wb, q)), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    const __m128 sum2 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    out[r] = _mm_cvtss_f32(_mm_add_ss(sum2, _mm_shuffle_ps(sum2, sum2, 1)));
  }
#else
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t lane = 0; lane < BLOCK / 4; ++lane) {
        int32_t dot = 0;
        for (int64_t i = lane * 4; i < lane * 4 + 4; ++i)
          dot += int32_t(x.values[b * BLOCK + i]) * int32_t(w[(b * R + r) * BLOCK + i]);
        total += x.lane_scale[b * BLOCK / 4 + lane] * static_cast<float>(dot);
      }
    }
    out[r] = total;
  }
#endif
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scales,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && input.scalar_type() == at::kFloat, "int8 linear: input must be a 2-D float32 "
              "tensor, got ", input.sizes(), " ", input.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == input.size(1),
              "int8 linear: weight must be int8 of shape (out_features, ", input.size(1), "), got ", weight.sizes(),
              " ", weight.scalar_type());
  TORCH_CHECK(input.size(1) % BLOCK == 0, "int8 linear: in_features (", input.size(1), ") must be a multiple of ",
              BLOCK);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == weight.size(0),
              "int8 linear: scales must be float32, one per output channel");
  const at::Tensor x = input.contiguous(), w = weight.contiguous(), s = scales.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const float* bias_data = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    bias_data = b.data_ptr<float>();
  }
  const int8_t* w_data = w.data_ptr<int8_t>();
  const float* s_data = s.data_ptr<float>();
  // Reused from call to call (a decoding step makes some 200). A reference, so that the worker threads below read
  // this thread's buffers, not their own thread_local ones.
  thread_local std::vector<QuantizedRow> buffers;
  if (static_cast<int64_t>(buffers.size()) < M) buffers.resize(M);
  std::vector<QuantizedRow>& rows = buffers;
  for (int64_t m = 0; m < M; ++m) quantize(x.data_ptr<float>() + m * K, K, rows[m]);
  float* out_data = out.data_ptr<float>();
  // Each tile of weight rows is read from memory once, for every row of activations (prefill has many).
  at::parallel_for(0, (N + ROWS - 1) / ROWS, 16, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile * ROWS, count = std::min<int64_t>(ROWS, N - n);
      for (int64_t m = 0; m < M; ++m) {
        float dots[ROWS];
        if (count == ROWS) {
          dot_rows<ROWS>(rows[m], w_data + n * K, K, dots);
        } else {  // the last, shorter tile: packed with `count` rows
          switch (count) {
            case 1: dot_rows<1>(rows[m], w_data + n * K, K, dots); break;
            case 2: dot_rows<2>(rows[m], w_data + n * K, K, dots); break;
            default: dot_rows<3>(rows[m], w_data + n * K, K, dots); break;
          }
        }
        for (int64_t r = 0; r < count; ++r)
          out_data[m * N + n + r] = dots[r] * s_data[n + r] + (bias_data ? bias_data[n + r] : 0.f);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(LMBLOCKS_NAMESPACE, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(LMBLOCKS_NAMESPACE, CPU, m) {
  m.impl("linear", &linear);
}
"""


def library(march: str = "native") -> tuple[str, str, str, dict[str, object]]:
    """The int8 operator library for `march`, as `lmblocks.cpu_kernels.load_operators` builds it."""
    return "int8", SOURCE, march, {"SCALE_BLOCK_SIZE": SCALE_BLOCK}


_LOADED: dict[str, str] = {}  # -march → the loaded library's operator namespace (names: module globals must pickle)


def operator(march: str = "native") -> torch._ops.OpOverloadPacket:
    """The int8 linear operator compiled for `march` (`-march=`; "native": this machine), built on first use (about
    6 s of one core) or loaded from torch's extension folder (`lmblocks.cpu_kernels`). `Int8Linear` loads it when
    it is made, so that `torch.compile` finds it loaded."""
    if march not in _LOADED:
        name = load_operators(*library(march))

        @torch.library.register_fake(f"{name}::linear")
        def _(input, weight, scales, bias):
            return input.new_empty(input.shape[0], weight.shape[0])

        _LOADED[march] = name
    return getattr(torch.ops, _LOADED[march])


def pack_weight(weight: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """An (N, K) weight in the kernel's layout: tiles of `ROWS` rows (the last one shorter), each stored block by
    block — the `block` values of block 0 of its rows, then block 1, ... — so that a tile is read as one sequential
    stream. Reading four rows side by side instead streamed cold weights at 9 GB/s, against 17 for one row at a
    time (one AMD EPYC thread, 2026-12-06): the hardware prefetcher follows one stream, not four interleaved.
    `block`: the values of one 512-bit register (64 int8; 16 float32 or 32 bfloat16 for `lmblocks.packed_matmul`)."""
    n, k = weight.shape
    full = n - n % ROWS
    head = weight[:full].reshape(full // ROWS, ROWS, k // block, block).transpose(1, 2).reshape(full, k)
    tail = weight[full:].reshape(1, n - full, k // block, block).transpose(1, 2).reshape(n - full, k)
    return torch.cat([head, tail]).contiguous()


def unpack_weight(packed: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """`pack_weight`'s inverse: the (N, K) weight row by row."""
    n, k = packed.shape
    full = n - n % ROWS
    head = packed[:full].reshape(full // ROWS, k // block, ROWS, block).transpose(1, 2).reshape(full, k)
    tail = packed[full:].reshape(1, k // block, n - full, block).transpose(1, 2).reshape(n - full, k)
    return torch.cat([head, tail])


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                march: str = "native") -> torch.Tensor:
    """x (..., K) float32 @ weight (N, K) int8 · scales (N,) float32 (+ bias), with x quantized to int8 with one scale
    per `SCALE_BLOCK` values; K a multiple of `BLOCK`; the weight in `pack_weight`'s layout."""
    out = operator(march).linear(x.reshape(-1, x.shape[-1]), weight, scales, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


__all__ = ["BLOCK", "ROWS", "cpu_flags", "int8_linear", "operator", "pack_weight", "unpack_weight"]
