"""A checkpoint saved by lmblocks (under transformers 5.23) loads and computes the same in the oldest transformers
lmblocks supports, where lmblocks is not installed: only the code the checkpoint carries runs."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

# The oldest transformers the checkpoints' remote code supports (README, setup.cfg); the Makefile's vllm-env pins it.
OLDEST_SUPPORTED = Version("5.16.1")


def test_this_environment_is_the_oldest_supported_without_lmblocks():
    assert importlib.util.find_spec("lmblocks") is None, (
        "lmblocks is importable here, so these tests would not prove the checkpoints' own code: run them with "
        "`make test-serving` (.venv-vllm/bin/pytest from the repository root, not `python -m pytest`)."
    )
    assert Version(transformers.__version__) == OLDEST_SUPPORTED


def test_causal_lm_generates_the_same_tokens(family, checkpoints, expected):
    path = checkpoints / family
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # GPT-2's and LLaMA's tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(expected[family]["prompts"], return_tensors="pt", padding=True)
    new_tokens = len(expected[family]["tokens"][0])
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert out[:, batch["input_ids"].shape[1]:].tolist() == expected[family]["tokens"]


def test_encoder_gives_the_same_embeddings(checkpoints, expected, encoder):
    path = checkpoints / encoder
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    batch = tokenizer(expected[encoder]["texts"], return_tensors="pt", padding=True)
    with torch.no_grad():
        cls = model(**batch).last_hidden_state[:, 0]
    torch.testing.assert_close(torch.nn.functional.normalize(cls, dim=-1),
                               torch.tensor(expected[encoder]["cls_embeddings"]), atol=1e-5, rtol=1e-4)


def test_compiled_decoding_in_the_background_from_the_checkpoints_own_code(checkpoints, tmp_path, monkeypatch):
    """`enable_compiled_decoding(background=True)` from the code the checkpoint carries: the process that compiles
    the package imports that code (`transformers_modules....background_build`), not lmblocks, and builds the same
    package; the first generate decodes eagerly, the one after the build the package's tokens, the same."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(checkpoints / "llama", trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules.")
    decoding = importlib.import_module(type(model).__module__.rsplit(".", 1)[0] + ".decoding")
    decoding.enable_compiled_decoding(model, background=True)
    prompt = torch.randint(3, 50, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    eager = model.generate(prompt, disable_compile=True, cache_implementation="dynamic", **kwargs)
    assert torch.equal(model.generate(prompt, **kwargs), eager)
    (build,) = model._packaged_steps.values()
    build.wait()
    assert torch.equal(model.generate(prompt, **kwargs), eager)
    backend = model.generation_config.compile_config.backend
    assert (backend.compilations, backend.steps) == (1, 5), build.log.read_text() if build.log.exists() else ""
