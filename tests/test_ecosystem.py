"""lmblocks models with the rest of the ecosystem, for every family in tests/families.py: peft, accelerate's
device_map offloading, Trainer, remote code without lmblocks, save/load, gradient checkpointing, embedding resizing.

Families with a causal-LM head are exercised through it; encoder-only families through their masked-LM head.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from families import DECODERS, FAMILIES, Family

@pytest.fixture(params=FAMILIES, ids=lambda family: family.name)
def family(request) -> Family:
    return request.param


@pytest.fixture(params=DECODERS, ids=lambda family: family.name)
def decoder(request) -> Family:
    return request.param


def _config(family: Family, **overrides):
    """The family's tiny config with its dropout options switched off (whatever they are called): most checks
    compare two forward passes."""
    config = family.tiny_config(**overrides)
    for name, value in vars(config).items():
        if isinstance(value, float) and ("pdrop" in name or "dropout" in name):
            setattr(config, name, 0.0)
    return config


def _lm_class(family: Family) -> type:
    return family.causal_lm_class or family.masked_lm_class


def _model(family: Family, model_class: type | None = None, **overrides):
    torch.manual_seed(0)
    return (model_class or _lm_class(family))(_config(family, **overrides))


def _ids(family: Family, batch_size: int = 2, length: int = 10) -> torch.Tensor:
    vocab_size = family.tiny_config().vocab_size
    return torch.randint(3, vocab_size - 2, (batch_size, length), generator=torch.Generator().manual_seed(4))


def _logits(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask).logits


# --- peft ------------------------------------------------------------------------------------------------------------


def test_lora_with_default_targets(family, tmp_path):
    model = _model(family)
    ids = _ids(family)
    before = _logits(model.eval(), ids)
    # No target_modules: peft picks them from the model_type lmblocks registers (integrations.py).
    task_type = "CAUSAL_LM" if family.causal_lm_class is not None else None
    peft_model = get_peft_model(model, LoraConfig(task_type=task_type, r=4, lora_alpha=8, lora_dropout=0.0))
    targeted = {name.rsplit(".", 2)[-2] for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    assert len(targeted) >= 3, f"LoRA should cover attention and MLP projections, got {sorted(targeted)}"

    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(5):
        optimizer.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    peft_model.eval()
    adapted = _logits(peft_model, ids)
    assert (adapted - before).abs().max() > 1e-3, "training the adapter did not change the output"

    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(_model(family).eval(), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(reloaded, ids), adapted, atol=1e-5, rtol=1e-5)

    merged = peft_model.merge_and_unload()
    assert type(merged) is _lm_class(family)
    torch.testing.assert_close(_logits(merged, ids), adapted, atol=1e-4, rtol=1e-4)


# --- accelerate: device_map="auto" with offloading -------------------------------------------------------------------


def test_device_map_auto_offloads_whole_blocks_to_disk(decoder, tmp_path):
    model = _model(decoder).eval()
    model.save_pretrained(tmp_path / "model")
    ids = _ids(decoder, batch_size=1, length=5)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **settings)

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    split = type(model).from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": int(0.6 * size)},  # what does not fit goes to disk
        offload_folder=tmp_path / "offload",
    ).eval()
    placements = split.hf_device_map
    assert set(placements.values()) == {"cpu", "disk"}, placements
    # `_no_split_modules`: a block is placed whole, never split between cpu and disk.
    no_split = set(split._no_split_modules)
    for name, module in split.named_modules():
        if type(module).__name__ in no_split:
            assert any(name == key or name.startswith(key + ".") for key in placements), f"{name} was split"
    assert torch.equal(split.generate(ids, **settings), expected)


# --- Trainer ---------------------------------------------------------------------------------------------------------


def test_trainer_lowers_the_loss(family, tmp_path):
    model = _model(family)
    ids = _ids(family, batch_size=8, length=16)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.9 * before, (before, after)


# --- remote code: loading without lmblocks ---------------------------------------------------------------------------

_REMOTE_LOAD = textwrap.dedent(
    """
    import sys
    sys.path.append({site_packages!r})  # without its .pth files, so lmblocks' editable install is not active
    try:
        import lmblocks
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("lmblocks is importable; the test would prove nothing")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True).eval()
    assert not type(model).__module__.startswith("lmblocks"), type(model).__module__
    with torch.no_grad():
        logits = model(input_ids=torch.load({ids!r})).logits
    torch.save({{"logits": logits, "class": type(model).__name__, "module": type(model).__module__}}, {out!r})
    """
)


def test_remote_code_loads_without_lmblocks(decoder, tmp_path):
    model = _model(decoder).eval()
    model.save_pretrained(tmp_path / "model")
    saved_code = {path.name for path in (tmp_path / "model").glob("*.py")}
    assert {"modeling_" + decoder.name + ".py", "configuration_" + decoder.name + ".py"} <= saved_code
    ids = _ids(decoder)
    torch.save(ids, tmp_path / "ids.pt")

    script = _REMOTE_LOAD.format(site_packages=sysconfig.get_paths()["purelib"], folder=str(tmp_path / "model"),
                                 ids=str(tmp_path / "ids.pt"), out=str(tmp_path / "out.pt"))
    # -I: no user site, no PYTHON* variables, no script directory on sys.path; -S: no site-packages .pth files.
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["class"] == type(model).__name__ and out["module"].startswith("transformers_modules")
    assert torch.equal(out["logits"], _logits(model, ids))


def test_auto_class_loads_our_checkpoint_in_process(decoder, tmp_path):
    model = _model(decoder).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # the Auto registration made by `import lmblocks`
    assert type(loaded) is type(model)


# --- save/load, gradient checkpointing, resizing ---------------------------------------------------------------------


def test_save_load_round_trip_is_exact(family, tmp_path):
    for model_class in family.all_classes:
        model = _model(family, model_class)
        model.save_pretrained(tmp_path / model_class.__name__)
        loaded, info = model_class.from_pretrained(tmp_path / model_class.__name__, output_loading_info=True)
        assert not any(info.values()), info  # nothing missing, unexpected or mismatched
        state, reloaded = model.state_dict(), loaded.state_dict()
        assert state.keys() == reloaded.keys()
        for name in state:
            assert torch.equal(state[name], reloaded[name]), f"{model_class.__name__}: {name}"


def test_gradient_checkpointing_gives_the_same_gradients(family):
    ids = _ids(family)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _model(family).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_resize_token_embeddings(family, tmp_path):
    model = _model(family).eval()
    vocab_size = model.config.vocab_size
    old_rows = model.get_input_embeddings().weight.detach().clone()
    ids = _ids(family)
    before = _logits(model, ids)

    model.resize_token_embeddings(vocab_size + 5)
    assert model.config.vocab_size == vocab_size + 5
    assert model.get_input_embeddings().weight.shape[0] == vocab_size + 5
    assert model.get_output_embeddings().weight.shape[0] == vocab_size + 5
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.get_input_embeddings().weight[:vocab_size], old_rows)
    # The appended new token is masked out, so old positions see what they saw before in any family, bidirectional too.
    extended = torch.cat([ids, torch.full((ids.shape[0], 1), vocab_size + 4)], dim=1)
    mask = torch.ones_like(extended)
    mask[:, -1] = 0
    after = _logits(model, extended, mask)
    assert after.shape[-1] == vocab_size + 5
    torch.testing.assert_close(after[:, :-1, :vocab_size], before)  # old tokens, old logits

    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.config.vocab_size == vocab_size + 5

    model.resize_token_embeddings(vocab_size - 3)
    assert model.get_output_embeddings().weight.shape[0] == vocab_size - 3
    assert _logits(model, ids.clamp(max=vocab_size - 4)).shape[-1] == vocab_size - 3
