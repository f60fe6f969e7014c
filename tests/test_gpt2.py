"""GPT-2 specific tests: parity with transformers' built-in GPT-2 on the same weights, checkpoints in both directions,
clear errors for input that cannot be honoured, and the losses (auxiliary LM loss, `num_items_in_batch`)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from lmblocks import LmbGPT2Config, LmbGPT2ForSequenceClassification, LmbGPT2LMHeadModel, LmbGPT2Model
from lmblocks.modeling_gpt2 import export_to_transformers_gpt2

REPO_ROOT = Path(__file__).resolve().parent.parent
ATTENTION_IMPLEMENTATIONS = ["eager", "sdpa"]
LOGITS_ATOL = 1e-4  # the bound for fp32 parity


def _hf_config(**overrides) -> GPT2Config:
    # Dropout off so that train-mode forward passes are comparable too; vocabulary and width big enough that a wrong
    # transpose or a shifted position would show.
    values = dict(vocab_size=211, n_positions=64, n_embd=64, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, bos_token_id=210, eos_token_id=210, pad_token_id=0)
    return GPT2Config(**{**values, **overrides})


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A checkpoint written by transformers' own GPT2LMHeadModel (model_type "gpt2", Conv1D layout)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(_hf_config())
    folder = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(folder)
    return folder


def _batch() -> dict[str, torch.Tensor]:
    """Two rows, the second left-padded by three tokens."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 210, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3] = 0
    attention_mask[1, :3] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _pair(folder: Path, attn_implementation: str) -> tuple[GPT2LMHeadModel, LmbGPT2LMHeadModel]:
    theirs = GPT2LMHeadModel.from_pretrained(folder, attn_implementation=attn_implementation).eval()
    ours = LmbGPT2LMHeadModel.from_pretrained(folder, attn_implementation=attn_implementation).eval()
    return theirs, ours


# --- parity with transformers' GPT2LMHeadModel ---------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ATTENTION_IMPLEMENTATIONS)
def test_logits_and_loss_match_transformers(hf_folder, attn_implementation, record_property):
    theirs, ours = _pair(hf_folder, attn_implementation)
    assert ours.config._attn_implementation == attn_implementation
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = theirs(**batch, labels=labels)
        actual = ours(**batch, labels=labels)

    real = batch["attention_mask"].bool()  # padded positions attend to nothing useful in either model
    logits_diff = (expected.logits - actual.logits)[real].abs().max().item()
    loss_diff = (expected.loss - actual.loss).abs().item()
    record_property("max_abs_logits_diff", logits_diff)
    record_property("loss_diff", loss_diff)
    print(f"[{attn_implementation}] max |logits diff| = {logits_diff:.3g}, |loss diff| = {loss_diff:.3g}")
    assert logits_diff <= LOGITS_ATOL
    assert loss_diff <= LOGITS_ATOL


@pytest.mark.parametrize("attn_implementation", ATTENTION_IMPLEMENTATIONS)
def test_greedy_generation_matches_transformers(hf_folder, attn_implementation):
    theirs, ours = _pair(hf_folder, attn_implementation)
    batch = _batch()
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**batch, **settings), theirs.generate(**batch, **settings))


def test_train_mode_gradients_match_transformers(hf_folder):
    theirs, ours = _pair(hf_folder, "eager")
    theirs.train(), ours.train()
    batch = _batch()
    theirs(**batch, labels=batch["input_ids"]).loss.backward()
    ours(**batch, labels=batch["input_ids"]).loss.backward()
    # Conv1D stores (in, out), nn.Linear (out, in): compare through the transpose.
    ours_grad = ours.transformer.h[1].attn.c_attn.weight.grad
    theirs_grad = theirs.transformer.h[1].attn.c_attn.weight.grad
    torch.testing.assert_close(ours_grad, theirs_grad.T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.transformer.wte.weight.grad, theirs.transformer.wte.weight.grad,
                               atol=1e-5, rtol=1e-4)


# --- checkpoints in both directions ----------------------------------------------------------------------------------


def test_transformers_folder_loads_into_our_classes(hf_folder):
    model = LmbGPT2LMHeadModel.from_pretrained(hf_folder)
    assert isinstance(model.config, LmbGPT2Config)
    assert model.config.n_layer == 3 and model.config.n_embd == 64
    # Every weight came from the file: no parameter left at its random initialisation.
    hf_weights = load_file(hf_folder / "model.safetensors")
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight, hf_weights["transformer.h.0.attn.c_attn.weight"].T)
    torch.testing.assert_close(model.transformer.h[2].mlp.c_proj.weight, hf_weights["transformer.h.2.mlp.c_proj.weight"].T)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # The base model loads from the same folder, dropping the `transformer.` prefix.
    base = LmbGPT2Model.from_pretrained(hf_folder)
    torch.testing.assert_close(base.wpe.weight, hf_weights["transformer.wpe.weight"])


def test_our_checkpoint_is_a_plain_state_dict(hf_folder, tmp_path):
    """Loaded from transformers' layout, saved in ours: the file holds exactly `state_dict()`, so readers that bypass
    transformers' loader (Trainer's resume uses a plain `load_state_dict`) get the right tensors."""
    model = LmbGPT2LMHeadModel.from_pretrained(hf_folder)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied copy left out
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key
    fresh = LmbGPT2LMHeadModel(model.config)
    fresh.load_state_dict(saved, strict=False)
    for key, tensor in expected.items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


@pytest.mark.parametrize("our_class, their_class", [
    (LmbGPT2LMHeadModel, GPT2LMHeadModel),
    (LmbGPT2ForSequenceClassification, GPT2ForSequenceClassification),
])
def test_export_to_transformers_format(tmp_path, our_class, their_class):
    torch.manual_seed(0)
    config = LmbGPT2Config.from_preset("tiny", vocab_size=211, bos_token_id=210, eos_token_id=210, pad_token_id=0,
                                       num_labels=3)
    ours = our_class(config).eval()
    export_to_transformers_gpt2(ours, tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gpt2" and saved["architectures"] == [their_class.__name__]
    assert not list(tmp_path.glob("*.py")), "the export must not need lmblocks' code"
    theirs = their_class.from_pretrained(tmp_path).eval()
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, atol=LOGITS_ATOL, rtol=0)


def test_export_script_round_trip(tmp_path):
    """scripts/export_gpt2.py on a saved lmblocks checkpoint; the export loads back into lmblocks unchanged."""
    torch.manual_seed(0)
    ours = LmbGPT2LMHeadModel(LmbGPT2Config.from_preset("tiny")).eval()
    ours.save_pretrained(tmp_path / "lmb")
    # In-process (its `main`), which saves starting a second interpreter.
    spec = importlib.util.spec_from_file_location("export_gpt2", REPO_ROOT / "scripts" / "export_gpt2.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(tmp_path / "lmb"), str(tmp_path / "hf")])
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    back = LmbGPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    torch.testing.assert_close(theirs.transformer.h[0].attn.c_proj.weight, ours.transformer.h[0].attn.c_proj.weight.T)


def test_export_refuses_what_transformers_cannot_express():
    with pytest.raises(ValueError, match="qkv_bias=False"):
        export_to_transformers_gpt2(LmbGPT2LMHeadModel(LmbGPT2Config.from_preset("tiny", qkv_bias=False)), "unused")


def test_unsupported_transformers_variant_is_refused(tmp_path):
    GPT2Config(**_hf_config().to_dict() | {"scale_attn_by_inverse_layer_idx": True}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        LmbGPT2Config.from_pretrained(tmp_path)


# --- bad input gives a clear error -----------------------------------------------------------------------------------


def test_unknown_config_option():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n_heads'\].*n_head"):
        LmbGPT2Config(n_heads=8)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"Unknown lmb_gpt2 preset '125M'\. Available presets: 124M, 355M"):
        LmbGPT2Config.from_preset("125M")


def test_presets_follow_the_paper():
    config = LmbGPT2Config.from_preset("124M")
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_head, config.n_layer) == (50257, 1024, 768,
                                                                                                       12, 12)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1 and config.qkv_bias
    assert LmbGPT2Config.from_preset("1558M").n_layer == 48


def test_width_not_divisible_by_heads():
    with pytest.raises(Exception, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        LmbGPT2Config(n_embd=30, n_head=4)


def test_sequence_longer_than_n_positions():
    model = LmbGPT2LMHeadModel(LmbGPT2Config.from_preset("tiny", n_positions=16)).eval()
    with pytest.raises(ValueError, match=r"Sequence length 17 .* exceeds n_positions=16"):
        model(torch.ones(1, 17, dtype=torch.long))
    # Also when the overflow comes from the cache: 12 cached + 5 new tokens.
    past = model(torch.ones(1, 12, dtype=torch.long), use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"Sequence length 17 \(cached 12 \+ new 5\) exceeds n_positions=16"):
        model(torch.ones(1, 5, dtype=torch.long), past_key_values=past)
    with pytest.raises(ValueError, match="n_positions=16"):
        model.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10, do_sample=False)


def test_checkpoint_with_mismatched_shapes(hf_folder, caplog):
    config = LmbGPT2Config.from_pretrained(hf_folder, n_inner=128)  # the checkpoint's MLP is 4·64 = 256 wide
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LmbGPT2LMHeadModel.from_pretrained(hf_folder, config=config)
    # transformers' load report names each tensor and both shapes.
    assert "mlp.c_fc.weight" in caplog.text and "MISMATCH" in caplog.text
    assert "256" in caplog.text and "128" in caplog.text


def test_state_dict_loads_without_a_checkpoint():
    model = LmbGPT2LMHeadModel(LmbGPT2Config.from_preset("tiny"))
    loaded = LmbGPT2LMHeadModel.from_pretrained(None, config=model.config, state_dict=model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


# --- losses ----------------------------------------------------------------------------------------------------------


def test_num_items_in_batch_gives_sum_over_items():
    """Trainer passes num_items_in_batch under gradient accumulation: the loss must then be sum / N, not a mean."""
    model = LmbGPT2LMHeadModel(LmbGPT2Config.from_preset("tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    batch = _batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels, num_items_in_batch=torch.tensor(50))  # training mode: the fused loss, no logits

    shifted_logits = model.eval()(**batch).logits[:, :-1].reshape(-1, model.config.vocab_size)
    shifted_labels = labels[:, 1:].reshape(-1)
    token_loss_sum = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100,
                                                       reduction="sum")
    torch.testing.assert_close(out.loss, token_loss_sum / 50)
    # Without it, the usual mean over the non-ignored targets.
    mean = model(**batch, labels=labels).loss
    torch.testing.assert_close(mean, token_loss_sum / (shifted_labels != -100).sum())


def test_trainer_sees_that_the_model_takes_loss_kwargs():
    """Trainer forwards num_items_in_batch only to models whose forward accepts **kwargs (#47688)."""
    from transformers import Trainer, TrainingArguments

    model = LmbGPT2LMHeadModel(LmbGPT2Config.from_preset("tiny"))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir="unused", report_to=[], use_cpu=True))
    assert trainer.model_accepts_loss_kwargs


@pytest.mark.parametrize("lm_loss_weight", [0.0, 0.5])
def test_sequence_classification_auxiliary_lm_loss(lm_loss_weight):
    """L = L_task + λ·L_LM (GPT paper, section 3.2), padding ignored in L_LM."""
    config = LmbGPT2Config.from_preset("tiny", vocab_size=211, pad_token_id=0, bos_token_id=210, eos_token_id=210,
                                       num_labels=3, lm_loss_weight=lm_loss_weight, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0)
    model = LmbGPT2ForSequenceClassification(config)
    batch = _batch()
    labels = torch.tensor([2, 0])
    out = model(**batch, labels=labels)

    task_loss = torch.nn.functional.cross_entropy(out.logits, labels)
    hidden = model.transformer(**batch).last_hidden_state
    lm_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    # L_LM: each sequence's mean next-token loss, averaged over the sequences (exact under gradient accumulation).
    per_sequence = [
        torch.nn.functional.cross_entropy(model.lm_head(hidden[i, :-1]), lm_labels[i, 1:], ignore_index=-100)
        for i in range(len(labels))
    ]
    lm_loss = torch.stack(per_sequence).mean()
    torch.testing.assert_close(out.loss, task_loss + lm_loss_weight * lm_loss)
    # The classifier pools the last real token of each row (the rows are left-padded here, so the last column).
    torch.testing.assert_close(out.logits, model.score(hidden[:, -1]))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_resize_position_embeddings_allows_longer_sequences():
    model = LmbGPT2LMHeadModel(LmbGPT2Config.from_preset("tiny", n_positions=16)).eval()
    old_rows = model.get_position_embeddings().weight.detach().clone()
    model.resize_position_embeddings(24)
    new_rows = model.get_position_embeddings().weight
    assert model.config.n_positions == 24 and new_rows.shape == (24, 64)
    assert torch.equal(new_rows[:16], old_rows)
    assert 0.5 * 0.02 < new_rows[16:].std() < 2 * 0.02  # initialised like at construction, not zeros
    assert model(torch.ones(1, 24, dtype=torch.long)).logits.shape == (1, 24, 1024)
