"""Shared test set-up: make transformers' common test mixins importable and keep runs deterministic and quiet."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
HF_TESTS_DIR = REPO_ROOT / ".cache" / "hf_tests"

# `scripts/fetch_assets.py` (run by `make test`) lays transformers' common tests out as the package
# `hf_common_tests`; tests import them as `from hf_common_tests.test_modeling_common import ModelTesterMixin`.
if str(HF_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(HF_TESTS_DIR))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def without_packed_kernels(monkeypatch):
    """A CPU where lmblocks' packed float kernels do not run (no AVX-512): MKL's and oneDNN's products stay."""
    from lmblocks import decoding

    monkeypatch.setattr(decoding, "kernel_runs", lambda dtype: False)
    decoding.packed_kernel_available.cache_clear()
    yield
    monkeypatch.undo()
    decoding.packed_kernel_available.cache_clear()


@pytest.fixture(autouse=True)
def _seed():
    import torch
    from transformers import set_seed

    set_seed(0)
    torch.set_num_threads(1)
    yield
