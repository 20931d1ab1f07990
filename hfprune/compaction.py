"""Compaction: remove pruned heads and neurons so the model is physically smaller.

Works on a deep copy; the model passed in is never changed. A group (a head, a key/value
group, a neuron) is removed when its slices are pruned for good in every matrix that
consumes it (output-projection columns, down-projection columns): it then contributes
exactly nothing. A neuron is also removed when every matrix that produces it is pruned:
it then outputs a constant, which is folded into the down projection's bias. Every
compaction checks itself on a probe batch and refuses when the outputs differ.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hfprune.architecture import ArchitectureAdapter, Member, Unit, UnitKind, find_units
from hfprune.errors import CompactionError

LAYOUT_KEY = "hfprune_layout"  # config.json key: per-unit group counts when layers differ
TOLERANCE = 1e-4  # max abs difference between masked and compacted outputs, in float32
KINDS: tuple[UnitKind, ...] = ("head", "neuron")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


@dataclass(frozen=True)
class Removal:
    """What compaction does to one unit: keep ``keep`` (bool per group), fold the constants of ``fold`` groups."""

    unit: Unit
    keep: torch.Tensor
    fold: torch.Tensor


def compact_model(
    model: nn.Module,
    pruned: dict[str, torch.Tensor],
    adapters: list[ArchitectureAdapter],
    probe: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A smaller copy of ``model`` without the groups whose slices ``pruned`` marks (keep-mask False).

    ``pruned`` maps parameter names to keep-masks of the parameter's shape, fixed for good.
    Raises CompactionError, with ``model`` unchanged, when nothing is removable or when the
    compacted copy's outputs on ``probe`` (default: a seeded random batch) differ from the
    model's by more than 1e-4.
    """
    compacted = copy.deepcopy(model)
    units = {kind: list(find_units(compacted, kind, adapters)) for kind in KINDS}
    if not any(units.values()):
        known = ", ".join(a.name for a in adapters) or "none"
        raise CompactionError(f"no installed architecture adapter recognizes a block of {type(model).__name__} (adapters: {known})")
    names = {id(module): name for name, module in compacted.named_modules()}
    removals = [r for kind in KINDS for r in (_plan(unit, pruned, names) for unit in units[kind]) if r is not None]
    if not removals:
        raise CompactionError(
            "no whole head or neuron is pruned: compaction removes a head when its output-projection columns are "
            "pruned and a neuron when its down-projection column (or every row producing it) is pruned"
        )
    with torch.no_grad():
        for removal in removals:
            _remove(removal)
    _update_config(compacted, units, {id(r.unit.module): int(r.keep.sum()) for r in removals})
    verify(model, compacted, probe)
    return compacted


def _plan(unit: Unit, pruned: dict[str, torch.Tensor], names: dict[int, str]) -> Removal | None:
    """Which of ``unit``'s groups can go, judged from the fixed keep-masks of its matrices."""

    def all_pruned(members: Iterable[Member]) -> torch.Tensor:
        result = torch.ones(unit.count, dtype=torch.bool)
        for member in members:
            mask = pruned.get(f"{names[id(member.module)]}.weight")
            if mask is None:
                return torch.zeros(unit.count, dtype=torch.bool)
            grouped = member.blocked(mask.cpu(), unit.count).movedim(member.dim, 0).reshape(unit.count, -1)
            result &= ~grouped.any(dim=1)
        return result

    silent = all_pruned(unit.consumers)
    constant = all_pruned(unit.producers) & ~silent if unit.kind == "neuron" else torch.zeros_like(silent)
    remove = silent | constant
    if not remove.any():
        return None
    if remove.all():  # a block with no group left would need another forward pass: keep one (it adds nothing)
        remove[0] = False
    return Removal(unit, ~remove, constant & remove)


def shrink_unit(unit: Unit, kept_groups: int) -> None:
    """Cut ``unit`` to its first ``kept_groups`` groups (the loader rebuilds a compacted model's shapes this way)."""
    keep = torch.arange(unit.count) < kept_groups
    _remove(Removal(unit, keep, torch.zeros_like(keep)))


def _remove(removal: Removal) -> None:
    unit, keep = removal.unit, removal.keep
    if removal.fold.any():
        _fold_constant_neurons(unit, removal.fold.nonzero().flatten())
    kept_groups = keep.nonzero().flatten()
    by_module: dict[int, list[Member]] = {}
    for member in unit.members:
        by_module.setdefault(id(member.module), []).append(member)
    for members in by_module.values():
        _slice(members, kept_groups, unit.count)
    unit.adapter.resize(unit, len(kept_groups))


def _fold_constant_neurons(unit: Unit, groups: torch.Tensor) -> None:
    """Neurons whose producing rows are all zero output ``act(bias)``: add that through the down projection to its bias."""
    producers = unit.producers
    values = [_bias_at(m, groups) for m in producers]
    constant = unit.activation(values[0]) * values[1] if unit.gated else unit.activation(values[0])
    for consumer in unit.consumers:
        weight = consumer.module.weight
        columns = weight.index_select(consumer.dim, consumer.indices(groups.to(weight.device)))
        contribution = columns @ constant if consumer.dim == 1 else constant @ columns
        if consumer.module.bias is None:
            if contribution.abs().max() > 0:
                raise CompactionError(f"cannot fold the constant output of pruned neurons into {type(consumer.module).__name__} without a bias")
            continue
        consumer.module.bias.add_(contribution)


def _bias_at(member: Member, groups: torch.Tensor) -> torch.Tensor:
    bias = member.module.bias
    if bias is None:
        return member.module.weight.new_zeros(len(groups) * member.size)
    return bias.index_select(0, member.indices(groups.to(bias.device)))


def _slice(members: list[Member], kept_groups: torch.Tensor, count: int) -> None:
    """Drop the pruned groups' indices from one module's weight (and bias, on its output side)."""
    module = members[0].module
    dim = members[0].dim
    length = module.weight.shape[dim]
    keep = torch.ones(length, dtype=torch.bool)
    for member in members:
        keep[member.indices(torch.arange(count))] = False
        keep[member.indices(kept_groups.cpu())] = True
    index = keep.nonzero().flatten().to(module.weight.device)
    module.weight = nn.Parameter(module.weight.index_select(dim, index), requires_grad=module.weight.requires_grad)
    if members[0].side == "out" and module.bias is not None:
        module.bias = nn.Parameter(module.bias.index_select(0, index), requires_grad=module.bias.requires_grad)
    _update_features(module, members[0].side, len(index))


def _update_features(module: nn.Module, side: str, size: int) -> None:
    if isinstance(module, nn.Linear):
        setattr(module, "out_features" if side == "out" else "in_features", size)
    elif side == "out":  # Conv1D: nf outputs, nx inputs
        module.nf = size
    else:
        module.nx = size


def _update_config(model: nn.Module, units: dict[str, list[Unit]], kept: dict[int, int]) -> None:
    """State uniform sizes in the stock config fields; record per-unit sizes under ``hfprune_layout`` otherwise."""
    config = getattr(model, "config", None)
    if config is None:
        return
    layout: dict[str, dict[str, int]] = {}
    for kind, found in units.items():
        if not any(id(unit.module) in kept for unit in found):
            continue
        sizes = {unit.name: kept.get(id(unit.module), unit.count) for unit in found}
        uniform = len(set(sizes.values())) == 1
        updates = found[0].adapter.config_updates(config, kind, found[0], sizes[found[0].name]) if uniform else None
        if updates is None:
            layout[kind] = sizes
        else:
            for key, value in updates.items():
                setattr(config, key, value)
    previous = getattr(config, LAYOUT_KEY, None) or {}
    if layout or previous:
        setattr(config, LAYOUT_KEY, previous | layout)


def save_compacted(model: nn.Module, output: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None) -> Path:
    """``save_pretrained`` into a fresh folder, written beside it and renamed: a failed save leaves no half folder.

    Refuses an ``output`` that exists and is not empty, so nothing is overwritten. Copies
    the tokenizer from ``tokenizer_from`` when that folder has one.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise CompactionError(f"{output} exists and is not empty; choose a new folder for the compacted model")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer_from is not None and any((Path(tokenizer_from) / f).is_file() for f in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(staging)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def probe_batch(model: nn.Module, batch_size: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    """A seeded random batch of token ids for the model's vocabulary, the second row half padded."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 100
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[1:, length // 2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def verify(reference: nn.Module, compacted: nn.Module, probe: dict[str, torch.Tensor] | None = None) -> float:
    """Max abs difference of every output and hidden state on a probe batch; CompactionError above 1e-4."""
    probe = probe or probe_batch(reference)
    if any(p.dtype != torch.float32 for p in reference.parameters()):
        reference, compacted = copy.deepcopy(reference).float(), copy.deepcopy(compacted).float()
    ours, theirs = _outputs(reference, probe), _outputs(compacted, probe)
    worst = max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))
    if not worst <= TOLERANCE:
        raise CompactionError(
            f"the compacted model's outputs differ from the pruned model's by {worst:.3g} (tolerance {TOLERANCE}) on a probe "
            "batch; the model was left as it was. Are the removed heads and neurons exactly zero in the weights?"
        )
    return worst


def _outputs(model: nn.Module, probe: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every floating-point tensor the model returns for ``probe``, in float32, in eval mode (its mode is restored)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        result = model(**{k: v.to(device) for k, v in probe.items()}, output_hidden_states=True)
    finally:
        model.train(was_training)
    tensors = []
    for value in result.values() if hasattr(result, "values") else result:
        for tensor in value if isinstance(value, tuple) else (value,):
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                tensors.append(tensor.float())
    return tensors
