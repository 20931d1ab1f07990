"""Train tiny BERTs with every built-in strategy while FSDP2 shards them; used by test_distributed.py.

The Trainer does not shard on CPU (accelerate falls back to plain data parallelism there), so
this is the hand-written loop FSDP2 users write: torch's ``fully_shard`` on every layer and on
the model, AdamW wrapped in :class:`hfprune.PruneOptimizer`, checkpoints through
``torch.distributed.checkpoint``. Step ``s`` trains on samples ``16s .. 16s+15``, split evenly
over the processes, so one unsharded process at batch 16 sees the same data. Each process
writes what it ended with, gathered whole, to ``OUTPUT/<case>/rank<r>.safetensors`` in
ddp_train.py's format; structured cases are compacted too, on every process.

    accelerate launch --multi_gpu --num_processes 2 tests/fsdp_train.py OUTPUT [--resume EARLIER_OUTPUT]
    python tests/fsdp_train.py OUTPUT    (one process, no sharding: the reference)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_train import CASES, STEPS, leave_process_group, recipe, write_result  # noqa: E402

from hfprune import PruneOptimizer, Pruner  # noqa: E402
from hfprune.testing import TokenDataset, tiny_bert  # noqa: E402

GLOBAL_BATCH = 16
CHECKPOINT_AT = 3  # mid-schedule: the schedules end at step 4
STRUCTURED = ("block-lasso-heads", "block-lasso-neurons", "layer-lasso")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument(
        "--resume", type=Path, help="an earlier run's OUTPUT: resume every case from its checkpoint-3"
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    return parser.parse_args(argv)


def sharded_model(world: int) -> torch.nn.Module:
    """tiny_bert with every layer and the rest of the model split by rows over the processes (FSDP2), or whole
    alone."""
    model = tiny_bert()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def batch(dataset: TokenDataset, step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    share = GLOBAL_BATCH // world
    items = [dataset[step * GLOBAL_BATCH + rank * share + i] for i in range(share)]
    return {
        "input_ids": torch.stack([item["input_ids"] for item in items]),
        "labels": torch.tensor([item["labels"] for item in items]),
    }


def train(name: str, args: argparse.Namespace, rank: int, world: int) -> None:
    output = args.output / name
    model = sharded_model(world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    pruner = Pruner(recipe(name, bad_target=False))
    plans = pruner.attach(model)
    assert world == 1 or all(isinstance(p, DTensor) for plan in plans for p in plan.parameters.values()), (
        "not sharded"
    )
    pruner.start(STEPS)
    stepper = PruneOptimizer(optimizer, pruner)
    if args.resume:
        checkpoint = args.resume / name / f"checkpoint-{CHECKPOINT_AT}"
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=checkpoint)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        torch.set_rng_state(
            torch.load(checkpoint / f"rng{rank}.pt", weights_only=True)
        )  # layer-wise dropout draws from it
        pruner.load(checkpoint)
    dataset = TokenDataset(size=STEPS * GLOBAL_BATCH)
    for step in range(pruner.step, STEPS):
        model(**batch(dataset, step, rank, world)).loss.backward()
        stepper.step()
        stepper.zero_grad()
        if step + 1 == CHECKPOINT_AT and world > 1 and not args.resume:
            folder = output / f"checkpoint-{CHECKPOINT_AT}"
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
            torch.save(torch.get_rng_state(), folder / f"rng{rank}.pt")
            pruner.save(folder, write=rank == 0)
    values = (
        pruner.metrics()
    )  # collective under FSDP2 (zero counts, block norms), as the Trainer calls it on every process
    if name in STRUCTURED:
        compacted = pruner.compact(model)
        values["compacted_parameters"] = sum(p.numel() for p in compacted.parameters())
    weights = (
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        if world > 1
        else model.state_dict()
    )
    output.mkdir(parents=True, exist_ok=True)
    write_result(output / f"rank{rank}.safetensors", weights, pruner, [], **values)


def main(argv=None) -> int:
    torch.set_num_threads(1)
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    for name in args.cases:
        train(name, args, rank, world)
    leave_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
