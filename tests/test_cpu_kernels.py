"""lmblocks.cpu_kernels: the kernels' builds; LMBLOCKS_CPU_MARCH takes an older CPU's code paths on this one (for
measuring them)."""

import os
import subprocess
import sys

import pytest

from lmblocks.cpu_kernels import compiler_features, cpu_flags

_OLDER_CPU = """
import torch
from lmblocks import cpu_kernels, decoding, int8_matmul, packed_matmul
flags = cpu_kernels.cpu_flags()
assert "avx2" in flags and not any(f.startswith(("avx512", "amx")) for f in flags), sorted(flags)
assert not packed_matmul.kernel_runs(torch.float32) and not packed_matmul.kernel_runs(torch.bfloat16)
assert not decoding.packed_kernel_available(torch.float32)
assert not decoding.native_bf16_products()
from families import DECODERS
llama = [f for f in DECODERS if f.name == "llama"][0]
torch.manual_seed(0)
eager = llama.causal_lm_class(llama.tiny_config()).eval().to(torch.bfloat16)
compiled = llama.causal_lm_class(llama.tiny_config()).eval()
compiled.load_state_dict(eager.state_dict())
decoding.enable_compiled_decoding(compiled, weights="bf16")
# bf16 without bf16 dot products: the weights keep eager's layout (no concatenated products), fp32 concatenates
assert not compiled.generation_config.compile_config.backend.concat_linear
assert decoding.compiled_decoding_config("cpu", torch.float32).backend.concat_linear
ids = torch.tensor([[3, 1, 4, 1, 5]])
expected = eager.generate(ids, max_new_tokens=4, do_sample=False)
assert torch.equal(compiled.generate(ids, max_new_tokens=4, do_sample=False), expected)
int8_matmul.operator()  # built for haswell: the namespace of a -march=haswell build
assert int8_matmul._LOADED["native"] == cpu_kernels.load_operators("int8", int8_matmul.SOURCE, "haswell",
                                                                   {"SCALE_BLOCK_SIZE": int8_matmul.SCALE_BLOCK})
"""


def test_features_a_march_enables():
    assert {"avx2", "fma"} <= compiler_features("haswell") and "avx512f" not in compiler_features("haswell")
    with pytest.raises(ValueError, match="LMBLOCKS_CPU_MARCH='no-such-cpu'"):
        compiler_features("no-such-cpu")


@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="this CPU cannot run AVX2 code")
def test_an_older_cpu_s_code_paths():
    """With LMBLOCKS_CPU_MARCH=haswell (AVX2, no AVX-512) the kernels are built for it and the AVX-512 features are
    not seen: the float products stay MKL's and oneDNN's, the int8 kernel takes its AVX2 path, and compiled bf16
    decoding (no bf16 dot products there) keeps eager's weight layout and eager's tokens."""
    env = {**os.environ, "LMBLOCKS_CPU_MARCH": "haswell",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _OLDER_CPU], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


_TWICE = """
#include <ATen/core/Tensor.h>
#include <torch/library.h>

at::Tensor twice(const at::Tensor& x) { return x.mul(2); }

TORCH_LIBRARY(LMBLOCKS_NAMESPACE, m) { m.def("twice(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(LMBLOCKS_NAMESPACE, CPU, m) { m.impl("twice", twice); }
"""


def test_libraries_built_at_once_and_a_failed_build_named(tmp_path, monkeypatch):
    """`build_libraries` builds several libraries side by side, each staged and moved into place whole; one that
    does not compile leaves nothing behind, and loading it raises with the compiler's message."""
    import torch

    from lmblocks.cpu_kernels import build_libraries, library_build, load_operators

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    good, bad = ("twice", _TWICE, "native", {}), ("broken", "this is not C++;", "native", {})
    build_libraries([good, bad])
    name, library, _ = library_build(*good)
    assert library.is_file() and not library_build(*bad)[1].exists()
    assert not [path for path in tmp_path.rglob("*") if "partial" in path.name]
    assert load_operators(*good) == name
    assert torch.equal(getattr(torch.ops, name).twice(torch.ones(3)), torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match=r"building lmblocks_broken_\w+\.so failed .*\n.*error"):
        load_operators(*bad)


def test_without_a_compiler_the_load_names_it(tmp_path, monkeypatch):
    from lmblocks.cpu_kernels import build_libraries, library_build, load_operators

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    library = ("twice", _TWICE + "// without a compiler\n", "native", {})
    build_libraries([library])  # leaves the error to the load
    assert not library_build(*library)[1].exists()
    with pytest.raises(FileNotFoundError, match="no-such-compiler"):
        load_operators(*library)
