"""`scripts/serve.py`: `vllm serve` on 127.0.0.1 answers OpenAI-style `/v1/completions` with transformers' greedy
tokens; folders it cannot serve get one `error:` line and exit code 2 without starting vLLM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SERVE = REPO_ROOT / "scripts" / "serve.py"
START_TIMEOUT_S = 420  # vLLM's start-up on 2 busy cores: imports in three processes, then the model
REQUEST_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def _wait_until_healthy(proc: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    pytest.fail(f"the server did not become healthy within {START_TIMEOUT_S} s:\n{_tail(log_path)}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM's API server and the engine processes it started), then SIGKILL
    if it has not exited in STOP_TIMEOUT_S."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)


def _tail(log_path: Path, lines: int = 40) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def test_vllm_serve_answers_completions(family, checkpoints, expected, tmp_path):
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    command = [sys.executable, str(SERVE), str(checkpoints / family), "--port", str(port), "--dtype", "float32",
               "--kv-cache-gib", "1", "--", "--enforce-eager", "--max-model-len", "256"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        _wait_until_healthy(proc, base_url, log_path)
        want = expected[family]
        new_tokens = len(want["tokens"][0])
        response = _post(f"{base_url}/v1/completions", {
            "model": str(checkpoints / family),
            "prompt": want["prompts"],
            "max_tokens": new_tokens,
            "min_tokens": new_tokens,
            "temperature": 0.0,
            "return_token_ids": True,
        })
        choices = sorted(response["choices"], key=lambda choice: choice["index"])
        assert [choice["token_ids"] for choice in choices] == want["tokens"]
        assert all(choice["text"] for choice in choices)
        assert response["usage"]["completion_tokens"] == new_tokens * len(want["prompts"])
    finally:
        _stop(proc)
    assert proc.returncode is not None


def _serve_error(*args: str) -> str:
    """Runs serve.py with args that must be refused; returns its one error line."""
    proc = subprocess.run([sys.executable, str(SERVE), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_serve_refuses_what_vllm_cannot_serve(checkpoints, served, tmp_path):
    decoder, encoder = checkpoints / served["decoders"][0], checkpoints / served["encoders"][0]
    assert "is not a folder" in _serve_error(str(tmp_path / "missing"))
    assert "no config.json" in _serve_error(str(tmp_path))
    assert "embedding model" in _serve_error(str(encoder))
    assert "at least 1" in _serve_error(str(decoder), "--kv-cache-gib", "0")

    old = tmp_path / "old"  # as saved before checkpoints named every Auto class
    shutil.copytree(decoder, old)
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"]["AutoModel"]
    (old / "config.json").write_text(json.dumps(config))
    assert "save it again" in _serve_error(str(old))

    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(decoder, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    assert "save_tokenizer" in _serve_error(str(no_tokenizer))

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # transformers' GPT-2, not lmblocks'
    assert "not an lmblocks one" in _serve_error(str(tmp_path))
