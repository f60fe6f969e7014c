"""Compiled decoding (lmblocks.decoding): the same tokens as eager decoding, before and after the weights change, one
compilation for every prompt length and `max_new_tokens`, the compiled step reused by a new process from the on-disk
cache and by several models in one process, and the int8 / bf16 weight formats.

Each compilation takes tens of seconds on 2 shared cores (inductor's C++): the tests compile as few times as they
can, and a compilation the on-disk cache already holds costs only tracing."""

import copy
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from families import DECODERS
from lmblocks import decoding
from lmblocks.decoding import (
    Int8Linear,
    cache_bucket,
    compiled_decoding_config,
    convert_weights,
    enable_compiled_decoding,
    frozen_weights,
    reuse_guard_checks,
    weights_stamp,
)


def test_cpu_config_freezes_and_concatenates_projections(without_packed_kernels):
    """Under `frozen_weights()` three products of one input become one product on the concatenated frozen weights
    (not prepacked: MKL's packed weights would keep the graph out of the on-disk cache), called from the C++ wrapper
    (passed as `torch.compile(options=...)` they stay three `aten::mm` on the weights as graph inputs, in torch
    2.13). Where lmblocks' packed kernels run, they take these products (tests/test_packed_matmul.py)."""
    config = compiled_decoding_config("cpu")
    assert config._compile_all_devices and config.fullgraph and config.dynamic is False
    assert compiled_decoding_config("cuda").mode == "reduce-overhead"

    class ThreeProducts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))

        def forward(self, x):
            return self.a(x) + self.b(x) * self.c(x)

    model, x = ThreeProducts().eval(), torch.rand(1, 1, 64)
    with torch.no_grad(), frozen_weights():
        out, code = run_and_get_code(torch.compile(model, **config.to_dict()), x)
    torch.testing.assert_close(out, model(x))
    # Kernel calls in the generated C++ (comments, which name the ATen ops they replace, left out).
    calls = [line for line in "\n".join(code).splitlines() if not line.strip().startswith("//")]
    products = re.findall(r"aoti_torch_cpu_\w+(?=\()|extern_kernels\.\w+", "\n".join(calls))
    assert products == ["aoti_torch_cpu_mm_out"], products



def test_wide_products_read_a_contiguous_transposed_weight(without_packed_kernels):
    """A float32 product with many more outputs than inputs (an LM head) reads a contiguous (in, out) copy of its
    weight, folded into the frozen graph; a square one keeps the transposed view of the model's weight (measured
    slower transposed). The model's own weights keep their layout."""
    config = compiled_decoding_config("cpu")
    model, x = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 256)).eval(), torch.rand(1, 32)
    with torch.no_grad(), frozen_weights():
        out, code = run_and_get_code(torch.compile(model, **config.to_dict()), x)
    torch.testing.assert_close(out, model(x))
    # The generated code lists its frozen constants in comments: "// _frozen_param3 ... torch.float32 (32, 256) (256, 1)".
    constants = re.findall(r"torch\.float32 \((\d+), (\d+)\) \((\d+), (\d+)\)", "\n".join(code))
    layouts = {tuple(map(int, c[:2])): tuple(map(int, c[2:])) for c in constants}
    assert layouts[(32, 256)] == (256, 1), layouts  # wide: contiguous W.T
    assert layouts[(32, 32)] == (1, 32), layouts  # square: W's transposed view
    assert model[1].weight.shape == (256, 32) and model[1].weight.is_contiguous()

def _compilations(model) -> int:
    """How many graphs the model's decoding-step backend has compiled so far (dynamo calls the backend once per
    graph it compiles: a recompilation calls it again)."""
    return model.generation_config.compile_config.backend.compilations


@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_compiled_decoding_matches_eager_compiles_once_and_follows_weight_updates(family):
    torch.manual_seed(0)
    model = family.causal_lm_class(family.tiny_config()).eval()
    prompts = [torch.randint(3, 99, (1, 5)), torch.randint(3, 99, (1, 11), generator=torch.Generator().manual_seed(1))]

    def both(prompt, new_tokens=6):
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        eager = model.generate(prompt, disable_compile=True, cache_implementation="dynamic", **kwargs)
        compiled = model.generate(prompt, **kwargs)
        return eager, compiled

    enable_compiled_decoding(model, ahead_of_time=False)  # torch.compile's step (the packaged one: test_packaged_step)
    eager, compiled = both(prompts[0])
    assert model.generation_config.cache_implementation == "static"
    assert _compilations(model) == 1, "generate did not compile the decoding step"
    assert torch.equal(compiled, eager)
    # Another prompt length and another max_new_tokens (so another cache length): the same compiled step.
    for prompt, new_tokens in ((prompts[1], 6), (prompts[0], 13), (prompts[1], 20)):
        assert torch.equal(*both(prompt, new_tokens))
    assert _compilations(model) == 1

    # The weights change in place through `.data` (as EMA code and hand-written updates do), which moves neither their
    # address nor their version counter: the compiled graph, which froze copies of them, must not keep the old ones.
    for parameter in model.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    eager_after, compiled_after = both(prompts[0])
    assert not torch.equal(eager_after, eager)
    assert torch.equal(compiled_after, eager_after)
    assert _compilations(model) == 2


def test_several_compiled_models_in_one_process_each_run_compiled(caplog):
    """dynamo keeps compiled graphs per code object and refuses (fullgraph) or runs uncompiled a frame past
    `recompile_limit` of them; every module's `__call__` is one code object, so all compiled models (and every
    recompilation for new weights) used to share one limit. With the limit at 1, each model's step must still run
    compiled — each is a function of its own."""
    family = DECODERS[0]
    prompt = torch.randint(3, 99, (1, 5))
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = family.causal_lm_class(family.tiny_config()).eval()
        models.append(enable_compiled_decoding(model, ahead_of_time=False))  # torch.compile's recompile limit
    with torch._dynamo.config.patch(recompile_limit=1), caplog.at_level(logging.WARNING, "lmblocks.decoding"):
        for model in models * 2:
            backend = model.generation_config.compile_config.backend
            steps = backend.steps
            eager = model.generate(prompt, disable_compile=True, cache_implementation="dynamic", **kwargs)
            assert torch.equal(model.generate(prompt, **kwargs), eager)
            assert backend.steps == steps + kwargs["max_new_tokens"] - 1  # every step after the prefill, compiled
    assert "ran uncompiled" not in caplog.text


FACTOR = 2.0  # read by the compiled function below: dynamo guards on its value


def test_within_a_generation_calls_with_the_same_arguments_skip_the_guard_checks():
    """`reuse_guard_checks`: a call whose arguments match the last checked call's skips dynamo's guards (so a change
    only a guard would see goes unseen: the global below — why it is used for the tokens of one generation only); a
    call with other arguments (another shape, another object, another number) is checked and gets its own graph."""
    global FACTOR

    def scaled(x, cache, position):
        return x * FACTOR + position

    class CountingEager:  # dynamo's "eager" backend, counting the runs of what it compiled
        runs = 0

        def __call__(self, graph_module, example_inputs):
            def run(*args):
                self.runs += 1
                return graph_module(*args)
            return run

    def reused(function):
        backend = CountingEager()
        compiled = torch.compile(function, backend=backend, fullgraph=True, dynamic=False)
        return reuse_guard_checks(compiled, lambda: backend.runs)

    FACTOR = 2.0
    call = reused(scaled)
    cache, other_cache = object(), object()
    assert torch.equal(call(torch.ones(2), cache, 1), torch.full((2,), 3.0))
    FACTOR = 5.0
    assert torch.equal(call(torch.ones(2), cache, 1), torch.full((2,), 3.0)), "the guards were checked"
    assert torch.equal(call(torch.ones(3), cache, 1), torch.full((3,), 6.0))  # another shape: checked
    assert torch.equal(call(torch.ones(3), other_cache, 1), torch.full((3,), 6.0))
    FACTOR = 7.0
    assert torch.equal(call(torch.ones(3), other_cache, 2), torch.full((3,), 9.0))  # another number: checked
    fresh = reused(scaled)
    assert torch.equal(fresh(torch.ones(3), cache, 2), torch.full((3,), 9.0))  # a new generation checks first
    with torch.compiler.set_stance("force_eager"):  # run eagerly: nothing to reuse, every call goes through dynamo
        FACTOR = 1.0
        assert torch.equal(fresh(torch.ones(4), cache, 2), torch.full((4,), 3.0))
        assert torch.equal(fresh(torch.ones(4), cache, 2), torch.full((4,), 3.0))


def test_a_step_that_runs_uncompiled_is_logged(caplog):
    """No silent fallback: when dynamo runs the step eagerly (here: told to by `torch.compiler.set_stance`), a
    warning says so."""
    family = DECODERS[0]
    model = enable_compiled_decoding(family.causal_lm_class(family.tiny_config()).eval(), ahead_of_time=False)
    prompt = torch.randint(3, 99, (1, 5))
    with torch.compiler.set_stance("force_eager"), caplog.at_level(logging.WARNING, "lmblocks.decoding"):
        model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert "ran uncompiled" in caplog.text


_SECOND_PROCESS = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from torch._dynamo.utils import counters
from families import DECODERS
from lmblocks.decoding import enable_compiled_decoding
family = [f for f in DECODERS if f.name == "llama"][0]
torch.manual_seed(int(sys.argv[1]))  # other weights each time: the cache holds the code, the model its weights
model = enable_compiled_decoding(family.causal_lm_class(family.tiny_config()).eval(), weights=sys.argv[2],
                                 ahead_of_time=False)
prompt = torch.randint(3, 99, (1, 5))
compiled = model.generate(prompt, max_new_tokens=5, do_sample=False)
eager = model.generate(prompt, max_new_tokens=5, do_sample=False, disable_compile=True, cache_implementation="dynamic")
print(json.dumps({{"same": torch.equal(compiled, eager), **counters["inductor"]}}))
"""


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_a_new_process_reuses_the_compiled_step_from_the_disk_cache(tmp_path, weights):
    """inductor's FX graph cache holds the compiled step although its weights are frozen into the graph (keyed by
    their shapes, read from the model at load): a second process with other weights loads it (a cache hit) and
    decodes with its own weights. bf16 too where lmblocks' packed bf16 kernel runs (elsewhere oneDNN's packed
    weights keep bf16 out of the cache)."""
    if weights == "bf16" and not decoding.packed_kernel_available(torch.bfloat16):
        pytest.skip("bf16 products are oneDNN's here: its packed weights cannot be cached")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = _SECOND_PROCESS.format(tests=os.path.dirname(__file__))
    runs = []
    for seed in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, seed, weights], env=env, capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["same"] and runs[1]["same"]
    assert runs[0].get("fxgraph_cache_miss") == 1 and "fxgraph_cache_bypass" not in runs[0], runs[0]
    assert runs[1].get("fxgraph_cache_hit") == 1, runs[1]


_FLOAT32_THEN_BF16 = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from torch._dynamo.utils import counters
from families import DECODERS
from lmblocks import decoding
from lmblocks.decoding import enable_compiled_decoding
decoding.kernel_runs = lambda dtype: False  # a CPU without AVX-512: MKL and oneDNN products, bf16 packed
family = [f for f in DECODERS if f.name == "llama"][0]
prompt = torch.randint(3, 99, (1, 5))
packed = []
for weights in ("fp32", "bf16"):
    model = enable_compiled_decoding(family.causal_lm_class(family.tiny_config()).eval(), weights=weights,
                                     ahead_of_time=False)  # torch.compile's step: a packaged one packs no oneDNN weights
    model.generate(prompt, max_new_tokens=3, do_sample=False)
    packed.append(counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"])
print(json.dumps(packed))
"""


def test_bf16_weights_are_packed_after_a_float32_model_compiled_in_the_same_process(tmp_path):
    """inductor registers its oneDNN weight-packing patterns once per process, at the first frozen compilation, and
    only if prepacking is on then: a bf16 step compiled after a float32 one (prepacking off) got no packed products
    (1.6 times slower for SmolLM2-135M). `frozen_weights` registers them for bf16. On a CPU without AVX-512 BF16
    (forced here), where bf16 products stay oneDNN's. A fresh process: in this one an earlier test may have
    registered them already."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = _FLOAT32_THEN_BF16.format(tests=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    after_fp32, after_bf16 = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_fp32 == 0, "float32 weights were packed (they would keep the step out of the on-disk cache)"
    assert after_bf16 > after_fp32, "the bf16 step was compiled without packed weights"


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_weight_formats(weights):
    """bf16 and int8 weights: compiled == eager tokens in that format, and (on the test prompts of a tiny model) the
    same 32 greedy tokens as float32."""
    family = [f for f in DECODERS if f.name == "llama"][0]
    torch.manual_seed(0)
    model = family.causal_lm_class(family.tiny_config()).eval()
    prompts = torch.randint(3, 99, (2, 6))
    kwargs = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    fp32 = model.generate(prompts, **kwargs)
    enable_compiled_decoding(model, weights=weights)
    if weights == "int8":
        assert not any(type(m) is torch.nn.Linear for m in model.modules())
        assert any(isinstance(m, Int8Linear) for m in model.modules())
    else:
        assert model.dtype == torch.bfloat16
        assert model.config._attn_implementation == "lmblocks_cpu_decoding"
    eager = model.generate(prompts, disable_compile=True, cache_implementation="dynamic", **kwargs)
    assert torch.equal(model.generate(prompts, **kwargs), eager)
    assert torch.equal(eager, fp32)


def test_saving_a_model_after_enabling_compiled_decoding(tmp_path):
    """The generation config holds the compiled step's backend; transformers prints, hashes and saves generation
    configs through JSON, which used to fail on it (`save_pretrained` raised TypeError). The saved config loads back
    without the compile settings (transformers leaves `compile_config` out of generation_config.json). A model with
    int8 layers is refused: from_pretrained would rebuild them from random weights."""
    family = [f for f in DECODERS if f.name == "llama"][0]
    torch.manual_seed(0)
    model = enable_compiled_decoding(family.causal_lm_class(family.tiny_config()).eval())
    assert "FrozenWeightsInductor" in repr(model.generation_config.compile_config)
    json.loads(model.generation_config.to_json_string())
    model.save_pretrained(tmp_path / "fp32")
    loaded = family.causal_lm_class.from_pretrained(tmp_path / "fp32")
    assert loaded.generation_config.compile_config is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    convert_weights(model, "int8")
    with pytest.raises(ValueError, match="int8 decoding layers"):
        model.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_cache_buckets():
    assert [cache_bucket(n) for n in (1, 256, 257, 600, 5000)] == [256, 256, 512, 1024, 8192]
    assert [cache_bucket(n, positions=8192) for n in (100, 5000, 8192)] == [256, 8192, 8192]
    assert cache_bucket(100, positions=64) == 100  # longer than the model's positions: as asked (generate refuses it)
    assert cache_bucket(40, positions=64) == 64


def test_int8_linear_is_close_to_the_float_product():
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    quantized = Int8Linear(linear)
    assert quantized.weight_int8.dtype == torch.int8 and quantized.scales.shape == (48,)
    error = (quantized(x) - linear(x)).norm() / linear(x).norm()
    assert error < 0.02, error
    with pytest.raises(ValueError, match="weights='fp8' is not one of fp32, bf16, int8"):
        convert_weights(copy.deepcopy(torch.nn.Sequential(linear)), "fp8")


def _no_grad_add(model):
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)


def _one_element_through_data(model):
    parameter = list(model.parameters())[-1]
    parameter.data.view(-1)[7] = torch.nextafter(parameter.data.view(-1)[7], torch.tensor(float("inf")))


def _load_state_dict(model):
    state = {key: value.clone() for key, value in model.state_dict().items()}
    state[[name for name, _ in model.named_parameters()][1]] += 1e-3  # not the tied embeddings: lm_head's copy wins
    model.load_state_dict(state)


@pytest.mark.parametrize("change", [_no_grad_add, _one_element_through_data, _load_state_dict, lambda m: m.half()],
                         ids=["no_grad add_", "one element by 1 ulp via .data", "load_state_dict", "half()"])
def test_weights_stamp_sees_every_change(change):
    """The stamp `get_compiled_call` compares before reusing a frozen graph, on every path that changes weights."""
    model = DECODERS[0].causal_lm_class(DECODERS[0].tiny_config())
    stamp = weights_stamp(model)
    assert weights_stamp(model) == stamp  # reading it changes nothing
    change(model)
    assert weights_stamp(model) != stamp


def test_refuses_models_without_static_cache_support():
    from families import BERT

    with pytest.raises(ValueError, match="static-cache"):
        enable_compiled_decoding(BERT.base_class(BERT.tiny_config()))
