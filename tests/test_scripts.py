"""The scripts in scripts/, run as users run them (subprocesses), on tiny settings.

Happy paths: pretrain (GPT-2 from text files with eval perplexity and resume, LLaMA from a `datasets` folder with a
tokenizer trained on the fly, BERT MLM + NSP), generate (streaming and sampling), finetune (sequence classification
with the GPT auxiliary loss and LoRA merged for export; instruction tuning with a LoRA adapter); the main job's
quick mode is in test_main_job.py. Bad input: a clear one-line error, exit status 2, and no folder that looks like a
finished checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lmblocks

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"
CORPUS = REPO_ROOT / ".cache" / "corpus"
TINY_GPT2 = "n_embd=32,n_layer=1,n_head=2"
COMMON = ["--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
          "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--logging_steps", "1"]


def run_script(name: str, *args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two small documents and a GPT-2 tokenizer trained on them."""
    from lmblocks.tokenization_trainer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("scripts")
    for name in ("alice29", "botchan"):
        (root / f"{name}.txt").write_text((CORPUS / f"{name}.txt").read_text(errors="replace")[:20000])
    tokenizer = train_tokenizer([str(root / "alice29.txt"), str(root / "botchan.txt")], "gpt2", vocab_size=400,
                                show_progress=False)
    save_tokenizer(tokenizer, root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def gpt2_checkpoint(workdir):
    """pretrain.py: GPT-2 from text files, saving a Trainer checkpoint at step 2 (for the resume test)."""
    out = workdir / "gpt2"
    result = ok(run_script(
        "pretrain.py", "--model_family", "gpt2", "--preset", "tiny", "--config_overrides", TINY_GPT2,
        "--train_files", str(workdir / "alice29.txt"), str(workdir / "botchan.txt"),
        "--tokenizer_name_or_path", str(workdir / "tokenizer"), "--block_size", "32", "--max_steps", "2",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--learning_rate", "1e-3", "--output_dir", str(out), *COMMON,
    ))
    assert "saved gpt2" in result.stdout
    return out


def test_pretrain_gpt2_writes_a_complete_checkpoint(gpt2_checkpoint):
    files = {p.name for p in gpt2_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_gpt2.py", "configuration_gpt2.py", "tokenizer.json",
            "README.md", "all_results.json", "checkpoint-2"} <= files
    assert not [f for f in files if f.startswith(".staging")]
    results = json.loads((gpt2_checkpoint / "all_results.json").read_text())
    assert results["train_steps"] == 2 and results["perplexity"] > 1 and results["tokens_per_second"] > 0
    card = (gpt2_checkpoint / "README.md").read_text()
    assert "library_name: transformers" in card and "perplexity" in card


def test_pretrain_resume_from_checkpoint(gpt2_checkpoint, workdir, tmp_path):
    out = tmp_path / "resumed"
    import shutil

    shutil.copytree(gpt2_checkpoint / "checkpoint-2", out / "checkpoint-2")
    result = ok(run_script(
        "pretrain.py", "--model_family", "gpt2", "--preset", "tiny", "--config_overrides", TINY_GPT2,
        "--train_files", str(workdir / "alice29.txt"), str(workdir / "botchan.txt"),
        "--tokenizer_name_or_path", str(workdir / "tokenizer"), "--block_size", "32", "--max_steps", "3",
        "--save_strategy", "no", "--eval_fraction", "0", "--output_dir", str(out),
        "--resume_from_checkpoint", str(out / "checkpoint-2"), *COMMON,
    ))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # Only step 3 was trained in this run: the log holds the restored history plus one new loss.
    assert [h["step"] for h in state["log_history"] if "loss" in h][-1] == 3, result.stdout[-2000:]


def test_generate_streams_and_samples(gpt2_checkpoint):
    result = ok(run_script("generate.py", "--model_name_or_path", str(gpt2_checkpoint), "--prompt", "Alice was",
                           "--max_new_tokens", "5"))
    assert "Alice was" in result.stdout
    result = ok(run_script("generate.py", "--model_name_or_path", str(gpt2_checkpoint), "--trust_remote_code",
                           "--prompt", "The", "--do_sample", "--top_k", "5", "--top_p", "0.9", "--temperature",
                           "0.7", "--num_return_sequences", "2", "--max_new_tokens", "4", "--seed", "1"))
    assert result.stdout.count("The") >= 2


def test_generate_compiled_gives_the_eager_text(gpt2_checkpoint):
    args = ("generate.py", "--model_name_or_path", str(gpt2_checkpoint), "--prompt", "Alice was", "--max_new_tokens",
            "6", "--no_stream")
    eager = ok(run_script(*args)).stdout
    assert ok(run_script(*args, "--compile")).stdout == eager


def test_generate_weights(gpt2_checkpoint):
    """--weights int8 converts the projections and generates (eager here; the compiled path is in test_decoding);
    a format it does not know, or one given with --dtype, is one error line."""
    base = ("generate.py", "--model_name_or_path", str(gpt2_checkpoint), "--prompt", "Alice was", "--max_new_tokens",
            "4", "--no_stream")
    assert "Alice was" in ok(run_script(*base, "--weights", "int8")).stdout
    for extra, message in ((("--weights", "int4"), "--weights int4 is not one of"),
                           (("--weights", "bf16", "--dtype", "bfloat16"), "drop --dtype")):
        result = run_script(*base, *extra)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_finetune_seq_cls_lora_merge_and_instruct(gpt2_checkpoint, workdir, tmp_path):
    rows = []
    for label in ("alice29", "botchan"):
        words = (workdir / f"{label}.txt").read_text().split()
        rows += [{"text": " ".join(words[i * 15:(i + 1) * 15]), "label": label} for i in range(12)]
    (tmp_path / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "cls"
    ok(run_script("finetune.py", "--model_name_or_path", str(gpt2_checkpoint), "--task", "seq_cls",
                  "--train_file", str(tmp_path / "cls.jsonl"), "--lm_loss_weight", "0.5", "--lora_r", "4",
                  "--merge_lora", "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
                  "--save_strategy", "no", "--learning_rate", "1e-3", "--output_dir", str(out), *COMMON))
    assert (out / "adapter" / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["lm_loss_weight"] == 0.5 and set(config["label2id"]) == {"alice29", "botchan"}
    results = json.loads((out / "all_results.json").read_text())
    assert {"accuracy", "eval_loss_before", "eval_accuracy_before"} <= set(results)  # held out: before and after
    assert [h["step"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h] \
        == [1, 2]

    import lmblocks  # noqa: F401
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(out)  # a plain checkpoint: no peft needed
    assert not any("lora" in name for name, _ in merged.named_parameters())

    rows = [{"instruction": f"Say {w}.", "response": w} for w in ("yes", "no", "maybe", "never")]
    (tmp_path / "ins.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "instruct"
    ok(run_script("finetune.py", "--model_name_or_path", str(gpt2_checkpoint), "--task", "instruct",
                  "--train_file", str(tmp_path / "ins.jsonl"), "--lora_r", "2", "--max_steps", "2",
                  "--save_strategy", "no", "--output_dir", str(out), *COMMON))
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "trainer_state.json").exists()  # the loss history, for plots


def test_pretrain_llama_from_dataset_with_trained_tokenizer(workdir, tmp_path):
    import datasets

    texts = [(workdir / f"{n}.txt").read_text() for n in ("alice29", "botchan")]
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "llama"
    result = ok(run_script(
        "pretrain.py", "--model_family", "llama", "--preset", "tiny",
        "--config_overrides", "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
                              "num_key_value_heads=1",
        "--dataset_name", str(tmp_path / "ds"), "--text_column", "body", "--tokenizer_vocab_size", "600",
        "--block_size", "32", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--output_dir", str(out), *COMMON,
    ))
    assert "saved llama" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lmb_llama" and config["vocab_size"] <= 600
    assert (out / "modeling_llama.py").exists() and (out / "tokenizer.json").exists()

    # Resume: two more steps from checkpoint-2, with the tokenizer the first run trained.
    ok(run_script(
        "pretrain.py", "--model_family", "llama", "--preset", "tiny",
        "--config_overrides", "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
                              "num_key_value_heads=1",
        "--dataset_name", str(tmp_path / "ds"), "--text_column", "body", "--tokenizer_name_or_path", str(out),
        "--block_size", "32", "--max_steps", "4", "--save_strategy", "no", "--eval_fraction", "0",
        "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-2"), *COMMON,
    ))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]


def test_pretrain_bert_mlm_nsp(workdir, tmp_path):
    out = tmp_path / "bert"
    result = ok(run_script(
        "pretrain.py", "--model_family", "bert", "--preset", "tiny",
        "--config_overrides", "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2",
        "--train_files", str(workdir / "alice29.txt"), str(workdir / "botchan.txt"), "--tokenizer_vocab_size", "500",
        "--block_size", "32", "--max_steps", "2", "--save_strategy", "no", "--output_dir", str(out), *COMMON,
    ))
    assert "saved bert" in result.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "lmb_bert"
    assert "eval_loss" in json.loads((out / "all_results.json").read_text())


# --- bad input ----------------------------------------------------------------------------------------------------

def _bad(workdir: Path, out: Path, *args: str, env: dict | None = None) -> str:
    result = run_script("pretrain.py", *args, "--output_dir", str(out), "--max_steps", "1", *COMMON, env=env)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert not (out / "config.json").exists(), "a failed run left a folder that looks like a checkpoint"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr


@pytest.mark.parametrize(
    "case",
    ["missing_corpus_file", "corpus_smaller_than_a_block", "unknown_family", "unknown_preset", "push_without_token"],
)
def test_pretrain_bad_input(case, workdir, tmp_path):
    tokenizer = ["--tokenizer_name_or_path", str(workdir / "tokenizer")]
    gpt2 = ["--model_family", "gpt2", "--preset", "tiny", "--config_overrides", TINY_GPT2]
    out = tmp_path / "out"
    if case == "missing_corpus_file":
        err = _bad(workdir, out, *gpt2, *tokenizer, "--train_files", str(workdir / "nope.txt"))
        assert "not found" in err and "nope.txt" in err
    elif case == "corpus_smaller_than_a_block":
        (tmp_path / "short.txt").write_text("Just a few words.")
        err = _bad(workdir, out, *gpt2, *tokenizer, "--train_files", str(tmp_path / "short.txt"), "--block_size", "64")
        assert "fewer than" in err and "block_size=64" in err
    elif case == "unknown_family":
        err = _bad(workdir, out, "--model_family", "gpt5", "--preset", "tiny", *tokenizer,
                   "--train_files", str(workdir / "alice29.txt"))
        assert "Unknown model family 'gpt5'" in err and ", ".join(lmblocks.FAMILIES) in err
    elif case == "unknown_preset":
        err = _bad(workdir, out, "--model_family", "gpt2", "--preset", "huge", *tokenizer,
                   "--train_files", str(workdir / "alice29.txt"))
        assert "Unknown gpt2 preset 'huge'" in err and "124M" in err
    else:
        env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN_PATH": str(tmp_path / "no_token")}
        err = _bad(workdir, out, *gpt2, *tokenizer, "--train_files", str(workdir / "alice29.txt"),
                   "--push_to_hub", "--hub_model_id", "org/name", env=env)
        assert "--push_to_hub needs Hugging Face credentials" in err
        assert not out.exists() or not any(out.iterdir())


def test_interrupted_save_leaves_no_complete_checkpoint(tmp_path):
    from lmblocks.training import staged_directory

    final = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with staged_directory(final) as staging:
            (staging / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed while saving")
    assert not (final / "config.json").exists() and not (final / "model.safetensors").exists()
    assert not list(final.glob(".staging-*"))
    with staged_directory(final) as staging:
        (staging / "model.safetensors").write_bytes(b"w")
        (staging / "config.json").write_text("{}")
    assert (final / "config.json").exists() and (final / "model.safetensors").exists()
