"""A user's second hour with the scripts (issue 22, items 2-5 and 7-10): one text-encoding policy, no tracebacks for
bad generation options or broken data files, one-line flag errors without abbreviations, messages that name the real
problem, generate.py's class line, speed and --lmblocks, the preset table in the docs, and a fast --help.

Scripts run in-process (`main(argv)`), so the module pays the imports once; two subprocesses check `--help`. Models
are built directly (no training): GPT-2 with 32 positions, a BERT and a transformers LLaMA of one layer each.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"
CORPUS = REPO_ROOT / ".cache" / "corpus"
POSITIONS = 32

sys.path.insert(0, str(SCRIPTS))
import finetune  # noqa: E402
import generate  # noqa: E402
import pretrain  # noqa: E402

from lmblocks.data import CorpusError, read_text_files  # noqa: E402
from lmblocks.training import UsageError  # noqa: E402

LATIN1 = "The café was naïve.\nSecond line: déjà vu.\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny GPT-2 and BERT checkpoint of lmblocks, a transformers LLaMA folder, and a Latin-1 text file."""
    import torch

    import lmblocks
    from lmblocks.tokenization_trainer import config_kwargs_from_tokenizer, save_tokenizer, train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("second_hour")
    text = root / "alice.txt"
    text.write_text((CORPUS / "alice29.txt").read_text(errors="replace")[:12000])
    (root / "latin1.txt").write_bytes((LATIN1 * 20).encode("latin-1"))
    # (tokenizer kind, the model saved with it, its length): lmblocks' GPT-2 and BERT, and transformers' own LLaMA
    # class (a foreign checkpoint, given only the vocabulary and the bos / eos ids).
    for kind, build, positions in (
        ("gpt2", lambda kw: lmblocks.LmbGPT2LMHeadModel(lmblocks.LmbGPT2Config(
            n_embd=32, n_layer=1, n_head=2, n_positions=POSITIONS, **kw)), POSITIONS),
        ("bert", lambda kw: lmblocks.LmbBertForPreTraining(lmblocks.LmbBertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=POSITIONS, **kw)), POSITIONS),
        ("llama", lambda kw: LlamaForCausalLM(LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64, vocab_size=kw["vocab_size"], bos_token_id=kw["bos_token_id"],
            eos_token_id=kw["eos_token_id"])), 64),
    ):
        tokenizer = train_tokenizer([str(text)], kind, vocab_size=400, show_progress=False)
        build(config_kwargs_from_tokenizer(tokenizer)).save_pretrained(root / kind)
        save_tokenizer(tokenizer, root / kind, model_max_length=positions)
    return root


# --- 2. one text-encoding policy -----------------------------------------------------------------------------------

def test_text_that_is_not_utf8_is_refused_with_line_and_byte_unless_an_encoding_is_given(folders, tmp_path, capsys):
    latin1 = folders / "latin1.txt"
    with pytest.raises(CorpusError, match=r"latin1.txt is not UTF-8 text: line 1, byte offset 7 .*--encoding"):
        read_text_files([latin1])
    assert read_text_files([latin1], encoding="latin-1")[0].startswith(LATIN1)
    with pytest.raises(CorpusError, match="no such text encoding"):
        read_text_files([latin1], encoding="klingon")

    # pretrain.py: refused before a tokenizer is trained; with --encoding the text arrives decoded.
    base = ["--model_family", "gpt2", "--preset", "tiny", "--train_files", str(latin1), "--output_dir",
            str(tmp_path / "p"), "--report_to", "none"]
    with pytest.raises(CorpusError, match="line 1, byte offset 7"):
        pretrain.validate_inputs(*pretrain.parse_args(base))
    _, _, texts = pretrain.validate_inputs(*pretrain.parse_args(base + ["--encoding", "latin-1"]))
    assert "café" in texts[0] and "\ufffd" not in texts[0]

    # train_tokenizer.py: the same policy, and the vocabulary holds 'é', not the replacement character.
    script = runpy.run_path(str(SCRIPTS / "train_tokenizer.py"))
    args = ["--kind", "gpt2", "--quiet", "--vocab_size", "300", "--min_frequency", "1", str(latin1)]
    assert script["main"]([*args, "--output_dir", str(tmp_path / "t1")]) == 2
    assert "line 1, byte offset 7" in capsys.readouterr().err
    assert script["main"]([*args, "--output_dir", str(tmp_path / "t2"), "--encoding", "latin-1"]) == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "t2")
    assert tokenizer.decode(tokenizer("café")["input_ids"]) == "café"

    # finetune.py (and align.py, which reads through it): csv / jsonl rows.
    rows = tmp_path / "rows.csv"
    rows.write_bytes(("text,label\n" + "".join(f"caf\xe9 {i},{'ab'[i % 2]}\n" for i in range(12))).encode("latin-1"))
    with pytest.raises(CorpusError, match=r"rows.csv is not UTF-8 text: line 2, byte offset 14"):
        finetune.load_rows(finetune.DataArguments(train_file=str(rows)), seed=0)
    train, _ = finetune.load_rows(finetune.DataArguments(train_file=str(rows), encoding="latin-1"), seed=0)
    assert all(text.startswith("café") for text in train["text"])
    import align

    with pytest.raises(CorpusError, match="line 2"):
        finetune.load_rows(align.DataArguments(train_file=str(rows)), seed=0)


def test_streamed_lines_are_whole_across_read_chunks(tmp_path, monkeypatch):
    from lmblocks import data

    monkeypatch.setattr(data, "_CHUNK", 7)  # characters and lines split across reads
    path = tmp_path / "lines.txt"
    path.write_text("héllo wörld\nsecond line here\n\nlast, no newline", encoding="utf-8")
    assert list(data.iter_text_lines([path])) == ["héllo wörld\n", "second line here\n", "\n", "last, no newline"]
    path.write_bytes("ok line\nabcdefghij\xe9z\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"line 2, byte offset 18 \(b'\\xe9'"):
        list(data.iter_text_lines([path]))
    assert list(data.iter_text_lines([path], "latin-1")) == ["ok line\n", "abcdefghijéz\n"]


# --- 3. no tracebacks: generation options, broken data files -------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (["--num_beams", "4", "--do_sample", "--num_return_sequences", "8"], "--num_return_sequences (8)"),
    (["--do_sample", "--temperature", "-1"], "--temperature (=-1.0) has to be a strictly positive"),
    (["--compile", "--num_beams", "2"], "transformers does not compile beam search"),
])
def test_generation_options_are_checked_before_the_model_loads(options, message):
    # The folder does not exist: the option error must come first.
    with pytest.raises(UsageError, match=re.escape(message)):
        generate.main(["--model_name_or_path", "./no/such/folder", *options])


def test_broken_data_files_name_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine", "label": "a"}\n{"text": "cut off", "label": \n')
    with pytest.raises(CorpusError, match=r"broken.jsonl line 2 is not valid JSON"):
        finetune.load_rows(finetune.DataArguments(train_file=str(broken)), seed=0)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text,label\na,b\nc,d,e,f\n")
    with pytest.raises(CorpusError, match=r"Cannot read .*ragged.csv as csv: .*line 3"):
        finetune.load_rows(finetune.DataArguments(train_file=str(ragged)), seed=0)


# --- 4. flags ---------------------------------------------------------------------------------------------------------

def test_bad_flag_values_and_abbreviations_are_one_line(tmp_path, capsys):
    base = ["--model_family", "gpt2", "--preset", "tiny", "--train_files", "x.txt", "--output_dir", str(tmp_path)]
    with pytest.raises(UsageError, match=r"^argument --max_steps(/--max-steps)?: invalid int value: 'ten'"):
        pretrain.parse_args(base + ["--max_steps", "ten"])
    with pytest.raises(UsageError, match=r"--max_step \(did you mean --max_steps\?\)"):
        pretrain.parse_args(base + ["--max_steps", "3", "--max_step", "5"])
    assert capsys.readouterr().err == ""  # no usage block

    from lmblocks.cli import ArgumentParser

    parser = ArgumentParser(prog="x")
    parser.add_argument("--families", nargs="+", choices=["gpt2", "llama"])
    parser.add_argument("--max_steps", type=int, default=3)
    with pytest.raises(UsageError, match=r"invalid choice: 'gpt3' \(choose from .*gpt2.*llama"):
        parser.parse_args(["--families", "gpt3"])
    with pytest.raises(UsageError, match="did you mean --max_steps"):
        parser.parse_args(["--max_step", "5"])


def test_train_tokenizer_spells_dataset_options_as_the_other_scripts(folders, tmp_path, capsys):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": [f"line {i} of the text" for i in range(50)]}).save_to_disk(saved)
    script = runpy.run_path(str(SCRIPTS / "train_tokenizer.py"))
    args = ["--kind", "gpt2", "--quiet", "--vocab_size", "280", "--min_frequency", "1", "--text_column", "body"]
    assert script["main"]([*args, "--output_dir", str(tmp_path / "a"), "--dataset_name", str(saved),
                           "--dataset_split", "train"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert script["main"]([*args, "--output_dir", str(tmp_path / "b"), "--dataset", str(saved), "--split",
                           "train"]) == 0
    err = capsys.readouterr().err
    assert "--dataset is deprecated; use --dataset_name" in err and "--split is deprecated" in err
    assert script["main"](["--kind", "gpt3", "--output_dir", str(tmp_path / "c"), "x.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'gpt3'" in err[0] and "'llama'" in err[0]


# --- 5. messages that name the real problem ------------------------------------------------------------------------

def test_messages_name_the_real_problem(folders, tmp_path):
    with pytest.raises(CorpusError, match="is a directory, not a data file"):
        finetune.load_rows(finetune.DataArguments(train_file=str(folders)), seed=0)
    with pytest.raises(CorpusError, match="is a directory"):
        pretrain.validate_inputs(*pretrain.parse_args([
            "--model_family", "gpt2", "--preset", "tiny", "--train_files", str(folders), "--output_dir",
            str(tmp_path / "p"), "--report_to", "none"]))

    def refusal(path) -> str:
        with pytest.raises(UsageError) as caught:
            generate.main(["--model_name_or_path", str(path), "--max_new_tokens", "2"])
        return str(caught.value)

    assert "is a file" in refusal(folders / "alice.txt")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (broken / name).write_bytes((folders / "gpt2" / name).read_bytes())
    (broken / "config.json").write_text('{"model_type": "lmb_gpt2", "n_layer": ')
    message = refusal(broken)
    assert "config" in message and "tokenizer" not in message
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((folders / "gpt2" / name).read_bytes())
    message = refusal(no_tokenizer)
    assert f"No tokenizer files found in {no_tokenizer}" in message and "tokenizer.json" in message
    assert "sentencepiece" not in message
    message = refusal(folders / "bert")
    assert "BERT checkpoint" in message and "no causal-LM head" in message and len(message) < 400


# --- 7 (part). noise ------------------------------------------------------------------------------------------------

def test_a_long_prompt_is_refused_once_and_resume_intervals_are_one_line(folders):
    from transformers import logging as hf_logging
    from transformers.testing_utils import CaptureLogger

    tokenizer_logger = hf_logging.get_logger("transformers.tokenization_utils_base")
    with CaptureLogger(tokenizer_logger) as captured, pytest.raises(UsageError, match="Shorten the prompt"):
        generate.main(["--model_name_or_path", str(folders / "gpt2"), "--prompt", "Alice was here " * 30])
    assert "Token indices sequence length" not in captured.out

    from transformers.trainer_utils import compare_trainer_and_checkpoint_args

    from lmblocks.cli import _ResumeArgumentsFilter

    utils_logger = hf_logging.get_logger("transformers.trainer_utils")
    note = _ResumeArgumentsFilter()
    utils_logger.addFilter(note)
    try:
        with CaptureLogger(utils_logger) as captured:
            compare_trainer_and_checkpoint_args(
                SimpleNamespace(logging_steps=9, eval_steps=None, save_steps=500, per_device_train_batch_size=4,
                                n_gpu=0),
                SimpleNamespace(logging_steps=6, eval_steps=None, save_steps=500, train_batch_size=4))
    finally:
        utils_logger.removeFilter(note)
    assert captured.out.strip() == "resuming with logging_steps 9 (the checkpoint's run had 6)."


def test_setup_has_an_spdx_license_and_no_license_classifier():
    import configparser

    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    assert setup["metadata"]["license_expression"] == "Apache-2.0"
    assert "License ::" not in setup["metadata"].get("classifiers", "")


# --- 8. what generate.py shows --------------------------------------------------------------------------------------

def test_generate_names_the_class_reports_speed_and_runs_lmblocks_on_request(folders, capsys):
    base = ["--model_name_or_path", str(folders / "llama"), "--prompt", "Alice", "--max_new_tokens", "6",
            "--no_stream"]
    theirs = generate.main(base)
    err = capsys.readouterr().err
    assert "[generate] LlamaForCausalLM (transformers, model_type llama)" in err
    assert "--lmblocks runs it in lmblocks' LmbLlamaForCausalLM" in err
    assert re.search(r"\[generate\] [1-6] new tokens in [\d.]+ s: [\d.]+ tokens/s", err)  # an eos may end it
    ours = generate.main(base + ["--lmblocks"])
    err = capsys.readouterr().err
    assert "[generate] LmbLlamaForCausalLM (lmblocks, model_type llama)" in err
    assert ours == theirs  # the same weights, greedy: the same text


# --- 9. docs ----------------------------------------------------------------------------------------------------------

def test_docs_list_every_preset_and_where_set_up_puts_the_real_checkpoints():
    from lmblocks.training import FAMILIES, preset_table

    usage = (REPO_ROOT / "docs" / "usage.md").read_text()
    start = "<!-- preset table: generated by lmblocks.training.preset_table() -->\n"
    documented = usage[usage.index(start) + len(start):usage.index("<!-- end of preset table -->")]
    assert documented == preset_table(), (
        "docs/usage.md's preset table is stale; paste in the output of: .venv/bin/python -c \"from lmblocks.training "
        "import preset_table; print(preset_table(), end='')\"")
    for family in FAMILIES.values():
        for name in family.config_class.presets:
            assert f"| {family.name} | `{name}` |" in documented
    assert ".cache/models/smollm2-135m-instruct/" in usage and ".cache/models/all-minilm-l6-v2/" in usage


def test_help_shows_defaults(capsys):
    script = runpy.run_path(str(SCRIPTS / "train_tokenizer.py"))
    with pytest.raises(SystemExit):
        script["parse_args"](["--help"])
    text = capsys.readouterr().out
    assert "(default: 32000)" in text and "(default: 2)" in text and "--dataset_name" in text
    assert "--dataset " not in text  # the deprecated spelling is not advertised


# --- 10. a fast --help --------------------------------------------------------------------------------------------

def test_help_does_not_import_torch_once_printed(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "100"}
    script = str(SCRIPTS / "pretrain.py")
    first = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0 and "--max_steps" in first.stdout and "(default: text)" in first.stdout
    again = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert again.returncode == 0 and again.stdout == first.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines() if "|" in line}
    assert not {"torch", "transformers", "lmblocks"} & imported, sorted(imported)[:20]


def test_pretrain_linear_init(tmp_path):
    """--linear_init pytorch resets every nn.Linear of a new model to PyTorch's default (non-zero biases, weights
    within ±1/√fan_in); 'family' keeps the family's zero biases; an unknown value or a checkpoint is refused."""
    import torch

    from lmblocks import LmbBertConfig
    from lmblocks.tokenization_trainer import train_tokenizer

    (tmp_path / "corpus.txt").write_text("One sentence here.\nAnother one.\n\nA second document.\nIts end.\n")
    base = ["--model_family", "bert", "--preset", "tiny", "--config_overrides",
            "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2", "--train_files",
            str(tmp_path / "corpus.txt"), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]

    tokenizer = train_tokenizer(iter([(tmp_path / "corpus.txt").read_text()]), "bert", vocab_size=60, min_frequency=1,
                                show_progress=False)

    def first_layer(init: str) -> torch.nn.Linear:
        model_args, data_args, training_args = pretrain.parse_args([*base, "--linear_init", init])
        pretrain.validate_inputs(model_args, data_args, training_args)
        model = pretrain.build_model(model_args, pretrain.FAMILIES["bert"], tokenizer, 32)
        return model.bert.encoder.layer[0].attention.self.query

    family, reset = first_layer("family"), first_layer("pytorch")
    assert torch.count_nonzero(family.bias) == 0
    assert torch.count_nonzero(reset.bias) == reset.bias.numel()
    assert reset.weight.abs().max() <= 1 / 32**0.5 and reset.weight.std() > 2 * LmbBertConfig().initializer_range
    with pytest.raises(UsageError, match="--linear_init must be one of family, pytorch"):
        pretrain.validate_inputs(*pretrain.parse_args([*base, "--linear_init", "xavier"]))
    with pytest.raises(UsageError, match="--linear_init initialises a new model"):
        pretrain.validate_inputs(*pretrain.parse_args([
            "--model_name_or_path", str(tmp_path), "--linear_init", "pytorch", "--train_files",
            str(tmp_path / "corpus.txt"), "--output_dir", str(tmp_path / "out2"), "--report_to", "none"]))
