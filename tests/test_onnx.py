"""ONNX: `torch.onnx.export(..., dynamo=True)` of a tiny lmblocks LLaMA and BERT, run by onnxruntime with other
shapes than it was traced with, gives lmblocks' logits (the commands of docs/usage.md, "Run it elsewhere")."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter writes the graph with it

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import BERT, LLAMA  # noqa: E402


class LogitsOnly(torch.nn.Module):
    """The model as ONNX sees it: token ids in, logits out, no cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("family", [LLAMA, BERT], ids=lambda f: f.name)
def test_onnx_export_runs_in_onnxruntime(tmp_path, family):
    torch.manual_seed(0)
    model = (family.causal_lm_class or family.masked_lm_class)(family.tiny_config()).eval()
    path = tmp_path / "model.onnx"
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    torch.onnx.export(LogitsOnly(model), (torch.randint(3, 99, (2, 9)),), path, dynamo=True,
                      input_names=["input_ids"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {0: batch, 1: length}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((2, 9), (3, 5)):
        input_ids = torch.randint(3, 99, shape)
        (logits,) = session.run(None, {"input_ids": input_ids.numpy()})
        with torch.no_grad():
            expected = model(input_ids=input_ids).logits
        torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-5, rtol=0)
