"""The decoding step compiled ahead of time (lmblocks.packaged_step): the same tokens as eager decoding for every
decoder family, one package for every prompt length and `max_new_tokens` of a cache bucket, weight updates followed
without compiling again, a new process that loads the package instead of compiling, a package that holds no weights,
staged writes, and calls a package cannot serve left to torch.compile's step.

Float products that lmblocks' kernel does not take (a CPU without AVX-512) are ATen's inside the package
(`test_aten_products_are_packaged_too`); only int8 layers outside the kernel's layout leave a model to
torch.compile's step (tests/test_decoding.py), and these tests skip."""

import json
import logging
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from torch._inductor import codecache
from transformers import DynamicCache

from families import DECODERS
from lmblocks import packaged_step, step_parts
from lmblocks.background_build import BackgroundBuild
from lmblocks.decoding import enable_compiled_decoding
from lmblocks.packaged_step import package_folder, packable_call, packaged_products

LLAMA = [f for f in DECODERS if f.name == "llama"][0]


def packaged(model):
    if not packaged_products(model):
        pytest.skip("lmblocks' kernels do not take this model's products here: torch.compile's step (test_decoding)")
    return model


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    return tmp_path


def _both(model, prompt, new_tokens):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    eager = model.generate(prompt, disable_compile=True, cache_implementation="dynamic", **kwargs)
    return eager, model.generate(prompt, **kwargs)


@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_packaged_step_matches_eager_compiles_once_and_follows_weight_updates(family, cache_dir):
    torch.manual_seed(0)
    model = packaged(enable_compiled_decoding(family.causal_lm_class(family.tiny_config()).eval()))
    backend = model.generation_config.compile_config.backend
    prompts = [torch.randint(3, 99, (1, 5)), torch.randint(3, 99, (1, 11), generator=torch.Generator().manual_seed(1))]
    codecache._precompile_header.cache_clear()
    eager, compiled = _both(model, prompts[0], 6)
    assert torch.equal(compiled, eager)
    assert backend.compilations == 1 and backend.steps == 5, "generate did not run the packaged step"
    # Inductor asked for the very headers made ahead (`headers_compiled_ahead`): two calls each, two distinct ones
    # (both calls are misses when inductor asks while the thread still builds them: it then waits on their file lock).
    headers = codecache._precompile_header.cache_info()
    assert headers.currsize == 2 and headers.hits + headers.misses == 4, headers
    packages = list(package_folder().glob("*.pt2"))
    assert len(packages) == 1 and packages[0].stat().st_size < 2**25, "one package, without the weights"
    with zipfile.ZipFile(packages[0]) as package:  # built without the input checks (`without_input_checks`)
        wrapper = next(package.read(name).decode() for name in package.namelist() if name.endswith("wrapper.cpp"))
    assert "__check_inputs_outputs" in wrapper and "check_input_0" not in wrapper
    assert "assert_size_stride(" not in wrapper
    for prompt, new_tokens in ((prompts[1], 6), (prompts[0], 13), (prompts[1], 20)):
        assert torch.equal(*_both(model, prompt, new_tokens))
    assert backend.compilations == 1, "another prompt length or max_new_tokens compiled again"

    # Weights changed in place (through `.data`: neither address nor version counter move): the step reads the new
    # ones — packed again, not compiled again.
    for parameter in model.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    eager_after, compiled_after = _both(model, prompts[0], 6)
    assert not torch.equal(eager_after, eager)
    assert torch.equal(compiled_after, eager_after)
    assert backend.compilations == 1


def test_small_tensors_are_read_when_the_step_runs(cache_dir):
    """Inductor writes the values of 0-d and small 1-D tensors into the code it generates; a package must read them
    when it runs instead, as every other weight (another model's, or these after an update). The tiny LLaMA's
    rotary frequencies (head size 16: 8 values) changed in place: the packaged step follows eager decoding."""
    torch.manual_seed(0)
    model = LLAMA.causal_lm_class(LLAMA.tiny_config()).eval()
    for layer in model.model.layers:  # sharp attention, so that positions (the rotary frequencies) change tokens
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            projection.weight.data.mul_(40)
    model = packaged(enable_compiled_decoding(model))
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.numel() <= 8
    prompt = torch.randint(3, 99, (1, 12))
    before, compiled = _both(model, prompt, 12)
    assert torch.equal(compiled, before)
    rotary.inv_freq.copy_(torch.linspace(0.5, 3.0, rotary.inv_freq.numel()))
    eager, compiled = _both(model, prompt, 12)
    assert not torch.equal(eager, before), "the frequencies do not change these tokens: the test would prove nothing"
    assert torch.equal(compiled, eager)
    assert model.generation_config.compile_config.backend.compilations == 1


_SECOND_PROCESS = """
import json, logging, sys, torch
sys.path.insert(0, {tests!r})
from families import DECODERS
from lmblocks.decoding import enable_compiled_decoding
logging.basicConfig(level=logging.WARNING)
logging.getLogger("lmblocks.packaged_step").setLevel(logging.INFO)
family = [f for f in DECODERS if f.name == "llama"][0]
torch.manual_seed(int(sys.argv[1]))  # other weights each time: the package holds the code, the model its weights
config = family.tiny_config(intermediate_size=192)  # int8: every product's inputs a multiple of 64 (the kernel's)
if sys.argv[1] == "0":  # the first process also has the other format's kernels loaded (a notebook comparing both)
    enable_compiled_decoding(family.causal_lm_class(config).eval(), weights="fp32" if sys.argv[2] == "int8" else "int8")
model = enable_compiled_decoding(family.causal_lm_class(config).eval(), weights=sys.argv[2])
prompt = torch.randint(3, 99, (1, 5))
compiled = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
eager = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, disable_compile=True,
                       cache_implementation="dynamic")
backend = model.generation_config.compile_config.backend
print(json.dumps({{"same": torch.equal(compiled, eager), "compilations": backend.compilations,
                  "steps": backend.steps}}))
"""


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_a_new_process_loads_the_package_instead_of_compiling(tmp_path, weights):
    """The second process (other weights) compiles nothing: it loads the first one's package, says so, and decodes
    with its own weights — although the first one had loaded kernels the second one never loads."""
    config = LLAMA.tiny_config(intermediate_size=192)
    if not packaged_products(enable_compiled_decoding(LLAMA.causal_lm_class(config), weights=weights)):
        pytest.skip("lmblocks' kernels do not take these products here")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = _SECOND_PROCESS.format(tests=os.path.dirname(__file__))
    runs, logs = [], []
    for seed in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code, seed, weights], env=env, capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        logs.append(out.stderr)
    assert runs[0] == {"same": True, "compilations": 1, "steps": 4}, runs[0]
    assert runs[1] == {"same": True, "compilations": 0, "steps": 4}, runs[1]
    assert "Compiling LmbLlamaForCausalLM's decoding step ahead of time" in logs[0]
    assert "Loading LmbLlamaForCausalLM's decoding step from" in logs[1] and "Compiling" not in logs[1]
    assert not list((tmp_path / "lmblocks_packaged_steps").glob("*partial*"))


_WITHOUT_FLOAT_KERNELS = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from families import DECODERS
from lmblocks import decoding
from lmblocks.packaged_step import PackedLinear, TransposedLinear
decoding.kernel_runs = lambda dtype: False  # a CPU without AVX-512: ATen's float products
family = [f for f in DECODERS if f.name == "llama"][0]
result = {{}}
for weights in ("fp32", "bf16"):
    torch.manual_seed(0)
    model = decoding.enable_compiled_decoding(family.causal_lm_class(family.tiny_config()).eval(), weights=weights)
    prompt = torch.randint(3, 99, (1, 5))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    eager = model.generate(prompt, disable_compile=True, cache_implementation="dynamic", **kwargs)
    compiled = model.generate(prompt, **kwargs)
    backend = model.generation_config.compile_config.backend
    layers = [type(layer).__name__ for *_, layer in model._packaged_steps.packed.places]
    result[weights] = [torch.equal(compiled, eager), backend.compilations, backend.steps, layers]
print(json.dumps(result))
"""


def test_aten_products_are_packaged_too(tmp_path):
    """Where lmblocks' float kernels do not run, the packaged step does ATen's products on the model's own weights
    (a new process loads it in about a second, not torch.compile's 14-16 s of tracing), float32 products on a
    contiguous transposed copy of its wide weights (`TransposedLinear`); the same tokens as eager, in float32 and
    bf16."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = _WITHOUT_FLOAT_KERNELS.format(tests=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fp32"][:3] == [True, 1, 5], result
    assert result["fp32"][3] and set(result["fp32"][3]) == {"TransposedLinear"}, result  # gate and up: 176 > 2 x 64
    assert result["bf16"] == [True, 1, 5, []], result
    assert len(list((tmp_path / "lmblocks_packaged_steps").glob("*.pt2"))) == 2


def test_a_step_compiled_in_the_background(cache_dir, caplog):
    """`background=True`: the first generate decodes eagerly while a new process compiles the package (from a model
    it rebuilds with random weights: the package holds no weights); the first call after the package is written
    loads it. Another model that needs the same package meanwhile waits for that build; the build's files are gone
    after it."""
    torch.manual_seed(0)
    config = LLAMA.tiny_config(intermediate_size=192)
    model = packaged(enable_compiled_decoding(LLAMA.causal_lm_class(config).eval(), weights="int8", background=True))
    backend = model.generation_config.compile_config.backend
    prompt = torch.randint(3, 99, (1, 5))
    with caplog.at_level(logging.INFO, logger="lmblocks"):
        eager, first = _both(model, prompt, 6)
    assert torch.equal(first, eager) and backend.steps == 0, "the first generate waited for the build"
    assert "Compiling LmbLlamaForCausalLM's decoding step in a background process" in caplog.text
    (build,) = model._packaged_steps.values()

    # Another model that needs the same package meanwhile waits for that build instead of starting its own.
    other = enable_compiled_decoding(LLAMA.causal_lm_class(config).eval(), weights="int8", background=True)
    other_prompt = torch.randint(3, 99, (1, 5))
    other_eager, other_first = _both(other, other_prompt, 6)
    assert torch.equal(other_first, other_eager)
    (waiting,) = other._packaged_steps.values()
    if isinstance(waiting, BackgroundBuild):  # (else the build was over already: the package was loaded)
        assert waiting.process is None, "a second build of the same package started"

    build.wait()
    # Its files gone with the build, before this process looks (a script may have exited before the build's end).
    assert [p.suffix for p in package_folder().iterdir()] == [".pt2"], list(package_folder().iterdir())
    assert torch.equal(model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False), eager)
    assert backend.compilations == 1 and backend.steps == 5
    assert [p.suffix for p in package_folder().iterdir()] == [".pt2"], list(package_folder().iterdir())
    if isinstance(waiting, BackgroundBuild):
        waiting.wait()
    other_backend = other.generation_config.compile_config.backend
    steps_before = other_backend.steps
    other_compiled = other.generate(other_prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(other_compiled, other_eager)
    assert other_backend.steps - steps_before == 5, "the other model did not load the package"
    assert [p.suffix for p in package_folder().iterdir()] == [".pt2"], "one package, compiled once"


def test_a_model_the_background_process_cannot_rebuild_is_compiled_here(cache_dir, caplog):
    """A model changed after it was made (an activation swapped: no weights, the same config) is another step than
    the one a new process rebuilds from its class and config: that process says so and writes nothing, and the step
    is compiled here, with the swapped activation."""
    torch.manual_seed(0)
    model = packaged(enable_compiled_decoding(LLAMA.causal_lm_class(LLAMA.tiny_config()).eval(), background=True))
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    prompt = torch.randint(3, 99, (1, 5))
    eager, first = _both(model, prompt, 6)
    (build,) = model._packaged_steps.values()
    build.wait()
    log = build.log.read_text()
    assert "would compile another package" in log
    with caplog.at_level(logging.WARNING, logger="lmblocks"):
        assert torch.equal(model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False), eager)
    assert f"wrote no package (see {build.log}); compiling it here" in caplog.text
    assert model.generation_config.compile_config.backend.compilations == 1


def test_a_package_that_fails_falls_back_to_torch_compile_and_leaves_no_file(cache_dir, monkeypatch, caplog):
    """An export or AOTInductor failure: no package (nor half of one) on disk, a warning that names the error, and
    decoding goes on with torch.compile's step, the same tokens."""
    torch.manual_seed(0)
    model = packaged(enable_compiled_decoding(LLAMA.causal_lm_class(LLAMA.tiny_config()).eval()))

    def fails(program, package_path):
        with open(package_path, "wb") as half:
            half.write(b"PK half a package")
        raise RuntimeError("the C++ compiler ran out of memory")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fails)
    prompt = torch.randint(3, 99, (1, 5))
    with caplog.at_level(logging.WARNING, "lmblocks.packaged_step"):
        eager, compiled = _both(model, prompt, 4)
    assert torch.equal(compiled, eager)
    assert "could not be compiled ahead of time (RuntimeError: the C++ compiler ran out of memory)" in caplog.text
    assert not list(package_folder().glob("*")), "a failed build left a file"
    assert model.generation_config.compile_config.backend.compilations == 1  # torch.compile's


def test_what_a_package_serves():
    """Keyword calls with a static cache and the inputs generate passes; anything else (positional arguments, a
    dynamic cache, outputs a package does not return, inputs it does not take) is left to torch.compile's step."""
    model = LLAMA.causal_lm_class(LLAMA.tiny_config()).eval()
    prompt = torch.randint(3, 99, (1, 5))
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=16)
    model(input_ids=prompt, past_key_values=cache, use_cache=True)
    step = dict(input_ids=prompt[:, :1], position_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 1, 1, 16,
                dtype=torch.bool), past_key_values=cache, use_cache=True, return_dict=True, logits_to_keep=1)
    assert packable_call((), step) == ((("input_ids", None), ("position_ids", None), ("attention_mask", None)),
                                       {"logits_to_keep": 1})
    by_layer_type = {"full_attention": step["attention_mask"], "sliding_attention": step["attention_mask"]}
    assert packable_call((), {**step, "attention_mask": by_layer_type})[0][2:] == (
        ("attention_mask", "full_attention"), ("attention_mask", "sliding_attention"))
    assert packable_call((prompt,), {k: v for k, v in step.items() if k != "input_ids"}) is None
    assert packable_call((), {**step, "past_key_values": DynamicCache()}) is None
    assert packable_call((), {**step, "output_attentions": True}) is None
    assert packable_call((), {**step, "inputs_embeds": torch.zeros(1, 1, 8)}) is None
    assert packable_call((), {**step, "use_cache": False}) is None
    fresh = StaticCache(config=model.config, max_cache_len=16)  # not initialized (no prefill yet)
    assert packable_call((), {**step, "past_key_values": fresh}) is None
    assert packaged_step.static_cache_tensors(cache)[0] is cache.layers[0].keys


def test_a_damaged_package_is_compiled_again_in_its_place(cache_dir, caplog):
    """A package file that does not load (damaged on disk; lmblocks' own writes are staged) is named in a warning and
    replaced by a new compilation; decoding gives eager's tokens."""
    torch.manual_seed(0)
    model = packaged(enable_compiled_decoding(LLAMA.causal_lm_class(LLAMA.tiny_config()).eval()))
    prompt = torch.randint(3, 99, (1, 5))
    _both(model, prompt, 3)
    (package,) = package_folder().glob("*.pt2")
    package.write_bytes(b"PK not a package")
    model = enable_compiled_decoding(LLAMA.causal_lm_class(LLAMA.tiny_config()).eval())  # the same key
    with caplog.at_level(logging.WARNING, "lmblocks.packaged_step"):
        eager, compiled = _both(model, prompt, 3)
    assert torch.equal(compiled, eager)
    assert f"The package {package} could not be loaded" in caplog.text
    assert model.generation_config.compile_config.backend.compilations == 1
    assert package.stat().st_size > 1000


@pytest.fixture
def in_two_parts(monkeypatch):
    """Steps compiled in two parts (`lmblocks.step_parts`) from the tiny models' two layers, on any machine."""
    monkeypatch.setattr(step_parts, "MIN_LAYERS", 2)
    monkeypatch.setattr(step_parts, "usable_cores", lambda: 2)


@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_a_step_compiled_in_two_parts_side_by_side(family, cache_dir, in_two_parts):
    """A step compiled in two halves at once, one by a forked copy of this process: eager's tokens, one compilation,
    two packages and nothing else left; the weights updated in place are followed by both parts."""
    torch.manual_seed(0)
    model = packaged(enable_compiled_decoding(family.causal_lm_class(family.tiny_config()).eval()))
    prompt = torch.randint(3, 99, (1, 5))
    eager, compiled = _both(model, prompt, 6)
    assert torch.equal(compiled, eager)
    backend = model.generation_config.compile_config.backend
    assert backend.compilations == 1 and backend.steps == 5
    (step,) = model._packaged_steps.values()
    assert len(step.runners) == 2
    files = sorted(path.name for path in package_folder().iterdir())
    assert len(files) == 2 and files[0].endswith(".part0.pt2") and files[1] == files[0].replace(".part0", ""), files
    for parameter in model.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    eager_after, compiled_after = _both(model, prompt, 6)
    assert not torch.equal(eager_after, eager)
    assert torch.equal(compiled_after, eager_after)
    assert backend.compilations == 1


def _fail(step, example, path):
    raise RuntimeError("no room left on the device")


def _hang(step, example, path):
    while True:
        time.sleep(1)


@pytest.mark.parametrize("trouble, said", [(_fail, "RuntimeError: no room left on the device; its log:"),
                                           (_hang, "stopped: it did not finish in time")], ids=["fails", "hangs"])
def test_a_part_the_forked_copy_does_not_compile_is_compiled_here(trouble, said, cache_dir, in_two_parts, monkeypatch,
                                                                  caplog):
    """A forked copy that fails (reported with the last line of its log) or is still running past its deadline
    (`step_parts.GRACE` after twice this process's own part: killed): its part is compiled by this process."""
    parent, compile_part = os.getpid(), packaged_step.export_and_package

    def in_the_copy_only(step, example, path):
        (compile_part if os.getpid() == parent else trouble)(step, example, path)

    monkeypatch.setattr(packaged_step, "export_and_package", in_the_copy_only)
    monkeypatch.setattr(step_parts, "GRACE", 1.0)
    torch.manual_seed(0)
    model = packaged(enable_compiled_decoding(LLAMA.causal_lm_class(LLAMA.tiny_config()).eval()))
    with caplog.at_level(logging.WARNING, logger="lmblocks.step_parts"):
        assert torch.equal(*_both(model, torch.randint(3, 99, (1, 5)), 4))
    assert f"Compiling a part of the decoding step in a forked process failed ({said}" in caplog.text
    assert len(list(package_folder().glob("*.pt2"))) == 2 and not list(package_folder().glob("*.log"))
