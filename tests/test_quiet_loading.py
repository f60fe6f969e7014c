"""Noise that looks like failure (issue 22, item 7): transformers' LOAD REPORT table when a pretrained model gets a
new task head, as one line (and real problems still reported); the model card's snippet loading the tokenizer
without a trust-remote-code question or a config-type warning, in a process without lmblocks."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import pytest
from isolation import run_without_lmblocks
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import lmblocks
from lmblocks.hub import write_model_card
from lmblocks.tokenization_trainer import config_kwargs_from_tokenizer, save_tokenizer, train_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import finetune  # noqa: E402

TEXTS = ["rain and snow today", "the team won the match", "bread and soup", "a song on the piano"]


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory) -> Path:
    """A tiny LLaMA causal LM with its tokenizer and model card, as pretrain.py leaves one."""
    folder = tmp_path_factory.mktemp("quiet") / "llama"
    tokenizer = train_tokenizer(iter(TEXTS * 20), "llama", vocab_size=300, show_progress=False)
    fields = lmblocks.LmbLlamaConfig.__dataclass_fields__
    config = lmblocks.LmbLlamaConfig.from_preset(
        "tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, **{k: v for k, v in config_kwargs_from_tokenizer(tokenizer).items() if k in fields})
    lmblocks.LmbLlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    write_model_card(folder, model_name="llama", family="llama", task="causal_lm", load_from=str(folder))
    return folder


class _Transformers:
    """What transformers logs (its logger does not propagate to pytest's caplog)."""

    def __enter__(self):
        self.messages: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())
        logging.getLogger("transformers").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self.handler)

    @property
    def reports(self) -> list[str]:
        return [m for m in self.messages if "LOAD REPORT" in m]


def test_finetune_says_the_new_head_in_one_line(causal_lm, tmp_path, capsys):
    rows = [{"text": text, "label": str(i % 3)} for i, text in enumerate(TEXTS * 3)]
    (tmp_path / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with _Transformers() as logged:
        finetune.main(["--model_name_or_path", str(causal_lm), "--train_file", str(tmp_path / "cls.jsonl"),
                       "--max_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                       "--validation_fraction", "0", "--output_dir", str(tmp_path / "out")])
    assert not logged.reports, logged.reports
    lines = [line for line in capsys.readouterr().out.splitlines() if "initialised" in line]
    assert lines == ["[finetune] LmbLlamaForSequenceClassification: new head score initialised, the checkpoint's "
                     "lm_head left out (expected when a pretrained model gets a new task head; training learns it)"]


def test_nothing_is_said_when_nothing_differs(causal_lm, capsys):
    from lmblocks.cli import load_pretrained

    with _Transformers() as logged:
        load_pretrained(AutoModelForCausalLM, str(causal_lm))
    assert not logged.reports and capsys.readouterr().out == ""


def test_a_saved_position_ids_buffer_is_not_a_problem(tmp_path, capsys):
    from families import BERT
    from lmblocks.cli import load_pretrained

    BERT.base_class(BERT.tiny_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["embeddings.position_ids"] = torch.arange(16)[None]  # as older BERT checkpoints (MiniLM) hold it
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with _Transformers() as logged:
        load_pretrained(BERT.base_class, str(tmp_path))
    assert not logged.reports and capsys.readouterr().out == ""


def test_a_real_problem_still_shows_the_report(causal_lm, tmp_path, capsys):
    from lmblocks.cli import load_pretrained

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in causal_lm.iterdir():
        if file.is_file():
            (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(causal_lm / "model.safetensors")
    lost = next(key for key in weights if ".mlp." in key)
    del weights[lost]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with _Transformers() as logged:
        load_pretrained(AutoModelForSequenceClassification, str(broken), num_labels=3)
    [report] = logged.reports
    assert "MISSING" in report and lost.split(".")[-2] in report, report  # e.g. down_proj
    assert "initialised" not in capsys.readouterr().out


_SNIPPET_WITHOUT_LMBLOCKS = textwrap.dedent(
    """
    import re, sys
    card = open({card!r}).read()
    [snippet] = re.findall(r"```python\\n(.*?)```", card, re.S)
    names = {{}}
    exec(snippet, names)
    print(type(names["model"]).__name__, type(names["tokenizer"]).__name__)
    """
)


def test_card_snippet_asks_nothing_and_warns_nothing_without_lmblocks(causal_lm, tmp_path):
    script = _SNIPPET_WITHOUT_LMBLOCKS.format(card=str(causal_lm / "README.md"))
    # stdin closed: a trust-remote-code question cannot be answered, as in a notebook left to run.
    result = run_without_lmblocks(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "Do you wish to run the custom code" not in said
    assert "to instantiate a model of type" not in said
    assert result.stdout.split() == ["LmbLlamaForCausalLM", "LlamaTokenizer"]
