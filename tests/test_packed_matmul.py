"""lmblocks' packed float32 / bf16 CPU kernels (lmblocks/packed_matmul.py): the AVX-512 paths and the plain C++ path
compute the product summed in float32, for every tile shape; the packing is `pack_weight`'s layout; and a compiled
decoding step on a CPU that runs them calls them on weights packed once, folded into the frozen graph."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from lmblocks import decoding
from lmblocks.packed_matmul import BLOCK_BYTES, kernel_runs, operator
from lmblocks.cpu_kernels import cpu_flags
from lmblocks.decoding import compiled_decoding_config, frozen_weights
from lmblocks.int8_matmul import pack_weight

TARGETS = {"native": set(), "x86-64": {"sse2"}}  # AVX-512 BF16 where this CPU has it; the plain loop


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("march", TARGETS)
def test_every_path_computes_the_product(march, dtype):
    if not TARGETS[march] <= cpu_flags():
        pytest.skip(f"this CPU cannot run -march={march} code")
    torch.manual_seed(0)
    block = BLOCK_BYTES // dtype.itemsize
    for m, n, k in [(1, 64, 2 * block), (3, 9, 4 * block), (1, 6, block), (2, 7, 3 * block)]:  # N % ROWS = 0, 1, 2, 3
        x, weight, bias = (torch.randn(*shape).to(dtype) for shape in ((m, k), (n, k), (n,)))
        packed = operator(march).pack(weight)
        assert torch.equal(packed, pack_weight(weight, block))
        into = torch.full_like(packed, float("nan"))
        operator(march).pack_into(weight, into)  # what PackedLinear writes into its block of huge pages
        assert torch.equal(into, packed)
        for b in (bias, None):
            out = operator(march).linear(x, packed, b)
            assert out.dtype == dtype and out.shape == (m, n)
            expected = x.double() @ weight.double().T + (0 if b is None else b.double())
            # float32 sums of the products, rounded once to the output's dtype at the end
            tolerance = dict(atol=1e-3 * k**0.5, rtol=8e-3) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(out.double(), expected, **tolerance)


def test_bad_inputs_are_refused():
    with pytest.raises(RuntimeError, match="a multiple of 64 bytes, got \\[4, 48\\]"):
        operator().pack(torch.zeros(4, 48, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="input must be 2-D BFloat16"):
        operator().linear(torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.bfloat16), None)
    with pytest.raises(RuntimeError, match="the target must be a contiguous tensor of the weight's shape and dtype"):
        operator().pack_into(torch.zeros(4, 64), torch.zeros(4, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_compiled_step_calls_the_kernel_on_weights_packed_once(dtype):
    if not kernel_runs(dtype):
        pytest.skip(f"this CPU does not run the {dtype} kernel")
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 320, bias=False))
    model = model.to(dtype).eval()
    x = torch.randn(1, 64).to(dtype)
    config = compiled_decoding_config("cpu", dtype)
    assert not config.backend.weight_prepack  # oneDNN's packed weights: not needed, and not cacheable
    with torch.no_grad(), frozen_weights(config.backend.weight_prepack):
        out, code = run_and_get_code(torch.compile(model, **config.to_dict()), x)
    torch.testing.assert_close(out, model(x), atol=0.02, rtol=0.02)
    calls = [line for line in "\n".join(code).splitlines() if not line.strip().startswith("//")]
    kernels = re.findall(r'aoti_torch_call_dispatcher\("(\w+)::(\w+)"', "\n".join(calls))
    assert [op for _, op in kernels] == ["linear", "linear"], kernels  # packing folded away: not called per step
    assert not re.findall(r"aoti_torch_cpu_(?:mm|addmm)_out|mkldnn", "\n".join(calls))
    assert model[0].weight.shape == (96, 64) and model[2].weight.is_contiguous()  # the model keeps its own weights


def test_where_the_kernels_do_not_run_MKL_and_oneDNN_keep_the_products(without_packed_kernels):
    assert compiled_decoding_config("cpu", torch.bfloat16).backend.weight_prepack
    graph = torch.fx.symbolic_trace(torch.nn.Linear(64, 64)).graph
    decoding.packed_products(graph)  # nothing to take
