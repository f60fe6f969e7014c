"""Export to transformers' own classes (`lmblocks.export`, `scripts/export.py --format transformers`).

Every class of every family that declares `TRANSFORMERS_EXPORT` becomes transformers' own class: the exported folder
names no lmblocks class and no remote code, the Auto class picks transformers' class from its `model_type` (lmblocks
registers only `lmb_*` types, so it cannot be what loads it), and the logits are those of the lmblocks model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from lmblocks.export import ExportError, export_table, export_to_transformers, transformers_class_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import BERT, FAMILIES, GPT2, LLAMA  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# transformers' Auto class for each lmblocks Auto class name (the same names: the exported config's model_type
# makes the Auto class pick transformers' class).
CASES = [
    (family, auto_class_name, model_class)
    for family in FAMILIES
    for auto_class_name, model_class in family.auto_classes.items()
]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _inputs(auto_class_name: str, vocab_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, (2, 9), generator=generator)
    if auto_class_name == "AutoModelForMultipleChoice":
        return {"input_ids": input_ids[:, None].expand(2, 3, 9).contiguous()}
    return {"input_ids": input_ids}


@pytest.mark.parametrize("family, auto_class_name, model_class", CASES,
                         ids=[f"{f.name}-{c.__name__}" for f, _, c in CASES])
def test_exported_class_is_transformers_own_with_the_same_logits(tmp_path, family, auto_class_name, model_class):
    try:
        export_table(family.tiny_config())
    except ExportError as error:
        pytest.skip(str(error))
    torch.manual_seed(0)
    model = model_class(family.tiny_config(num_labels=3)).eval()
    notes = export_to_transformers(model, tmp_path)
    assert notes == []
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in saved and not saved["model_type"].startswith("lmb_")
    assert saved["architectures"] == [transformers_class_name(model)]
    assert not list(tmp_path.glob("*.py"))  # no remote code travels
    loaded = getattr(transformers, auto_class_name).from_pretrained(tmp_path).eval()
    assert type(loaded) is getattr(transformers, transformers_class_name(model))
    assert type(loaded).__module__.startswith("transformers.models.")
    inputs = _inputs(auto_class_name, model.config.vocab_size)
    with torch.no_grad():
        ours, theirs = model(**inputs), loaded(**inputs)
    names = [name for name in ours if name.endswith("logits")] or ["last_hidden_state"]
    for name in names:
        # GPT-2: transformers' gelu_new and the fused tanh-GELU lmblocks runs differ by ~1e-7; the rest is exact.
        torch.testing.assert_close(theirs[name], ours[name], atol=1e-6, rtol=0)


def test_heads_without_a_counterpart_are_said(tmp_path):
    model = GPT2.seq_cls_class(GPT2.tiny_config(num_labels=2, lm_loss_weight=0.5)).eval()
    notes = export_to_transformers(model, tmp_path)
    assert len(notes) == 1 and "lm_loss_weight=0.5" in notes[0] and "auxiliary LM loss" in notes[0]


def test_options_transformers_cannot_express_are_refused(tmp_path):
    with pytest.raises(ExportError, match="qkv_bias=False"):
        export_to_transformers(GPT2.causal_lm_class(GPT2.tiny_config(qkv_bias=False)), tmp_path)
    with pytest.raises(ExportError, match="rms_norm_bias=True"):
        export_to_transformers(LLAMA.causal_lm_class(LLAMA.tiny_config(rms_norm_bias=True)), tmp_path)


def test_export_script_llama_with_tokenizer(tmp_path, capsys):
    """`scripts/export.py --format transformers` on a saved checkpoint with its tokenizer: transformers' pipeline
    generates from the folder what lmblocks generates."""
    from lmblocks import save_tokenizer, train_tokenizer

    texts = ["It was the best of times, it was the worst of times, it was the age of wisdom."] * 20
    tokenizer = train_tokenizer(iter(texts), kind="llama", vocab_size=300)
    torch.manual_seed(0)
    model = LLAMA.causal_lm_class(LLAMA.tiny_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id)).eval()
    model.save_pretrained(tmp_path / "lmb")
    save_tokenizer(tokenizer, tmp_path / "lmb")
    _script("export").main(["--model_name_or_path", str(tmp_path / "lmb"), "--output_dir", str(tmp_path / "hf")])
    assert "Wrote LlamaForCausalLM" in capsys.readouterr().out
    generator = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    assert type(generator.model) is transformers.LlamaForCausalLM
    ids = tokenizer("It was the", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    got = generator.model.generate(generator.tokenizer("It was the", return_tensors="pt").input_ids,
                                   max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


def test_export_script_bert_casts_and_keeps_the_head(tmp_path):
    torch.manual_seed(0)
    model = BERT.pretraining_class(BERT.tiny_config()).eval()
    model.save_pretrained(tmp_path / "lmb")
    _script("export").main(["--model_name_or_path", str(tmp_path / "lmb"), "--output_dir", str(tmp_path / "hf"),
                            "--outtype", "bf16"])
    loaded = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "hf")
    assert type(loaded) is transformers.BertForPreTraining and loaded.dtype == torch.bfloat16


@pytest.mark.parametrize("argv, message", [
    (["--format", "transformers", "--outtype", "q8_0"], "q8_0 is a GGUF type"),
    (["--format", "gguf"], "no tokenizer"),
])
def test_export_script_errors(tmp_path, capsys, argv, message):
    GPT2.causal_lm_class(GPT2.tiny_config()).save_pretrained(tmp_path / "lmb")
    script = _script("export")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.run_script(lambda: script.main(["--model_name_or_path", str(tmp_path / "lmb"), "--output_dir",
                                               str(tmp_path / "out"), *argv]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_export_script_refuses_a_non_lmblocks_folder(tmp_path, capsys):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    script = _script("export")
    with pytest.raises(SystemExit):
        script.run_script(lambda: script.main(["--model_name_or_path", str(tmp_path), "--output_dir",
                                               str(tmp_path / "out")]))
    assert "not an lmblocks checkpoint" in capsys.readouterr().err
