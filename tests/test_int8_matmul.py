"""lmblocks' int8 × int8 CPU kernel (lmblocks/int8_matmul.py): every instruction-set path this machine can run gives
the product its quantization defines, for every tile shape; the layout round-trips; Int8Linear falls back to ATen's
kernel when the kernel cannot be built."""

import pytest
import torch

from lmblocks import decoding
from lmblocks.int8_matmul import BLOCK, ROWS, SCALE_BLOCK, cpu_flags, int8_linear, operator, pack_weight, unpack_weight


# -march targets and the CPU flags their code needs: AVX-512 with VNNI (dpbusd), AVX-512 BW without VNNI
# (maddubs + madd), AVX2 (the 256-bit path), and plain x86-64 (the C++ loop). "native" is what users get.
TARGETS = {
    "native": set(),
    "icelake-server": {"avx512bw", "avx512_vnni", "avx512_vbmi2", "gfni", "vaes"},
    "skylake-avx512": {"avx512bw", "avx512dq", "avx512vl"},
    "haswell": {"avx2", "fma", "bmi2", "movbe"},
    "x86-64": {"sse2"},
}


def reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """The kernel's definition in float64: x quantized per block of SCALE_BLOCK values (scale = max|x| / 127, round to
    nearest even), int8 dot products per block, scaled by the block's and the channel's scales."""
    m, k = x.shape
    blocks = x.double().reshape(m, k // SCALE_BLOCK, SCALE_BLOCK)
    block_scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(block_scale > 0, torch.round(blocks / block_scale), 0.0)
    dots = torch.einsum("mbi,nbi->mnb", q, weight.double().reshape(-1, k // SCALE_BLOCK, SCALE_BLOCK))
    out = (dots * block_scale.squeeze(-1)[:, None, :]).sum(-1) * scales.double()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("march", TARGETS)
def test_every_path_computes_the_defined_product(march):
    if not TARGETS[march] <= cpu_flags():
        pytest.skip(f"this CPU cannot run -march={march} code")
    torch.manual_seed(0)
    # N covers whole tiles and every shorter last tile (N % ROWS = 1, 2, 3); M > 1 is a prompt's prefill
    for m, k, n, with_bias in [(1, 576, 1536, False), (3, 128, 4 * ROWS + 1, True), (2, 64, 6, False),
                               (1, 192, 7, True), (5, 64, 1, False)]:
        x = torch.randn(m, k) * torch.rand(m, k)  # blocks of different magnitudes
        x[0, :SCALE_BLOCK] = 0  # an all-zero block (scale 0)
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scales, bias = torch.rand(n) / 100, torch.randn(n) if with_bias else None
        out = operator(march).linear(x, pack_weight(weight), scales, bias)
        expected = reference(x, weight, scales, bias)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_packing_round_trips_and_shapes_are_checked():
    weight = torch.randint(-127, 128, (4 * ROWS + 3, 2 * BLOCK), dtype=torch.int8)
    packed = pack_weight(weight)
    assert packed.shape == weight.shape and not torch.equal(packed, weight)
    assert torch.equal(unpack_weight(packed), weight)
    x = torch.randn(2, 5, 2 * BLOCK)
    assert int8_linear(x, packed, torch.ones(weight.shape[0])).shape == (2, 5, weight.shape[0])
    with pytest.raises(RuntimeError, match="must be a multiple of 64"):
        operator().linear(torch.randn(1, 96), torch.zeros(4, 96, dtype=torch.int8), torch.ones(4), None)
    with pytest.raises(RuntimeError, match="weight must be int8"):
        operator().linear(torch.randn(1, 64), torch.zeros(4, 64), torch.ones(4), None)


def test_int8_linear_without_the_kernel_uses_aten(monkeypatch):
    """A machine where the kernel cannot be built (no C++ compiler) still decodes int8, with ATen's kernel."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 40)
    x = torch.randn(3, 128)
    with_kernel = decoding.Int8Linear(linear)
    monkeypatch.setattr(decoding, "int8_kernel_available", lambda: False)
    without = decoding.Int8Linear(linear)
    assert with_kernel.packed and not without.packed
    assert torch.equal(unpack_weight(with_kernel.weight_int8), without.weight_int8)
    for layer in (with_kernel, without):
        error = (layer(x) - linear(x)).norm() / linear(x).norm()
        assert error < 0.02, error
