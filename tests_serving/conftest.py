"""Serving tests: lmblocks checkpoints in vLLM, and their remote code in the oldest transformers lmblocks supports.

They run with the vLLM venv's Python (`make test-serving`): vLLM 0.32 (CPU) and transformers 5.16.1, without
lmblocks installed. The checkpoints are built once per session by `build_checkpoints.py` in lmblocks' own venv
(transformers 5.23), which also records what transformers computes on them; the tests compare with that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# lmblocks' own venv (made by `make env`); LMBLOCKS_PYTHON overrides it.
LMBLOCKS_PYTHON = os.environ.get("LMBLOCKS_PYTHON", str(REPO_ROOT / ".venv" / "bin" / "python"))
BUILD_TIMEOUT_S = 600

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB


def _served_families() -> dict[str, list[str]]:
    """lmblocks' families, asked of lmblocks' own venv (lmblocks is not installed here): decoders and encoders."""
    out = subprocess.run([LMBLOCKS_PYTHON, str(Path(__file__).with_name("build_checkpoints.py")), "--families"],
                         check=True, timeout=BUILD_TIMEOUT_S, cwd=REPO_ROOT, capture_output=True, text=True).stdout
    return json.loads(out)


def pytest_generate_tests(metafunc) -> None:
    """A test that takes `family` runs for every decoder of `lmblocks.FAMILIES`, one that takes `encoder` for every
    encoder: a new family is served and tested with no edit here."""
    wanted = [name for name in ("family", "encoder") if name in metafunc.fixturenames]
    if wanted:
        served = _served_families()
        for name in wanted:
            metafunc.parametrize(name, served["decoders" if name == "family" else "encoders"])


@pytest.fixture(scope="session")
def served() -> dict[str, list[str]]:
    """The decoders and encoders of `lmblocks.FAMILIES` (for a test that needs one of each, whichever)."""
    return _served_families()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Path:
    """The folder holding one folder per family and expected.json (see build_checkpoints.py)."""
    out = tmp_path_factory.mktemp("checkpoints")
    subprocess.run([LMBLOCKS_PYTHON, str(Path(__file__).with_name("build_checkpoints.py")), str(out)],
                   check=True, timeout=BUILD_TIMEOUT_S, cwd=REPO_ROOT)
    return out


@pytest.fixture(scope="session")
def expected(checkpoints) -> dict:
    return json.loads((checkpoints / "expected.json").read_text())


def run_vllm_offline(task: str, checkpoint: Path, request: dict, tmp_path: Path, timeout: int = 600,
                     extra: tuple[str, ...] = ()) -> dict:
    """Runs vllm_offline.py (vLLM's engine) in a subprocess of this Python; returns its result, or fails the test
    with the tail of vLLM's log."""
    request_path, result_path, log_path = tmp_path / "request.json", tmp_path / "result.json", tmp_path / "vllm.log"
    request_path.write_text(json.dumps(request))
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("vllm_offline.py")), task, str(checkpoint),
             str(request_path), str(result_path), *extra],
            stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=tmp_path,
        )
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-40:])
        pytest.fail(f"vLLM exited with {proc.returncode}:\n{tail}")
    return json.loads(result_path.read_text())
