"""lm-evaluation-harness (`lm_eval`, the command docs/usage.md gives) scores an lmblocks checkpoint, loaded with its
remote code, and its export to transformers' own class (`scripts/export.py`) with the same log-likelihoods, on a
local multiple-choice task: which book a passage comes from. A tiny model of each decoder family, built here.
Measured: LLaMA and Qwen2 identical (0.0), GPT-2 within 7.6e-6 of log-likelihoods around -100."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / ".cache" / "corpus"
BOOKS = {"alice29": "Alice's Adventures in Wonderland", "asyoulik": "As You Like It",
         "lcet10": "a lecture on libraries", "plrabn12": "Paradise Lost"}
DECODERS = ["gpt2", "llama", "qwen2"]  # lmblocks.FAMILIES with a causal LM

TASK = """\
task: which_book
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{passage}}}}\\nThis passage is from"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def _lines(book: str) -> list[str]:
    path = CORPUS / f"{book}.txt"
    if not path.is_file():
        pytest.skip(f"{path} is fetched by `make env`")
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if len(line.strip()) > 40]


def _run(*args: str, cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_HOME=str(cwd / "hf_home"))  # remote code and datasets' cache stay here
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _loglikelihoods(output_dir: Path) -> tuple[list[float], float]:
    """Every choice's log-likelihood from `--log_samples`, in document order, and the accuracy."""
    (samples,) = output_dir.rglob("samples_which_book_*.jsonl")
    docs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    (results,) = output_dir.rglob("results_*.json")
    accuracy = json.loads(results.read_text())["results"]["which_book"]["acc,none"]
    return [float(resp[0][0]) for doc in docs for resp in doc["resps"]], accuracy  # written as full-precision text


@pytest.mark.parametrize("family", DECODERS)
def test_lm_eval_scores_lmblocks_as_transformers_class(tmp_path, family):
    import lmblocks
    from lmblocks import save_tokenizer

    rows = []
    for index, (book, _) in enumerate(BOOKS.items()):
        for line in _lines(book)[200:203]:
            rows.append({"passage": line, "choices": list(BOOKS.values()), "label": index})
    tasks = tmp_path / "eval_tasks"  # the layout docs/usage.md gives, paths relative to where lm_eval runs
    tasks.mkdir()
    (tasks / "which_book.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tasks / "which_book.yaml").write_text(TASK.format(data="eval_tasks/which_book.jsonl"))

    spec = lmblocks.FAMILIES[family]
    tokenizer = lmblocks.train_tokenizer(iter(_lines("alice29")[:600]), kind=spec.tokenizer_kind, vocab_size=400)
    config = spec.config_class.from_preset("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    spec.causal_lm_class(config).save_pretrained(tmp_path / "checkpoint")
    save_tokenizer(tokenizer, tmp_path / "checkpoint")
    _run(sys.executable, str(REPO_ROOT / "scripts" / "export.py"), "--model_name_or_path", "checkpoint",
         "--output_dir", "exported", cwd=tmp_path)

    lm_eval = str(Path(sys.executable).parent / "lm_eval")
    scores = {}
    for name, model_args in (("lmblocks", "pretrained=checkpoint,trust_remote_code=True,dtype=float32"),
                             ("transformers", "pretrained=exported,dtype=float32")):
        _run(lm_eval, "--model", "hf", "--model_args", model_args, "--device", "cpu", "--batch_size", "8",
             "--include_path", "eval_tasks", "--tasks", "which_book", "--log_samples", "--output_path", f"eval-{name}",
             cwd=tmp_path)
        scores[name] = _loglikelihoods(tmp_path / f"eval-{name}")
    (ours, our_accuracy), (theirs, their_accuracy) = scores["lmblocks"], scores["transformers"]
    assert len(ours) == len(theirs) == len(rows) * len(BOOKS)
    difference = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"{family}: {len(ours)} log-likelihoods, max |lmblocks - transformers' class| = {difference:.1e}; "
          f"acc {our_accuracy:.3f} / {their_accuracy:.3f}")
    # The logits agree as in tests/test_export.py (exact, or within 1e-6 for GPT-2's two tanh-GELU spellings); a
    # log-likelihood sums ~20 tokens' log-probabilities, so within float32's rounding of that sum.
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(ours, theirs))
    assert our_accuracy == their_accuracy
