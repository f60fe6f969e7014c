"""Every peft method that keeps per-model-type default targets works on every lmblocks family with no `target_modules`
(`lmblocks.integrations.register_peft_target_modules`, fed by each family's `PEFT_TARGET_MODULES`).

Per method and family: the config with no `target_modules` adapts exactly the family's table, one training step
changes the logits, the adapter saved and reloaded onto a fresh base in a new process gives the same logits, and
`merge_and_unload` gives them within 1e-5 where the method can merge. All adapters are trained in this process
first and reloaded in one subprocess (one interpreter start for the whole file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # noqa: E402
from peft.utils import PeftType  # noqa: E402

import lmblocks  # noqa: E402, F401  (registers the families, and so their peft defaults)
from lmblocks.integrations import _PEFT_TABLE_ROLES, peft_default_tables  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import FAMILIES, Family  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def _methods() -> dict[str, tuple[PeftType, str]]:
    """Method name -> (peft type, the role of the family's table it takes), for every peft table of defaults."""
    by_name = {peft_type.value.replace("_", "").upper(): peft_type for peft_type in PeftType}
    found = {}
    for table in peft_default_tables():
        if table in _PEFT_TABLE_ROLES and _PEFT_TABLE_ROLES[table] == "ia3_feedforward":
            continue  # IA3's second table, read by IA3 itself
        name = table.removeprefix("TRANSFORMERS_MODELS_TO_").removesuffix("_TARGET_MODULES_MAPPING")
        peft_type = by_name.get(name.replace("_", ""))
        if peft_type is not None and peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
            found[peft_type.value] = (peft_type, _PEFT_TABLE_ROLES.get(table, "projections"))
    return dict(sorted(found.items()))


METHODS = _methods()

# What a tiny model (width 64) needs where a method's defaults assume a big one: ranks, block and vector sizes,
# frequency counts. Never targets: those come from the registered defaults.
TINY_MODEL_OPTIONS: dict[str, dict] = {
    "ADALORA": dict(total_step=4),
    "C3A": dict(block_size=8),
    "FOURIERFT": dict(n_frequency=100),
    "MISS": dict(r=8),
    "PSOFT": dict(r=8),
    "ROAD": dict(group_size=8),
    "SHIRA": dict(r=4),
    "VBLORA": dict(vector_length=8),
    "WAVEFT": dict(n_frequency=100),
}
# Methods whose forward needs more than the token ids: Poly routes by task, through its tuner's own forward (a
# PeftModel without a task type does not pass `task_ids` on). Its layers take (B, T, C) inputs only, where BERT's
# fused masked-LM loss feeds the head's transform flat rows, so its step takes the loss from the logits.
NEEDS_TASK_IDS = {"POLY"}
# Methods that need a package lmblocks does not install.
NEEDS_PACKAGE = {"ADAMSS": "sklearn"}


def _lm_class(family: Family) -> type:
    return family.causal_lm_class or family.masked_lm_class


def _forward(model: PeftModel, method: str, input_ids: torch.Tensor, **kwargs):
    if method in NEEDS_TASK_IDS:
        return model.base_model(input_ids=input_ids, task_ids=torch.zeros(len(input_ids), dtype=torch.long), **kwargs)
    return model(input_ids=input_ids, **kwargs)


def _train_save_merge(family: Family, method: str, base_dir: Path, adapter_dir: Path, input_ids: torch.Tensor) -> dict:
    peft_type, role = METHODS[method]
    base = _lm_class(family).from_pretrained(base_dir)
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**TINY_MODEL_OPTIONS.get(method, {}))  # no target_modules
    model = get_peft_model(base, config)
    targets = model.peft_config["default"].target_modules
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    if method in NEEDS_TASK_IDS:
        logits = _forward(model, method, input_ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids.flatten()).backward()
    else:
        _forward(model, method, input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = _forward(model, method, input_ids).logits
    model.save_pretrained(adapter_dir)
    result = {
        "targets": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        "expected": sorted(family.base_class.peft_target_modules[role]),
        "changed": (logits - base_logits).abs().max().item(),
        "logits": logits.tolist(),
    }
    try:
        with torch.no_grad():
            merged = model.merge_and_unload()
            result["merge_error"] = (merged(input_ids=input_ids).logits - logits).abs().max().item()
    except (NotImplementedError, ValueError, AttributeError) as error:
        result["merge_unsupported"] = f"{type(error).__name__}: {error}"
    return result


def _reload(manifest: list[dict]) -> list[list]:
    """Runs in the new process: each adapter onto a fresh base from disk, its logits."""
    torch.set_num_threads(1)
    out = []
    for entry in manifest:
        family = next(f for f in FAMILIES if f.name == entry["family"])
        base = _lm_class(family).from_pretrained(entry["base_dir"])
        model = PeftModel.from_pretrained(base, entry["adapter_dir"]).eval()
        input_ids = torch.tensor(entry["input_ids"])
        with torch.no_grad():
            out.append(_forward(model, entry["method"], input_ids).logits.tolist())
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("peft_methods")
    results, manifest = {}, []
    for family in FAMILIES:
        base_dir = root / family.name / "base"
        _lm_class(family)(family.tiny_config()).save_pretrained(base_dir)
        input_ids = torch.randint(3, family.tiny_config().vocab_size, (2, 8))
        for method in METHODS:
            if method in NEEDS_PACKAGE:
                try:
                    __import__(NEEDS_PACKAGE[method])
                except ImportError:
                    results[family.name, method] = {"skip": f"{method} needs {NEEDS_PACKAGE[method]}, not installed"}
                    continue
            adapter_dir = root / family.name / method
            results[family.name, method] = _train_save_merge(family, method, base_dir, adapter_dir, input_ids)
            manifest.append({"family": family.name, "method": method, "base_dir": str(base_dir),
                             "adapter_dir": str(adapter_dir), "input_ids": input_ids.tolist()})
    manifest_file = root / "manifest.json"
    manifest_file.write_text(json.dumps(manifest))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, str(manifest_file)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reloaded = json.loads((root / "reloaded.json").read_text())
    for entry, logits in zip(manifest, reloaded):
        results[entry["family"], entry["method"]]["reloaded"] = logits
    return results


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_method_with_default_targets(trained, family, method):
    result = trained[family.name, method]
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["targets"] == result["expected"]
    assert result["changed"] > 0, "one training step left the logits unchanged"
    torch.testing.assert_close(torch.tensor(result["reloaded"]), torch.tensor(result["logits"]), rtol=0, atol=1e-6)
    if "merge_unsupported" in result:
        pytest.skip(f"{method} cannot merge on {family.name}: {result['merge_unsupported'][:160]}")
    assert result["merge_error"] <= 1e-5


def test_every_family_gives_every_role():
    """A family whose table lacks a role leaves those methods without defaults; lmblocks' families give them all."""
    roles = {"projections", *_PEFT_TABLE_ROLES.values()}
    for family in FAMILIES:
        assert roles <= set(family.base_class.peft_target_modules), family.name


if __name__ == "__main__":  # the new process of the reload check
    manifest_path = Path(sys.argv[1])
    reloaded_logits = _reload(json.loads(manifest_path.read_text()))
    (manifest_path.parent / "reloaded.json").write_text(json.dumps(reloaded_logits))
