"""Real clients that are too heavy for `.venv` (`make test-gguf` runs this folder in `.venv-llamacpp` after
tests_gguf/): lm-evaluation-harness. Without `lm_eval` the folder skips."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        skip = pytest.mark.skip(reason="lm-eval is not installed here: run `make test-gguf`")
        for item in items:
            item.add_marker(skip)
