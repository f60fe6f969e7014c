"""lmblocks' bf16 CPU kernel (lmblocks/bf16_matmul.py): its AVX-512 BF16 path and its plain C++ path compute the
product of the bf16 values summed in float32, for every tile shape; its packing is `pack_weight`'s layout; and a
compiled bf16 decoding step on such a CPU calls it on weights packed once, folded into the frozen graph."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from lmblocks import decoding
from lmblocks.bf16_matmul import BLOCK, has_bf16_instructions, operator
from lmblocks.cpu_kernels import cpu_flags
from lmblocks.decoding import compiled_decoding_config, frozen_weights
from lmblocks.int8_matmul import pack_weight

TARGETS = {"native": set(), "x86-64": {"sse2"}}  # AVX-512 BF16 where this CPU has it; the plain loop


@pytest.mark.parametrize("march", TARGETS)
def test_every_path_computes_the_product_of_the_bf16_values(march):
    if not TARGETS[march] <= cpu_flags():
        pytest.skip(f"this CPU cannot run -march={march} code")
    torch.manual_seed(0)
    for m, n, k in [(1, 64, 2 * BLOCK), (3, 9, 4 * BLOCK), (1, 6, BLOCK), (2, 7, 3 * BLOCK)]:  # N % ROWS = 0, 1, 2, 3
        x, weight, bias = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
        packed = operator(march).pack(weight)
        assert torch.equal(packed, pack_weight(weight, BLOCK))
        expected = x.double() @ weight.double().T + bias.double()
        for b in (bias, None):
            out = operator(march).linear(x, packed, b)
            assert out.dtype == torch.bfloat16 and out.shape == (m, n)
            reference = expected if b is not None else expected - bias.double()
            # float32 sums of exact bf16 products, one bf16 rounding at the end
            torch.testing.assert_close(out.double(), reference, atol=1e-3 * k**0.5, rtol=8e-3)


def test_bad_inputs_are_refused():
    with pytest.raises(RuntimeError, match="a multiple of 32, got \\[4, 48\\]"):
        operator().pack(torch.zeros(4, 48, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="input must be a 2-D bfloat16"):
        operator().linear(torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.bfloat16), None)


@pytest.mark.skipif(not has_bf16_instructions(), reason="the kernel runs on CPUs with AVX-512 BF16 only")
def test_a_compiled_bf16_step_calls_the_kernel_on_weights_packed_once():
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 32, bias=False))
    model = model.bfloat16().eval()
    x = torch.randn(1, 64).bfloat16()
    config = compiled_decoding_config("cpu", torch.bfloat16)
    assert not config.backend.weight_prepack  # oneDNN's packed weights: not needed, and not cacheable
    with torch.no_grad(), frozen_weights(config.backend.weight_prepack):
        out, code = run_and_get_code(torch.compile(model, **config.to_dict()), x)
    torch.testing.assert_close(out, model(x), atol=0.02, rtol=0.02)
    calls = [line for line in "\n".join(code).splitlines() if not line.strip().startswith("//")]
    kernels = re.findall(r'aoti_torch_call_dispatcher\("(\w+)::(\w+)"', "\n".join(calls))
    assert [op for _, op in kernels] == ["linear", "linear"], kernels  # packing folded away: not called per step
    assert not re.findall(r"aoti_torch_cpu_(?:mm|addmm)_out|mkldnn", "\n".join(calls))
    assert model[0].weight.shape == (96, 64)  # the model keeps its own weights


def test_without_bf16_instructions_oneDNN_keeps_the_products(monkeypatch):
    monkeypatch.setattr(decoding, "has_bf16_instructions", lambda: False)
    decoding.bf16_kernel_available.cache_clear()
    try:
        assert compiled_decoding_config("cpu", torch.bfloat16).backend.weight_prepack
    finally:
        monkeypatch.undo()
        decoding.bf16_kernel_available.cache_clear()
