"""Every LoRA classifier that finetune.py saves reloads through the snippet its own model card prints (issue 22,
item 1): 2, 3 and 5 labels; an adapter-only folder, and a `--merge_lora` folder with the adapter alone in `adapter/`
(LLaMA; every other family of `lmblocks.FAMILIES` with 3 labels, merged).

The snippets run in a fresh process in which `import lmblocks` fails (`python -I -S` with only the environment's
site-packages on the path), with stdin closed, so a trust-remote-code question would fail the run. Each must give the
logits the trained model gave on the same texts (recorded as finetune.py saves it) and the classifier's label names.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
from isolation import run_without_lmblocks
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import finetune  # noqa: E402

import lmblocks  # noqa: E402
import lmblocks.hub  # noqa: E402

NAMES = ["weather", "sports", "food", "music", "travel"]
TEXTS = {"weather": "rain and snow today", "sports": "the team won the match", "food": "bread and soup",
         "music": "a song on the piano", "travel": "a train to the sea"}
PROBES = ["rain and the team", "soup on the train"]
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--validation_fraction", "0",
         "--per_device_train_batch_size", "4", "--max_steps", "2", "--learning_rate", "1e-2", "--max_length", "16"]


BASE_FAMILY = "llama"  # the one the whole matrix (labels x merged) runs on


def make_base(folder: Path, family: str) -> Path:
    """A tiny pretrained checkpoint of `family` (the LM head pretrain.py trains, the sizes of the main job's --quick)
    with its tokenizer."""
    from lmblocks.tokenization_trainer import config_kwargs_from_tokenizer, save_tokenizer, train_tokenizer
    from lmblocks.training import parse_config_overrides

    spec = lmblocks.FAMILIES[family]
    tokenizer = train_tokenizer(iter(list(TEXTS.values()) * 20), spec.tokenizer_kind, vocab_size=300,
                                show_progress=False)
    sizes = parse_config_overrides(spec.demo["quick_overrides"])
    fields = spec.config_class.__dataclass_fields__
    config = spec.config_class.from_preset(
        "tiny", **sizes, **{k: v for k, v in config_kwargs_from_tokenizer(tokenizer).items() if k in fields})
    torch.manual_seed(0)
    spec.pretraining_class(config).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("lora_cls") / "base", BASE_FAMILY)


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """finetune.py --task seq_cls --lora_r 4 for 2, 3 and 5 labels, with and without --merge_lora; for each saved
    folder, the logits of the trained model on PROBES as it was being saved, and its label names."""
    root = base.parent
    recorded: dict[Path, list] = {}
    save = lmblocks.hub.save_trained_model

    def recording_save(trainer, tokenizer, **kwargs):
        model = trainer.model.eval()
        with torch.no_grad():
            recorded[Path(trainer.args.output_dir)] = [
                model(**tokenizer(text, return_tensors="pt")).logits[0].tolist() for text in PROBES]
        return save(trainer, tokenizer, **kwargs)

    lmblocks.hub.save_trained_model = recording_save  # finetune.py imports it when it runs
    expected = []
    try:
        for n in (2, 3, 5):
            data = root / f"labels{n}.csv"
            with data.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["text", "label"])
                writer.writerows([TEXTS[name], name] for name in NAMES[:n] for _ in range(4))
            id2label = dict(enumerate(sorted(NAMES[:n])))
            for merged in (False, True):
                out = root / f"cls{n}{'-merged' if merged else ''}"
                finetune.main(["--model_name_or_path", str(base), "--task", "seq_cls", "--lora_r", "4",
                               "--train_file", str(data), "--output_dir", str(out), *QUIET,
                               *(["--merge_lora"] if merged else [])])
                expected.append((out, recorded[out], id2label))
                if merged:
                    expected.append((out / "adapter", recorded[out], id2label))
        # The other families' heads (GPT-2's `score`, BERT's `classifier` on the pooler, ...): 3 labels, merged +
        # adapter/.
        for family in [name for name in lmblocks.FAMILIES if name != BASE_FAMILY]:
            out = root / f"{family}-cls3-merged"
            finetune.main(["--model_name_or_path", str(make_base(root / family, family)), "--task", "seq_cls",
                           "--lora_r", "4", "--train_file", str(root / "labels3.csv"), "--output_dir", str(out),
                           *QUIET, "--merge_lora"])
            id2label = dict(enumerate(sorted(NAMES[:3])))
            expected += [(out, recorded[out], id2label), (out / "adapter", recorded[out], id2label)]
    finally:
        lmblocks.hub.save_trained_model = save
    return expected


# Runs each folder's card snippet as printed, then the probes; one JSON line per folder.
_WITHOUT_LMBLOCKS = textwrap.dedent(
    """
    import json, re, sys
    import torch
    for folder in {folders!r}:
        card = open(folder + "/README.md").read()
        [snippet] = re.findall(r"```python\\n(.*?)```", card, re.S)
        names = {{}}
        exec(snippet, names)
        model, tokenizer = names["model"].eval(), names["tokenizer"]
        with torch.no_grad():
            logits = [model(**tokenizer(text, return_tensors="pt")).logits[0].tolist() for text in {probes!r}]
        print(json.dumps({{"folder": folder, "logits": logits, "id2label": model.config.id2label,
                          "label2id": model.config.label2id, "snippet": snippet}}))
    """
)


def test_lora_classifiers_reload_through_their_card_snippet_without_lmblocks(runs, tmp_path):
    folders = [str(folder) for folder, _, _ in runs]
    script = _WITHOUT_LMBLOCKS.format(folders=folders, probes=PROBES)
    result = run_without_lmblocks(script, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    loaded = {row["folder"]: row for row in map(json.loads, result.stdout.splitlines())}
    for folder, logits, id2label in runs:
        row = loaded[str(folder)]
        assert {int(i): name for i, name in row["id2label"].items()} == id2label, folder
        assert row["label2id"] == {name: i for i, name in id2label.items()}, folder
        torch.testing.assert_close(torch.tensor(row["logits"]), torch.tensor(logits), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, f=folder: f"{f}: {m}")
        assert torch.tensor(logits).shape[-1] == len(id2label)
        # The card says which snippet it is: peft's for an adapter folder, transformers' for a merged one.
        peft_snippet = (folder / "adapter_config.json").exists()
        assert ("AutoPeftModelForSequenceClassification" in row["snippet"]) == peft_snippet, row["snippet"]


def test_adapter_folders_hold_their_label_names(runs):
    for folder, _, id2label in runs:
        if (folder / "adapter_config.json").exists():
            card = (folder / "README.md").read_text()
            assert re.search(r"id2label = (\{.*\})", card).group(1) == repr(id2label), folder
