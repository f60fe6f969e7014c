"""lmblocks' BERT against transformers' own: same weights, same outputs; checkpoints in both directions (including the
old `LayerNorm.gamma` / `beta` names); configs; LoRA defaults; and a clear error for every input it cannot honour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file

from lmblocks import (
    LmbBertConfig,
    LmbBertForMaskedLM,
    LmbBertForPreTraining,
    LmbBertForSequenceClassification,
    LmbBertModel,
)

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=24, type_vocab_size=2)
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A folder written by transformers' BertForPreTraining.save_pretrained (the layout of bert-base-uncased), with
    every weight random — LayerNorms and the MLM bias included, so that none of them can match by accident."""
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(transformers.BertConfig(**TINY))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.1)
    folder = tmp_path_factory.mktemp("hf_bert")
    model.save_pretrained(folder)
    return folder


def _inputs(batch: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    """Pairs with token types and right padding of different lengths (one row unpadded)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, TINY["vocab_size"], (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 8:] = 0
    attention_mask[2, 4:] = 0
    token_type_ids = torch.zeros(batch, length, dtype=torch.long)
    token_type_ids[:, length // 2 :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# (our class, transformers' class, output fields to compare)
PARITY_CASES = [
    (LmbBertForPreTraining, "BertForPreTraining", ("prediction_logits", "seq_relationship_logits")),
    (LmbBertForMaskedLM, "BertForMaskedLM", ("logits",)),
    (LmbBertModel, "BertModel", ("last_hidden_state", "pooler_output")),
]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("ours_class,hf_name,fields", PARITY_CASES, ids=[c[1] for c in PARITY_CASES])
def test_parity_with_transformers(hf_folder, ours_class, hf_name, fields, attn_implementation):
    hf_class = getattr(transformers, hf_name)
    reference = hf_class.from_pretrained(hf_folder, attn_implementation=attn_implementation).eval()
    ours, info = ours_class.from_pretrained(hf_folder, attn_implementation=attn_implementation,
                                           output_loading_info=True)
    ours.eval()
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert ours.config._attn_implementation == attn_implementation
    inputs = _inputs()
    with torch.no_grad():
        expected = reference(**inputs, output_hidden_states=True)
        actual = ours(**inputs, output_hidden_states=True)
    diffs = {field: _max_diff(getattr(actual, field), getattr(expected, field)) for field in fields}
    diffs["hidden_states"] = max(_max_diff(a, e) for a, e in zip(actual.hidden_states, expected.hidden_states))
    assert len(actual.hidden_states) == TINY["num_hidden_layers"] + 1
    figures = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
    print(f"parity {ours_class.__name__} [{attn_implementation}]: {figures}")
    assert max(diffs.values()) <= ATOL, diffs


def test_parity_losses_and_attentions(hf_folder):
    reference = transformers.BertForPreTraining.from_pretrained(hf_folder, attn_implementation="eager").eval()
    ours = LmbBertForPreTraining.from_pretrained(hf_folder, attn_implementation="eager").eval()
    inputs = _inputs()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 2:5] = inputs["input_ids"][:, 2:5]
    next_sentence_label = torch.tensor([0, 1, 0])
    with torch.no_grad():
        expected = reference(**inputs, labels=labels, next_sentence_label=next_sentence_label, output_attentions=True)
        actual = ours(**inputs, labels=labels, next_sentence_label=next_sentence_label, output_attentions=True)
    assert abs(actual.loss.item() - expected.loss.item()) <= ATOL
    torch.testing.assert_close(actual.loss, actual.mlm_loss + actual.nsp_loss)
    for a, e in zip(actual.attentions, expected.attentions, strict=True):
        assert _max_diff(a, e) <= ATOL
    # Padding gets no attention.
    assert actual.attentions[0][2, :, :, 4:].abs().max() == 0


def test_switching_attention_implementation_keeps_outputs(hf_folder):
    model = LmbBertForMaskedLM.from_pretrained(hf_folder, attn_implementation="eager").eval()
    inputs = _inputs()
    with torch.no_grad():
        eager = model(**inputs).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(**inputs).logits
    assert model.config._attn_implementation == "sdpa"
    assert _max_diff(eager, sdpa) <= ATOL


# --- checkpoints -----------------------------------------------------------------------------------------------------


def test_hf_folder_loads_with_no_renaming(hf_folder):
    state = load_file(hf_folder / "model.safetensors")
    model = LmbBertForPreTraining.from_pretrained(hf_folder)
    ours = model.state_dict()
    # Every tensor of the transformers checkpoint lands, under the same name, in our model.
    for name, tensor in state.items():
        assert torch.equal(ours[name], tensor), name
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.config.model_type == "lmb_bert" and model.config.hidden_size == TINY["hidden_size"]


def test_legacy_gamma_beta_checkpoint(hf_folder, tmp_path):
    """Some BERT checkpoints (converted from TensorFlow) name LayerNorm parameters `gamma` / `beta`; transformers'
    built-in legacy renaming maps them to weight / bias on load."""
    state = load_file(hf_folder / "model.safetensors")
    legacy = {
        name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): tensor
        for name, tensor in state.items()
    }
    assert sum("gamma" in n for n in legacy) == 2 * TINY["num_hidden_layers"] + 2
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())

    model, info = LmbBertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    reference = LmbBertForPreTraining.from_pretrained(hf_folder)
    inputs = _inputs()
    with torch.no_grad():
        assert _max_diff(model.eval()(**inputs).prediction_logits, reference.eval()(**inputs).prediction_logits) == 0


def test_export_back_to_transformers(hf_folder, tmp_path):
    ours = LmbBertForPreTraining.from_pretrained(hf_folder).eval()
    ours.save_pretrained(tmp_path)
    # The same tensor names as transformers writes.
    assert load_file(tmp_path / "model.safetensors").keys() == load_file(hf_folder / "model.safetensors").keys()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "lmb_bert" and "AutoModelForPreTraining" in saved["auto_map"]

    reference, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = _inputs()
    with torch.no_grad():
        expected, actual = reference.eval()(**inputs), ours(**inputs)
    assert _max_diff(actual.prediction_logits, expected.prediction_logits) <= ATOL
    assert _max_diff(actual.seq_relationship_logits, expected.seq_relationship_logits) <= ATOL


def test_base_model_loads_from_pretraining_checkpoint_and_back(hf_folder, tmp_path):
    """The `bert.` prefix is stripped and added as transformers does for its own BERT."""
    base = LmbBertModel.from_pretrained(hf_folder)
    base.save_pretrained(tmp_path)
    classifier, info = LmbBertForSequenceClassification.from_pretrained(tmp_path, num_labels=3,
                                                                        output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(classifier.bert.pooler.dense.weight, base.pooler.dense.weight)


def test_device_map_auto(hf_folder):
    model = LmbBertForPreTraining.from_pretrained(hf_folder, device_map="auto").eval()
    reference = LmbBertForPreTraining.from_pretrained(hf_folder).eval()
    inputs = _inputs()
    with torch.no_grad():
        assert _max_diff(model(**inputs).prediction_logits, reference(**inputs).prediction_logits) == 0


# --- configs ---------------------------------------------------------------------------------------------------------


def test_presets_have_the_paper_sizes():
    sizes = {}
    for name in ("base", "large"):
        with torch.device("meta"):
            model = LmbBertForPreTraining(LmbBertConfig.from_preset(name))
        # The decoder weight is the word embedding matrix: count it once.
        sizes[name] = sum(p.numel() for p in model.parameters()) / 1e6
    assert 108 < sizes["base"] < 112, sizes
    assert 333 < sizes["large"] < 338, sizes
    base = LmbBertConfig.from_preset("base")
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads) == (12, 768, 12)
    large = LmbBertConfig.from_preset("large")
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)
    assert LmbBertConfig.from_preset("tiny").num_hidden_layers == 2
    assert LmbBertConfig.from_preset("small", num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="Available presets"):
        LmbBertConfig.from_preset("huge")


def test_reads_transformers_bert_config(tmp_path):
    hf_config = transformers.BertConfig(**TINY, hidden_act="gelu_new", layer_norm_eps=1e-7)
    data = hf_config.to_dict()
    data.update(position_embedding_type="absolute", gradient_checkpointing=False)  # keys of older config.json files
    config = LmbBertConfig.from_dict(data)
    assert config.model_type == "lmb_bert"
    assert (config.hidden_size, config.intermediate_size, config.hidden_act, config.layer_norm_eps) == (
        32, 37, "gelu_new", 1e-7)
    unsupported = (("is_decoder", True), ("add_cross_attention", True), ("position_embedding_type", "relative_key"))
    for key, value in unsupported:
        with pytest.raises(ValueError, match=f"{key}={value!r}"):
            LmbBertConfig.from_dict({**data, key: value})


def test_config_errors_name_the_numbers():
    # The validator raises ValueError; huggingface_hub's strict dataclass wraps it, message included.
    invalid = (ValueError, StrictDataclassError)
    with pytest.raises(invalid, match=r"hidden_size \(100\) must be divisible by num_attention_heads \(12\)"):
        LmbBertConfig(hidden_size=100)
    with pytest.raises(invalid, match="hidden_dropout_prob must be in \\[0, 1\\), got 1.5"):
        LmbBertConfig(hidden_dropout_prob=1.5)
    with pytest.raises(invalid, match="type_vocab_size must be positive, got 0"):
        LmbBertConfig(type_vocab_size=0)
    with pytest.raises(invalid, match=r"pad_token_id \(200\) must be in \[0, vocab_size=100\)"):
        LmbBertConfig(vocab_size=100, pad_token_id=200)
    with pytest.raises(ValueError, match="unknown option"):
        LmbBertConfig(num_heads=8)
    assert LmbBertConfig(hidden_size=256, num_attention_heads=4).intermediate_size == 1024


# --- LoRA ------------------------------------------------------------------------------------------------------------


def test_lora_default_targets():
    from peft import LoraConfig, get_peft_model

    model = LmbBertForMaskedLM(LmbBertConfig(**TINY))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4))  # no target_modules given
    targeted = {name.rsplit(".", 2)[-2] for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    assert targeted == {"query", "key", "value", "dense"}


# --- bad input -------------------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors():
    model = LmbBertForPreTraining(LmbBertConfig(**TINY)).eval()
    ids = torch.randint(5, 99, (2, 10))
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[1, 5:] = 2  # a third segment in a model with two
    with pytest.raises(ValueError, match=r"token_type_ids must be in \[0, type_vocab_size=2\), got values in \[0, 2\]"):
        model(ids, token_type_ids=token_type_ids)
    with pytest.raises(ValueError, match=r"got values in \[-2, 2\]"):
        model(ids, token_type_ids=token_type_ids - token_type_ids.roll(1, 0))
    too_long = torch.randint(5, 99, (1, TINY["max_position_embeddings"] + 1))
    with pytest.raises(ValueError, match="Sequence length 25 exceeds max_position_embeddings=24"):
        model(too_long)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=torch.zeros(2, 10, TINY["hidden_size"]))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, sequence\)"):
        model(ids[0])
    # At the limit it runs.
    model(torch.randint(5, 99, (1, TINY["max_position_embeddings"])))


def test_resized_vocabulary_keeps_old_logits():
    """Resizing grows the tied decoder and its bias together; old tokens keep their logits (the new token is masked
    out: in a bidirectional model every position would otherwise see it)."""
    torch.manual_seed(0)
    model = LmbBertForMaskedLM(LmbBertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    ids = torch.randint(5, 99, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
        model.resize_token_embeddings(104)
        grown = torch.cat([ids, torch.full((2, 1), 103)], dim=1)
        mask = torch.ones_like(grown)
        mask[:, -1] = 0
        after = model(grown, attention_mask=mask).logits
    predictions = model.cls.predictions
    assert predictions.bias.shape == (104,) and predictions.decoder.bias is predictions.bias
    assert _max_diff(after[:, :-1, :99], before) <= 1e-6


def test_loss_is_exact_under_gradient_accumulation():
    """With Trainer's `num_items_in_batch` (masked tokens in the accumulated batch), two half-batch MLM losses sum to
    the full-batch loss, and the NSP term stays an average rather than doubling."""
    torch.manual_seed(0)
    model = LmbBertForPreTraining(LmbBertConfig(**TINY, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0)).eval()
    ids = torch.randint(5, 99, (4, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 1:4] = ids[0, 1:4]
    labels[1, 2] = ids[1, 2]
    labels[2:, 5:7] = ids[2:, 5:7]
    nsl = torch.tensor([0, 1, 1, 0])
    total = (labels != -100).sum()
    with torch.no_grad():
        full = model(ids, labels=labels, next_sentence_label=nsl)
        halves = [model(ids[s], labels=labels[s], next_sentence_label=nsl[s], num_items_in_batch=total)
                  for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(halves[0].mlm_loss + halves[1].mlm_loss, full.mlm_loss)
    nsp_sum = halves[0].nsp_loss + halves[1].nsp_loss
    assert nsp_sum < 1.5 * full.nsp_loss  # an average of the halves' means, not their sum


# --- remote code -----------------------------------------------------------------------------------------------------

_REMOTE_LOAD = """
import sys
sys.path.append({site_packages!r})  # without its .pth files, so lmblocks' editable install is not active
try:
    import lmblocks
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("lmblocks is importable; the test would prove nothing")
import torch
from transformers import AutoModelForPreTraining

model = AutoModelForPreTraining.from_pretrained({folder!r}, trust_remote_code=True).eval()
with torch.no_grad():
    out = model(**torch.load({inputs!r}))
torch.save({{"logits": out.prediction_logits, "module": type(model).__module__, "class": type(model).__name__}},
           {out!r})
"""


def test_remote_code_loads_without_lmblocks(hf_folder, tmp_path):
    model = LmbBertForPreTraining.from_pretrained(hf_folder).eval()
    model.save_pretrained(tmp_path / "model")
    saved_code = {path.name for path in (tmp_path / "model").glob("*.py")}
    assert {"modeling_bert.py", "configuration_bert.py", "layers.py", "integrations.py"} <= saved_code
    inputs = _inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    script = _REMOTE_LOAD.format(site_packages=sysconfig.get_paths()["purelib"], folder=str(tmp_path / "model"),
                                 inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path / "out.pt"))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["class"] == "LmbBertForPreTraining" and out["module"].startswith("transformers_modules")
    with torch.no_grad():
        assert torch.equal(out["logits"], model(**inputs).prediction_logits)
