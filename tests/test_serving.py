"""What vLLM's Transformers backend needs from the code lmblocks copies into checkpoints, checked in a second without
vLLM (`make test-serving` runs vLLM itself; docs/serving.md explains each rule).

- vLLM drops every checkpoint tensor that a pattern of `_keys_to_ignore_on_load_unexpected` matches, so no pattern
  may match a real weight (an unanchored `attn\\.bias$` once dropped GPT-2's `c_attn.bias`).
- vLLM finds attention by parsing the attention module's `forward`: one local name assigned from
  `ALL_ATTENTION_FUNCTIONS`, called exactly once, with a `scaling=self.<float attribute>` keyword.
- vLLM ships remote-code classes to its engine process by value (cloudpickle), with the module globals their methods
  use: the copied files' module-level objects must pickle.
"""

from __future__ import annotations

import ast
import inspect
import pickle
import re
import sys
import textwrap
import types

import pytest
import torch

from families import FAMILIES
from lmblocks.layers import MultiHeadAttention


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_ignore_patterns_match_no_weight_of_the_base_model(family):
    """vLLM builds the family's AutoModel (the base model) and applies that class's patterns to the checkpoint, with
    the base-model prefix (`transformer.`, `model.`, `bert.`) mapped to `model.` or stripped."""
    with torch.device("meta"):
        model = family.base_class(family.tiny_config())
    patterns = model._keys_to_ignore_on_load_unexpected or []
    names = [f"{prefix}{name}" for name in model.state_dict() for prefix in ("", f"{model.base_model_prefix}.")]
    dropped = [(p, name) for p in patterns for name in names if re.search(p, name)]
    assert not dropped, f"{family.base_class.__name__}: ignore patterns match real weights (vLLM drops them): {dropped}"


def _interface_calls(forward) -> list[ast.Call]:
    """The calls in `forward`'s source to a name assigned from an `ALL_ATTENTION_FUNCTIONS` lookup."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(forward))))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = node.value.func if isinstance(node.value, ast.Call) else node.value
            if isinstance(value, (ast.Attribute, ast.Subscript)) and getattr(value.value, "id", None) == \
                    "ALL_ATTENTION_FUNCTIONS":
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_attention_forward_dispatches_where_vllm_looks(family):
    with torch.device("meta"):
        model = family.base_class(family.tiny_config())
    attention = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(attention) == model.config.num_hidden_layers
    for module in attention:
        calls = _interface_calls(type(module).forward)
        assert len(calls) == 1, f"{type(module).__name__}.forward makes {len(calls)} attention-interface calls"
        scaling = [kw.value for kw in calls[0].keywords if kw.arg == "scaling"]
        assert len(scaling) == 1 and isinstance(scaling[0], ast.Attribute) and scaling[0].value.id == "self"
        assert isinstance(getattr(module, scaling[0].attr), float)
        assert isinstance(module.layer_idx, int)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_module_globals_of_the_copied_files_pickle(family, tmp_path):
    family.base_class(family.tiny_config()).save_pretrained(tmp_path)  # the files transformers copies into the checkpoint
    copied = {path.stem for path in tmp_path.glob("*.py")}
    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("lmblocks.") and name.split(".")[-1] in copied]
    assert {m.__name__.split(".")[-1] for m in modules} == copied
    unpicklable = []
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, (types.ModuleType, type, types.FunctionType)) or name.startswith("__"):
                continue  # cloudpickle ships these by value or by reference itself
            try:
                pickle.dumps(value)
            except Exception as error:  # noqa: BLE001 - any failure is what the test reports
                unpicklable.append(f"{module.__name__}.{name}: {error}")
    assert not unpicklable, f"module-level objects vLLM cannot ship to its engine: {unpicklable}"
