"""Keys of a config.json that lmblocks does not use load, are kept, and are said once at the default log level; a
near miss of a real field names the field (issue 22, item 6)."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoConfig

from families import FAMILIES, LLAMA


def near_miss(config_class) -> tuple[str, str]:
    """(a misspelling, the field it misses) of the family's layer count: `num_hidden_layer`, `n_laye`."""
    field = "num_hidden_layers" if "num_hidden_layers" in config_class.__dataclass_fields__ else "n_layer"
    return field[:-1], field


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_unknown_config_keys_are_logged_once_with_the_nearest_field(family, tmp_path, caplog):
    family.tiny_config().save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    misspelt, field = near_miss(family.config_class)
    # A key name of this test's own, so transformers' once-per-message memory cannot hide the line.
    unexpected = f"my_unexpected_key_{family.name}"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), unexpected: 123, misspelt: 2}))

    # No caplog.set_level: the level a user has by default.
    config = AutoConfig.from_pretrained(tmp_path)
    AutoConfig.from_pretrained(tmp_path)  # once

    lines = [r for r in caplog.records if unexpected in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert lines[0].levelno == logging.WARNING
    assert f"{misspelt!r} (did you mean {field!r}?)" in lines[0].getMessage()
    assert f"{unexpected!r}" in lines[0].getMessage() and "my_unexpected_key_" in lines[0].getMessage()
    # Kept as they are (and so saved again), without changing the field they resemble.
    assert getattr(config, unexpected) == 123 and getattr(config, misspelt) == 2
    assert getattr(config, field) == getattr(family.tiny_config(), field)


def test_a_misspelt_attribute_warns_with_the_same_hint(caplog):
    config = LLAMA.tiny_config()
    config.num_hidden_layes = 3
    [line] = [r.getMessage() for r in caplog.records if "num_hidden_layes" in r.getMessage()]
    assert "(did you mean 'num_hidden_layers'?)" in line
