"""Train tiny BERTs with every built-in strategy under a stock Trainer, as ``accelerate launch`` runs it; used
by test_distributed.py.

Each process writes what it ended with (weights, strategy state, pruning-state saves it
made) to ``OUTPUT/<case>/rank<r>.safetensors``, so the test can compare ranks bit for bit and
runs with one another. Run with plain ``python`` for the single-process reference.

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_train.py OUTPUT [--per-device-batch 8]
    [--resume] [--trainer-fsdp]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_conformance as builtin  # noqa: E402  (the built-ins' conformance cases: recipes that suit tiny_bert)

from hfprune import PruneCallback, Pruner  # noqa: E402
from hfprune.testing import Case, TokenDataset, tiny_bert  # noqa: E402

CASES = {
    "magnitude": builtin.TestMagnitude,
    "rpp": builtin.TestRPP,
    "block-lasso-heads": builtin.TestBlockLassoHeads,
    "block-lasso-neurons": builtin.TestBlockLassoNeurons,
    "layer-lasso": builtin.TestLayerLasso,
}
STEPS = 8
TRAINER_FSDP = {
    "fsdp": True,
    "fsdp_config": {"reshard_after_forward": True, "transformer_layer_cls_to_wrap": ["BertLayer"]},
}
SAVE_EVERY = 3  # a checkpoint mid-schedule (step 3; the schedules end at 4) and one after it (step 6)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument(
        "--resume", type=Path, help="an earlier run's OUTPUT: resume every case from its checkpoint-3"
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--bad-target-on-rank", type=int, help="this rank's recipe names a module the model lacks"
    )
    parser.add_argument(
        "--trainer-fsdp",
        action="store_true",
        help="ask the Trainer for FSDP (transformers' default, FSDP2); on CPU accelerate trains with DDP",
    )
    return parser.parse_args(argv)


def recipe(name: str, bad_target: bool) -> dict:
    spec = CASES[name]
    case = Case(spec.strategy, dict(spec.config), tuple(spec.targets), dict(spec.schedule), steps=STEPS)
    data = case.recipe_data()
    if bad_target:
        data["pruners"][0]["targets"] = ["encoder.layer.7"]
    return data


def train(name: str, args: argparse.Namespace) -> None:
    output = args.output / name
    training = TrainingArguments(
        output_dir=str(output),
        max_steps=STEPS,
        per_device_train_batch_size=args.per_device_batch,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        logging_steps=STEPS,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
        **(TRAINER_FSDP if args.trainer_fsdp else {}),
    )
    rank = training.process_index
    resume = args.resume / name / "checkpoint-3" if args.resume else None
    callback = PruneCallback(recipe(name, rank == args.bad_target_on_rank), resume_from=resume)
    saves = _count_saves(callback)
    model = tiny_bert()
    trainer = Trainer(model=model, args=training, train_dataset=TokenDataset(size=256), callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    write_result(output / f"rank{rank}.safetensors", model.state_dict(), callback.pruner, saves)


def _count_saves(callback: PruneCallback) -> list[str]:
    """Records the folders this process wrote pruning state to (only the main process should)."""
    saved: list[str] = []
    save = callback.pruner.save

    def recording_save(directory, write=True):
        if write:
            saved.append(Path(directory).name)
        save(directory, write)

    callback.pruner.save = recording_save
    return saved


def write_result(
    path: Path, weights: dict[str, torch.Tensor], pruner: Pruner, saves: list[str], **values
) -> None:
    """Weights, the first entry's strategy state and plain values (``values`` added), for test_distributed.py
    to compare."""
    state = pruner.state_dict()
    tensors = {f"weight/{k}": v.detach().contiguous() for k, v in weights.items()}
    for key, value in state["entries"][0].items():
        if torch.is_tensor(value):
            tensors[f"state/{key}"] = value.detach().cpu().contiguous()
        else:
            values[key] = value
    metadata = {"step": str(state["step"]), "values": json.dumps(values), "saves": json.dumps(saves)}
    save_file(tensors, str(path), metadata=metadata)


def main(argv=None) -> int:
    torch.set_num_threads(1)  # two processes on two cores; equal thread counts keep runs comparable
    args = parse_args(argv)
    for name in args.cases:
        train(name, args)
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Wait for every process, then close the group: a process that exits while another still talks to it can
    abort gloo."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
