"""llama.cpp on lmblocks' GGUF exports (`make test-gguf`).

They run with `.venv-llamacpp` (`make llama-cpp-env`: torch, lmblocks, and llama-cpp-python built from source), where
lmblocks exports and transformers computes the reference in the same process as llama.cpp. Without llama-cpp-python
the folder skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="llama-cpp-python is not installed here: run `make test-gguf`")
        for item in items:
            item.add_marker(skip)
