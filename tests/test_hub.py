"""The hub: what `--push_to_hub` uploads, and the download side against a real Hub-protocol server.

The download side runs olah (a Hugging Face Hub mirror server, from PyPI) on 127.0.0.1, serving local git
repositories in offline mode, with `HF_ENDPOINT` pointing at it. A subprocess in which `import lmblocks` fails loads
`org/name` through `AutoTokenizer` and `AutoModelForCausalLM(..., trust_remote_code=True)` and must generate the
tokens the local model generates.

One olah detail the test has to set up: offline, olah resolves a branch name (`main`) to a commit only from its own
cache of earlier upstream answers, and a local git mirror does not fill that cache. Files present in the mirror are
served anyway, but a *missing* file (transformers probes optional ones such as `tokenizer.model`) is then answered
401 RepoNotFound instead of 404 EntryNotFound, which transformers treats as fatal. The test therefore records
`main -> <commit>` in olah's cache with olah's own helpers (`get_resolved_commit_save_path`, `write_cache_request`)
before starting the server; olah then answers exactly as the Hub does.

The upload itself is not exercised against a server: olah is read-only and no upload-capable Hub server is available
offline. The test checks what would be uploaded: the finished folder with the model card (metadata) and the
remote-code files, filtered by the same patterns `push_folder` passes to `upload_folder`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("olah", reason="olah (the Hub-protocol test server) is not installed: pip install olah")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A GPT-2 and a LLaMA checkpoint as the scripts write them: model + code + tokenizer + model card."""
    import lmblocks
    from lmblocks.hub import write_model_card
    from lmblocks.tokenization_trainer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("hub")
    text = (REPO_ROOT / ".cache" / "corpus" / "alice29.txt").read_text(errors="replace")[:30000]
    made = {}
    for family, config in (
        ("gpt2", lmblocks.LmbGPT2Config.from_preset("tiny", n_embd=32, n_layer=1, n_head=2)),
        ("llama", lmblocks.LmbLlamaConfig.from_preset("tiny", hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       num_key_value_heads=1)),
    ):
        from lmblocks.tokenization_trainer import config_kwargs_from_tokenizer

        tokenizer = train_tokenizer(iter([text]), lmblocks.FAMILIES[family].tokenizer_kind, vocab_size=512,
                                    show_progress=False)
        kwargs = {k: v for k, v in config_kwargs_from_tokenizer(tokenizer).items()
                  if k in type(config).__dataclass_fields__}
        for key, value in kwargs.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = lmblocks.FAMILIES[family].causal_lm_class(config)
        folder = root / family
        model.save_pretrained(folder)
        save_tokenizer(tokenizer, folder)
        write_model_card(folder, model_name=f"org/{family}", family=family, task="causal_lm",
                         datasets=["canterbury-corpus"], base_model="org/base-model",
                         results={"eval_loss": 5.5, "perplexity": 244.7, "final_train_loss": 5.6})
        (folder / "checkpoint-3").mkdir()  # a Trainer intermediate checkpoint: must not be uploaded
        (folder / "checkpoint-3" / "optimizer.pt").write_bytes(b"x")
        made[family] = folder
    return root, made


def test_pushed_folder_has_card_and_remote_code(checkpoints):
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import filter_repo_objects

    from lmblocks.hub import push_folder

    _, made = checkpoints
    folder = made["gpt2"]
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["license"] == "apache-2.0"
    assert {"lmblocks", "lmb_gpt2", "custom_code", "text-generation"} <= set(data["tags"])
    assert data["datasets"] == ["canterbury-corpus"]
    assert data["base_model"] == "org/base-model"
    metrics = {m["type"]: m["value"] for r in data["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics["perplexity"] == pytest.approx(244.7)
    assert "## Training results" in card.text

    # The files push_folder uploads: everything but the Trainer's intermediate checkpoints.
    import inspect

    ignore = inspect.getsource(push_folder).split("ignore_patterns=")[1].split("]")[0] + "]"
    ignore_patterns = eval(ignore)  # the literal list in push_folder
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, ignore_patterns=ignore_patterns))
    assert {"config.json", "model.safetensors", "modeling_gpt2.py", "configuration_gpt2.py", "layers.py",
            "README.md", "tokenizer.json", "tokenizer_config.json"} <= uploaded
    assert not any(f.startswith("checkpoint-") for f in uploaded)


LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockLmblocks(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lmblocks" or name.startswith("lmblocks."):
                raise ImportError("lmblocks is not installed in this process")

    sys.meta_path.insert(0, BlockLmblocks())
    try:
        import lmblocks  # noqa: F401
        sys.exit("lmblocks is importable; the test needs a process without it")
    except ImportError:
        pass

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = {}
    for repo_id in sys.argv[1:]:
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
        model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
        ids = tokenizer("Alice was beginning", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        result[repo_id] = {"tokens": out[0].tolist(), "module": type(model).__module__}
    print("RESULT " + json.dumps(result))
    """
)


def _git(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}).stdout.strip()


def test_download_from_hub_protocol_server_without_lmblocks(checkpoints):
    from huggingface_hub.utils import filter_repo_objects
    from olah.utils.cache_utils import write_cache_request
    from olah.utils.repo_utils import get_resolved_commit_save_path

    root, made = checkpoints
    mirrors, cache = root / "olah_mirrors", root / "olah_cache"
    for family, folder in made.items():
        repo = mirrors / "models" / "org" / family
        repo.mkdir(parents=True)
        # The repository holds what push_folder would upload.
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, ignore_patterns=["checkpoint-*", "checkpoint-*/**"]):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, repo / name)
        _git(["init", "-q", "-b", "main"], repo)
        _git(["add", "-A"], repo)
        _git(["commit", "-q", "-m", "upload"], repo)
        sha = _git(["rev-parse", "HEAD"], repo)
        resolved = Path(get_resolved_commit_save_path(str(cache), "models", "org", family, "main"))
        resolved.parent.mkdir(parents=True, exist_ok=True)
        asyncio.run(write_cache_request(str(resolved), 200, {}, sha.encode()))

    port = _free_port()
    config = root / "olah.toml"
    config.write_text(textwrap.dedent(f"""
        [basic]
        host = "127.0.0.1"
        port = {port}
        repos-path = "{cache}"
        mirrors-path = ["{mirrors}"]
        hf-scheme = "http"
        hf-netloc = "127.0.0.1:9"
        hf-lfs-netloc = "127.0.0.1:9"

        [accessibility]
        offline = true
    """))
    log = open(root / "olah.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", str(config)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None, (root / "olah.log").read_text()[-3000:]
                assert time.time() < deadline, "olah did not start within 90 s"
                time.sleep(0.5)

        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(root / "hf_home"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH="")
        result = subprocess.run([sys.executable, "-c", LOADER, "org/gpt2", "org/llama"], env=env, cwd=root,
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}\n--- olah log\n" \
                                       f"{(root / 'olah.log').read_text()[-3000:]}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()

    import json

    remote = json.loads(result.stdout.split("RESULT ", 1)[1])
    served = (root / "olah.log").read_text()
    assert "/org/gpt2/resolve/main/model.safetensors" in served  # the weights really came through the server
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for family, folder in made.items():
        entry = remote[f"org/{family}"]
        assert entry["module"].startswith("transformers_modules."), entry["module"]  # the repository's own code
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = tokenizer("Alice was beginning", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            local = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
        assert entry["tokens"] == local[0].tolist(), family
