"""Beyond one process, on CPU (gloo).

DDP: `accelerate launch --num_processes 2` runs scripts/pretrain.py; both ranks end with identical weights, and the
per-step losses equal those of one process that takes the same global batch (2 ranks × 2 sequences = 1 process × 4
sequences; accelerate's seeded sampler gives both runs the same sample order, and dropout is off so the arithmetic is
the same up to the order of floating-point sums).

FSDP: accelerate 1.15 does not apply FSDP to a CPU process group (`AcceleratorState` switches to FSDP only for GPU-like
distributed types; with gloo on CPU the flags are ignored and the run is plain DDP), so the sharded test calls
PyTorch's FSDP2 itself: `torchrun` starts 2 processes, `fully_shard` shards a tiny lmblocks model (each block, then
the root) over a CPU device mesh, and three training steps give the losses and weights of the unsharded model trained
on the whole batch in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE = REPO_ROOT / "tests" / "ddp_probe.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small corpus and a trained GPT-2 tokenizer, shared by the runs."""
    from lmblocks.tokenization_trainer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("distributed")
    corpus = root / "corpus.txt"
    corpus.write_text((REPO_ROOT / ".cache" / "corpus" / "alice29.txt").read_text(errors="replace")[:40000])
    tokenizer = train_tokenizer([str(corpus)], "gpt2", vocab_size=300, show_progress=False)
    save_tokenizer(tokenizer, root / "tokenizer")
    return root


def pretrain_args(root: Path, per_device_batch: int, out: str) -> list[str]:
    return [
        "--model_family", "gpt2", "--preset", "tiny",
        "--config_overrides", "n_embd=32,n_layer=2,n_head=2,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0",
        "--train_files", str(root / "corpus.txt"), "--tokenizer_name_or_path", str(root / "tokenizer"),
        "--block_size", "32", "--max_steps", "4", "--logging_steps", "1", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", str(per_device_batch), "--output_dir", str(root / out),
        "--report_to", "none", "--save_strategy", "no", "--eval_fraction", "0", "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false", "--use_cpu", "true", "--seed", "7",
    ]


def run(cmd: list[str], probe_dir: Path, timeout: int = 300) -> None:
    env = {**os.environ, "LMB_PROBE_DIR": str(probe_dir), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(extra: list[str]) -> list[str]:
    # A free rendezvous port: torchrun's default 29500 collides with any other distributed run on the machine.
    return [str(ACCELERATE), "launch", *extra, "--num_processes", "2", "--num_machines", "1",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
            "--mixed_precision", "no", "--dynamo_backend", "no", str(PROBE)]


def read_probe(probe_dir: Path, rank: int) -> tuple[dict, dict]:
    return json.loads((probe_dir / f"rank{rank}.json").read_text()), load_file(probe_dir / f"rank{rank}.safetensors")


@pytest.fixture(scope="module")
def single_process(setup):
    """One process taking the global batch of 4."""
    probe = setup / "probe_single"
    run([sys.executable, str(PROBE), *pretrain_args(setup, 4, "single")], probe)
    return read_probe(probe, 0)


def test_ddp_two_processes_match_one(setup, single_process):
    probe = setup / "probe_ddp"
    # `--multi_gpu` selects accelerate's multi-process launcher (torchrun); without CUDA, accelerate sets the
    # distributed type to MULTI_CPU with the gloo backend.
    run(launch(["--multi_gpu"]) + pretrain_args(setup, 2, "ddp"), probe)
    (info0, weights0), (info1, weights1) = read_probe(probe, 0), read_probe(probe, 1)
    assert info0["world_size"] == info1["world_size"] == 2
    assert info0["distributed_type"] == "DistributedType.MULTI_CPU" and info0["backend"] == "gloo"
    assert weights0.keys() == weights1.keys()
    for name in weights0:
        assert torch.equal(weights0[name], weights1[name]), f"ranks differ in {name}"

    single_info, single_weights = single_process
    assert len(info0["losses"]) == len(single_info["losses"]) == 4
    torch.testing.assert_close(torch.tensor(info0["losses"]), torch.tensor(single_info["losses"]),
                               rtol=1e-4, atol=1e-4)
    for name in weights0:
        torch.testing.assert_close(weights0[name], single_weights[name], rtol=1e-3, atol=1e-4, msg=name)
    # The finished folder is written once, by rank 0, and loads.
    assert (setup / "ddp" / "config.json").exists() and not list((setup / "ddp").glob(".staging-*"))


_FSDP_WORKER = textwrap.dedent(
    """
    import copy, json, os, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import lmblocks

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = lmblocks.LmbLlamaConfig.from_preset("tiny", vocab_size=99, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = lmblocks.LmbLlamaForCausalLM(config).train()
    unsharded = copy.deepcopy(model)  # the same weights, trained on the whole batch in this process
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = torch.randint(3, 99, (2 * world, 16), generator=torch.Generator().manual_seed(1))
    mine = ids[2 * rank: 2 * rank + 2]  # each rank its 2 sequences of the global batch
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, unsharded)]
    losses = []
    for step in range(3):
        loss = model(mine, labels=mine).loss  # FSDP averages the gradients over the ranks in its reduce-scatter
        loss.backward()
        whole_batch = unsharded(ids, labels=ids).loss
        whole_batch.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append([mean.item() / world, whole_batch.item()])
    gathered = {name: p.full_tensor() for name, p in model.named_parameters()}
    out = dict(losses=losses, parameter_types=sorted({type(p).__name__ for p in model.parameters()}),
               local=sum(p.to_local().numel() for p in model.parameters()),
               total=sum(p.numel() for p in unsharded.parameters()),
               weight_diff=max((gathered[name] - p.detach()).abs().max().item()
                               for name, p in unsharded.named_parameters()))
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    """
)


def test_fsdp2_shards_on_cpu_and_trains_as_one_process(tmp_path):
    (tmp_path / "worker.py").write_text(_FSDP_WORKER)
    # --standalone: torchrun picks a free rendezvous port itself (no race with other runs on the machine).
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for out in ranks:
        assert out["parameter_types"] == ["DTensor"]  # every parameter sharded
        assert out["local"] < 0.6 * out["total"]  # each rank holds about half of the weights
        for sharded, unsharded in out["losses"]:
            assert sharded == pytest.approx(unsharded, abs=1e-5)
        assert out["losses"][-1][0] < out["losses"][0][0]  # it trained
        assert out["weight_diff"] < 1e-5
    assert ranks[0]["local"] + ranks[1]["local"] == ranks[0]["total"]
