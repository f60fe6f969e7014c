"""`lmblocks.families.FAMILIES` is the one per-family table: every entry has what the rest of the project needs, and
no code outside a family's own files tests a family's name (issue 23). Adding a family that misses a piece fails
here, by name."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmblocks
from lmblocks.families import FAMILIES
from lmblocks.tokenization_trainer import TOKENIZER_KINDS

import families as test_families

REPO_ROOT = Path(__file__).resolve().parent.parent
HUB_CONFIGS = REPO_ROOT / "tests" / "fixtures" / "hub_configs"
# The family checkpoints tests/test_real_models.py runs on (.cache/models, fetched by scripts/fetch_assets.py), by the
# `model_type` of their config.json.
REAL_MODELS = REPO_ROOT / ".cache" / "models"


@pytest.mark.parametrize("name", FAMILIES)
def test_family_has_a_test_family_and_a_common_test_declaration(name):
    spec = FAMILIES[name]
    assert [f for f in test_families.FAMILIES if f.spec is spec], f"tests/families.py has no entry for {name}"
    common = REPO_ROOT / "tests" / f"test_{name}_common.py"
    assert common.is_file() and "common_model_test(" in common.read_text(), f"{common} declares no common tests"


@pytest.mark.parametrize("name", FAMILIES)
def test_family_has_a_hub_config_fixture(name):
    foreign = FAMILIES[name].config_class.foreign_model_type
    types = {json.loads(path.read_text()).get("model_type") for path in HUB_CONFIGS.glob("*.json")}
    assert foreign in types, f"no config.json from the Hub with model_type {foreign!r} in {HUB_CONFIGS}"


@pytest.mark.parametrize("name", FAMILIES)
def test_family_has_a_tokenizer_kind_with_its_special_tokens(name):
    spec = FAMILIES[name]
    assert spec.tokenizer_kind in TOKENIZER_KINDS
    assert spec.special_tokens == TOKENIZER_KINDS[spec.tokenizer_kind].special_tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_family_lora_targets_name_modules_of_its_model(name):
    spec = FAMILIES[name]
    family = next(f for f in test_families.FAMILIES if f.spec is spec)
    model = spec.pretraining_class(family.tiny_config())
    leaves = {module_name.rsplit(".", 1)[-1] for module_name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear)}
    assert spec.lora_target_modules and set(spec.lora_target_modules) <= leaves


@pytest.mark.parametrize("name", FAMILIES)
def test_family_has_a_bench_entry(name):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import harness
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    assert name in harness.FAMILIES and "tiny" in harness.FAMILIES[name].sizes
    assert harness.FAMILIES[name].is_decoder == FAMILIES[name].is_decoder


def test_serving_covers_every_family():
    """tests_serving builds one checkpoint per family and serves every decoder (generate) and encoder (embed)."""
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tests_serving" / "build_checkpoints.py"), "--families"],
                         check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout
    served = json.loads(out)
    assert sorted(served["decoders"] + served["encoders"]) == sorted(FAMILIES)
    assert set(served["decoders"]) == {name for name, spec in FAMILIES.items() if spec.is_decoder}


def test_real_checkpoints_are_covered_where_one_exists():
    """A real checkpoint of a family in .cache/models is one tests/test_real_models.py runs on."""
    if not REAL_MODELS.is_dir():
        pytest.skip("no real checkpoints fetched (scripts/fetch_assets.py)")
    source = (REPO_ROOT / "tests" / "test_real_models.py").read_text()
    foreign = {spec.config_class.foreign_model_type for spec in FAMILIES.values()}
    for folder in REAL_MODELS.iterdir():
        config = folder / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("model_type") in foreign:
            assert folder.name in source, f"{folder} is a family checkpoint no test in test_real_models.py loads"


# A comparison with a literal family name on either side, or a membership test of one (`x in ("gpt2", ...)`,
# `"llama" in families`): the project's before-stop check (shared/hooks/before-stop), and the reversed forms.
_NAMES = "|".join(FAMILIES)
_NAME_BRANCH = re.compile(rf"""(==|!=)\s*["']({_NAMES})["']|["']({_NAMES})["']\s*(==|!=|(not\s+)?in\b)"""
                          rf"""|\bin\s*[(\[{{]\s*["']({_NAMES})["']""")


def test_no_code_outside_a_familys_own_files_branches_on_its_name():
    found = []
    for folder in ("lmblocks", "scripts", "bench", "tests_serving"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT).as_posix()
            if re.match(r"lmblocks/(modeling_|configuration_|families\.py)", relative):
                continue
            found += [f"{relative}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                      if _NAME_BRANCH.search(line)]
    assert not found, "ask lmblocks.families (spec.objective, spec.tokenizer_kind, spec.is_decoder) instead:\n" + \
        "\n".join(found)


def test_lmblocks_exports_every_family():
    for spec in FAMILIES.values():
        for cls in (spec.config_class, *spec.model_classes):
            assert getattr(lmblocks, cls.__name__) is cls
