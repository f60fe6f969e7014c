"""Run scripts/pretrain.py under a launcher and record what each rank ends with.

`accelerate launch ... tests/ddp_probe.py PRETRAIN_ARGS` trains exactly as `scripts/pretrain.py PRETRAIN_ARGS`, and at
the end of training every rank writes its weights and its loss history to `$LMB_PROBE_DIR/rank<R>.safetensors` and
`rank<R>.json`, so a test can check that the ranks agree and compare with a single-process run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(REPO_ROOT))

import pretrain  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class RecordRank(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        out = Path(os.environ["LMB_PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        from accelerate.state import PartialState

        param_types = sorted({type(p).__name__ for p in model.parameters()})
        weights = {}
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight":  # tied to the embeddings
                continue
            if hasattr(tensor, "full_tensor"):  # an FSDP2 shard (DTensor): gather the whole parameter
                tensor = tensor.full_tensor()
            weights[name] = tensor.detach().clone().contiguous()
        save_file(weights, str(out / f"rank{rank}.safetensors"))
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        (out / f"rank{rank}.json").write_text(json.dumps({
            "losses": losses, "world_size": args.world_size, "parameter_types": param_types,
            "distributed_type": str(PartialState().distributed_type), "backend": PartialState().backend}))


if __name__ == "__main__":
    model_args, data_args, training_args = pretrain.parse_args()
    pretrain.run_pretraining(model_args, data_args, training_args, callbacks=[RecordRank()])
