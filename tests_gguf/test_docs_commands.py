"""The llama.cpp commands of docs/usage.md ("Run it elsewhere"), run as a user types them, on a tiny lmblocks LLaMA
saved as training saves it: `scripts/export.py --format gguf --outtype q8_0`, then either the one-line Python way
(`llama_cpp_model`) or llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`, queried as the
docs' curl does). Both run the same llama.cpp on the same file: the server's greedy completion is the Python one's.
(That llama.cpp's greedy tokens are transformers' is test_llama_cpp.py's business.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / ".cache" / "corpus"
PROMPT = "It was the best of"


def _run(*args: str, cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_export_then_python_and_server(tmp_path):
    import lmblocks

    corpus = CORPUS / "alice29.txt"
    if not corpus.is_file():
        pytest.skip(f"{corpus} is fetched by `make env`")
    lines = [line for line in corpus.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    tokenizer = lmblocks.train_tokenizer(iter(lines), kind="llama", vocab_size=600)
    spec = lmblocks.FAMILIES["llama"]
    config = spec.config_class.from_preset("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    spec.causal_lm_class(config).save_pretrained(tmp_path / "outputs" / "main" / "llama")
    lmblocks.save_tokenizer(tokenizer, tmp_path / "outputs" / "main" / "llama")

    # docs/usage.md, the first command
    _run(sys.executable, str(REPO_ROOT / "scripts" / "export.py"), "--model_name_or_path", "outputs/main/llama",
         "--output_dir", "exported", "--format", "gguf", "--outtype", "q8_0", cwd=tmp_path)
    # the second, from Python
    python_text = _run(sys.executable, "-c", "from lmblocks.export_gguf import llama_cpp_model; "
                       "llm = llama_cpp_model('exported/llama-q8_0.gguf', n_ctx=512); "
                       f"print(llm({PROMPT!r}, max_tokens=40, temperature=0)['choices'][0]['text'])", cwd=tmp_path)
    python_text = python_text.removesuffix("\n")

    # the second, as a server
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", "exported/llama-q8_0.gguf",
                               "--n_ctx", "512", "--port", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        url = f"http://localhost:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=5).read()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "llama_cpp.server did not answer within 120 s"
                time.sleep(1)
        body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "repeat_penalty": 1.0}
        request = urllib.request.Request(f"{url}/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    server_text = answer["choices"][0]["text"]
    print(f"python: {python_text!r}\nserver: {server_text!r}")
    assert python_text.strip() and server_text == python_text
