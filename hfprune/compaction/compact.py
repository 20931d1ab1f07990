"""Compaction: remove pruned layers, heads and neurons so the model is physically smaller.

Works on a deep copy; the model passed in is never changed. A layer is deleted when its
strategy says so (a layer gate fixed at 0 makes it the identity). A group (a head, a key/value
group, a neuron) is removed when its slices are pruned for good in every matrix that
consumes it (output-projection columns, down-projection columns): it then contributes
exactly nothing. A neuron is also removed when every matrix that produces it is pruned:
it then outputs a constant, which is folded into the down projection's bias. Every
compaction checks itself on a probe batch and refuses when the outputs differ.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hfprune.architecture import (
    ArchitectureAdapter,
    Member,
    Unit,
    UnitKind,
    config_of,
    delete_residual_layers,
    find_units,
    stack_owner,
)
from hfprune.errors import CompactionError
from hfprune.model_hooks import strip_model_hooks

LAYOUT_KEY = "hfprune_layout"  # config.json key: per-unit group counts when layers differ
# The compacted model must compute what the masked model computes, up to float32 rounding. Dropping zero
# terms reorders a matmul's sums, and rounding is relative to the largest values summed, not to the result:
# an element that cancels to near 0 carries the error of its row's largest values. So
# torch.testing.assert_close's atol + rtol x |expected| takes, in place of |expected|, the largest |expected|
# in the element's row (last dimension: one token's logits or hidden state). Measured on SmolLM2-135M (30
# layers, hidden states up to 1.2e4, logits off by 6.6e-4) with a third of its heads and half its neurons
# removed: a correct compaction is off by at most 3.4e-5 x its row's scale (elementwise it would need rtol
# 0.93), one nonzero neuron wrongly removed by 1.6e-2. RTOL lies 30x above the one and 16x below the other;
# ATOL spares rows of near-zero values.
ATOL = 1e-4
RTOL = 1e-3
KINDS: tuple[UnitKind, ...] = ("head", "neuron")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class Removal:
    """What compaction does to one unit: keep ``keep`` (bool per group), fold the constants of ``fold``
    groups."""

    unit: Unit
    keep: torch.Tensor
    fold: torch.Tensor


def layer_stacks_of(pruned: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of a compaction plan about ``model``'s layer stacks (``nn.ModuleList`` names): one keep flag
    per layer."""
    modules = dict(model.named_modules())
    return {name: keep for name, keep in pruned.items() if isinstance(modules.get(name), nn.ModuleList)}


def compact_model(
    model: nn.Module,
    pruned: dict[str, torch.Tensor],
    adapters: list[ArchitectureAdapter],
    probe: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A smaller copy of ``model`` without the layers, heads and neurons that ``pruned`` marks (keep-mask
    False).

    ``pruned`` maps parameter names to keep-masks of the parameter's shape, and layer stacks
    (the name of an ``nn.ModuleList``) to one bool per layer, all fixed for good. Layers are
    deleted by the adapter that recognizes their stack (:func:`delete_layers`). Raises
    CompactionError, with ``model`` unchanged, when nothing is removable or when the
    compacted copy's outputs on ``probe`` (default: a seeded random batch) differ from the
    model's by more than float32 rounding (:func:`verify`).
    """
    compacted = copy.deepcopy(model)
    strip_model_hooks(compacted)
    modules = dict(compacted.named_modules())
    names = {id(module): name for name, module in modules.items()}  # before layers go: the names plans use
    stacks = layer_stacks_of(pruned, compacted)
    hidden_states = None  # None: no layer deleted
    if stacks:
        hidden_states = delete_layers(compacted, stacks, adapters)
    units = {kind: list(find_units(compacted, kind, adapters)) for kind in KINDS}
    removals = [
        r for kind in KINDS for r in (_plan(unit, pruned, names) for unit in units[kind]) if r is not None
    ]
    if hidden_states is None and not removals:
        if not any(units.values()):
            known = ", ".join(a.name for a in adapters) or "none"
            raise CompactionError(
                f"no installed architecture adapter recognizes a block of {type(model).__name__} (adapters: "
                f"{known})"
            )
        raise CompactionError(
            "no whole layer, head or neuron is pruned: compaction removes a head when its output-projection "
            "columns are "
            "pruned and a neuron when its down-projection column (or every row producing it) is pruned"
        )
    with torch.no_grad():
        for removal in removals:
            _remove(removal)
    _update_config(
        compacted, adapters, changed={r.unit.kind for r in removals}, relabelled=hidden_states is not None
    )
    verify(model, compacted, probe, hidden_states)
    return compacted


def delete_layers(
    model: nn.Module, stacks: dict[str, torch.Tensor], adapters: list[ArchitectureAdapter]
) -> list[int] | None:
    """Delete, in place, the layers ``stacks`` flags False, through the adapter that recognizes the stacks.

    A stack no adapter recognizes (a ModuleList a recipe named directly) is taken to be
    residual. Returns the hidden-state indices the smaller model still has, None if no layer went.
    """
    owners = {stack_owner(model, name, adapters) for name in stacks}
    if len(owners) > 1:
        names = ", ".join(sorted(owner.name if owner else "no adapter" for owner in owners))
        raise CompactionError(
            f"the layer stacks {', '.join(stacks)} belong to different architecture adapters ({names})"
        )
    (owner,) = owners
    return owner.delete_layers(model, stacks) if owner is not None else delete_residual_layers(model, stacks)


def _plan(unit: Unit, pruned: dict[str, torch.Tensor], names: dict[int, str]) -> Removal | None:
    """Which of ``unit``'s groups can go, judged from the fixed keep-masks of its matrices."""

    def all_pruned(members: Iterable[Member]) -> torch.Tensor:
        result = torch.ones(unit.count, dtype=torch.bool)
        for member in members:
            mask = pruned.get(f"{names[id(member.module)]}.weight")
            if mask is None:
                return torch.zeros(unit.count, dtype=torch.bool)
            result &= ~member.nonzero_groups(mask, unit.count)
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
    """Cut ``unit`` to its first ``kept_groups`` groups (the loader rebuilds a compacted model's shapes this
    way)."""
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
    """Neurons whose producing rows are all zero output ``act(bias)``: add that through the down projection to
    its bias."""
    producers = unit.producers
    values = [_bias_at(m, groups) for m in producers]
    constant = unit.activation(values[0]) * values[1] if unit.gated else unit.activation(values[0])
    for consumer in unit.consumers:
        weight = consumer.module.weight
        columns = weight.index_select(consumer.dim, consumer.indices(groups.to(weight.device)))
        contribution = columns @ constant if consumer.dim == 1 else constant @ columns
        if consumer.module.bias is None:
            if contribution.abs().max() > 0:
                raise CompactionError(
                    "cannot fold the constant output of pruned neurons into "
                    f"{type(consumer.module).__name__} without a bias"
                )
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
    module.weight = nn.Parameter(
        module.weight.index_select(dim, index), requires_grad=module.weight.requires_grad
    )
    if members[0].side == "out" and getattr(module, "bias", None) is not None:  # an embedding has none
        module.bias = nn.Parameter(
            module.bias.index_select(0, index), requires_grad=module.bias.requires_grad
        )
    _update_features(module, members[0].side, len(index))


def _update_features(module: nn.Module, side: str, size: int) -> None:
    if isinstance(module, nn.Linear):
        setattr(module, "out_features" if side == "out" else "in_features", size)
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = size
    elif side == "out":  # Conv1D: nf outputs, nx inputs
        module.nf = size
    else:
        module.nx = size


def _update_config(
    model: nn.Module, adapters: list[ArchitectureAdapter], changed: set[str], relabelled: bool
) -> None:
    """State uniform sizes in the stock config fields; record per-unit sizes under ``hfprune_layout``
    otherwise.

    A kind is recorded when its groups changed now or when the layout already lists it
    (a model compacted before); after layers were deleted the layout is renamed to the
    surviving layers' new numbers, so it is rebuilt from the model as it now is.
    """
    config = getattr(model, "config", None)
    if config is None:
        return
    layout = dict(getattr(config, LAYOUT_KEY, None) or {})
    for kind in KINDS:
        if kind not in changed and not (relabelled and kind in layout):
            continue
        unstated: dict[str, int] = {}
        for sized_by, units in _by_config(model, find_units(model, kind, adapters)):
            sizes = {unit.name: unit.count for unit in units}
            uniform = len(set(sizes.values())) == 1
            updates = (
                units[0].adapter.config_updates(sized_by, kind, units[0], units[0].count) if uniform else None
            )
            if updates is None:
                unstated.update(sizes)
            for key, value in (updates or {}).items():
                setattr(sized_by, key, value)
        if unstated:
            layout[kind] = unstated
        else:
            layout.pop(kind, None)
    if layout or getattr(config, LAYOUT_KEY, None):
        setattr(config, LAYOUT_KEY, layout or None)


def _by_config(model: nn.Module, units: Iterable[Unit]) -> list[tuple[object, list[Unit]]]:
    """``units`` grouped by the config that sizes them (:func:`config_of`: a multimodal model's language model
    and vision tower each have their own), in model order."""
    groups: dict[int, tuple[object, list[Unit]]] = {}
    for unit in units:
        config = config_of(model, unit.name)
        groups.setdefault(id(config), (config, []))[1].append(unit)
    return list(groups.values())


def save_compacted(
    model: nn.Module,
    output: str | os.PathLike,
    tokenizer_from: str | os.PathLike | None = None,
    replace: bool = False,
    tokenizer=None,
) -> Path:
    """``save_pretrained`` into a fresh folder, written beside it and renamed: a failed save leaves no half
    folder.

    Refuses an ``output`` that exists and is not empty, so nothing is overwritten, unless
    ``replace``: then the old folder is swapped out only after the new one is complete, so a
    failed save leaves the last good model in place. Saves ``tokenizer`` (or an image
    processor given in its place), or copies the tokenizer or image processor from the model
    folder ``tokenizer_from`` when it has one.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not replace:
        raise CompactionError(
            f"{output} exists and is not empty; choose a new folder for the compacted model"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        elif tokenizer_from is not None:
            _copy_processor(Path(tokenizer_from), staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, output)
    return output


def processor_kind(folder: Path) -> str | None:
    """What turns data into inputs for the model folder ``folder``: ``"tokenizer"`` when it has one (even
    beside an image processor), ``"image"`` for an image processor alone, None for neither."""
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return "tokenizer"
    return "image" if (folder / IMAGE_PROCESSOR_FILE).is_file() else None


def _copy_processor(source: Path, staging: Path) -> None:
    """Save into ``staging`` the tokenizer, or the image processor, that the model folder ``source`` holds."""
    from transformers import AutoImageProcessor, AutoTokenizer

    kind = processor_kind(source)
    if kind is not None:
        loader = AutoTokenizer if kind == "tokenizer" else AutoImageProcessor
        loader.from_pretrained(str(source)).save_pretrained(staging)


def _swap_in(staging: Path, output: Path) -> None:
    """Put the complete folder ``staging`` at ``output``; an old ``output`` is moved aside first and deleted
    last."""
    if not output.exists():
        staging.rename(output)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
    output.rename(retired / output.name)
    try:
        staging.rename(output)
    except BaseException:
        (retired / output.name).rename(output)  # the old folder goes back where it was
        retired.rmdir()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def reads_images(model: nn.Module) -> bool:
    """Whether ``model``'s input is images (``main_input_name`` is ``pixel_values``), not token ids."""
    return getattr(model, "main_input_name", None) == "pixel_values"


def probe_batch(model: nn.Module, batch_size: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    """A seeded random batch for the model: token ids for its vocabulary, the second row half padded (and the
    first half as the decoder's input, for an encoder-decoder); or, for a model that reads images
    (``main_input_name`` is ``pixel_values``), random images of its size."""
    config = getattr(model, "config", None)
    generator = torch.Generator().manual_seed(0)
    if reads_images(model):
        return {"pixel_values": random_images(config, batch_size, generator)}
    vocab = getattr(config, "vocab_size", None) or 100
    input_ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[1:, length // 2 :] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if getattr(config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = input_ids[:, : length // 2]
    return batch


def random_images(config, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random images of the size a (vision) config states: ``image_size`` (one side or a pair) and
    ``num_channels``."""
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch_size, config.num_channels, height, width, generator=generator)


def image_probe(model: nn.Module, batch_size: int = 2) -> dict[str, torch.Tensor] | None:
    """Seeded random images for the vision tower of a model that reads token ids and images (a multimodal
    model's ``get_image_features``), or None for a model without one.

    The token-id probe alone never runs such a tower: it needs images placed at image tokens.
    """
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    if vision is None or reads_images(model) or not hasattr(model, "get_image_features"):
        return None
    return {"pixel_values": random_images(vision, batch_size, torch.Generator().manual_seed(0))}


@dataclass(frozen=True)
class Deviation:
    """One output element of the compacted model against the masked model's: where, how far off, its
    tolerance."""

    where: str
    difference: float
    tolerance: float
    ratio: float  # difference / tolerance; infinite for NaN

    def __str__(self) -> str:
        return (
            f"{self.where} is off by {self.difference:.3g}, tolerance {self.tolerance:.3g} ({ATOL:g} + "
            f"{RTOL:g} x the largest |value| in its row)"
        )


@torch.no_grad()
def verify(
    reference: nn.Module,
    compacted: nn.Module,
    probe: dict[str, torch.Tensor] | None = None,
    hidden_states: list[int] | None = None,
) -> Deviation:
    """The element of every output and hidden state on a probe batch that is furthest outside its tolerance
    (``ATOL + RTOL`` x its row's largest |value|); CompactionError when it is outside.

    ``hidden_states`` picks the reference's hidden states the compacted model still has
    when layers were deleted (a deleted layer's gate was 0: its output equals its input).
    A multimodal model's vision tower is checked too, on random images (:func:`image_probe`).
    """
    probe = probe or probe_batch(reference)
    if any(p.dtype != torch.float32 for p in reference.parameters()):
        reference, compacted = copy.deepcopy(reference).float(), copy.deepcopy(compacted).float()
    ours, theirs = _outputs(reference, probe, hidden_states), _outputs(compacted, probe)
    images = image_probe(reference)
    if images is not None:
        ours += _outputs(reference, images, method="get_image_features")
        theirs += _outputs(compacted, images, method="get_image_features")
    mismatch = _shape_mismatch(ours, theirs)
    if mismatch:
        raise CompactionError(
            f"the compacted model's outputs are not shaped as the pruned model's: {mismatch}"
        )
    pairs = zip(ours, theirs, strict=True)
    worst = max(
        (_worst_element(name, expected, actual) for (name, expected), (_, actual) in pairs),
        key=lambda deviation: deviation.ratio,
    )
    if not worst.ratio <= 1:
        raise CompactionError(
            f"the compacted model's outputs differ from the pruned model's on a probe batch: {worst}; the "
            "model was left as it was. Are the removed heads and neurons exactly zero in the weights, and "
            "the deleted layers' gates exactly 0?"
        )
    return worst


def _shape_mismatch(
    ours: list[tuple[str, torch.Tensor]], theirs: list[tuple[str, torch.Tensor]]
) -> str | None:
    """What differs between two models' named outputs other than their values (how many, their shapes), or
    None."""
    if len(ours) != len(theirs):
        names = [", ".join(name for name, _ in outputs) for outputs in (theirs, ours)]
        return f"{len(theirs)} outputs against {len(ours)} ({names[0]} against {names[1]})"
    for (name, expected), (_, actual) in zip(ours, theirs):
        if expected.shape != actual.shape:
            return f"{name} is {tuple(actual.shape)} against {tuple(expected.shape)}"
    return None


def _worst_element(name: str, expected: torch.Tensor, actual: torch.Tensor) -> Deviation:
    """The element of ``actual`` furthest outside its tolerance around ``expected`` (a NaN is furthest)."""
    row_scale = expected.abs().amax(dim=-1, keepdim=True)
    tolerance = (ATOL + RTOL * row_scale).expand_as(expected)
    difference = (actual - expected).abs()
    ratios = (difference / tolerance).nan_to_num(nan=math.inf)
    flat = int(ratios.argmax())
    index = ", ".join(str(int(i)) for i in torch.unravel_index(torch.tensor(flat), ratios.shape))
    return Deviation(
        f"{name}[{index}]",
        difference.flatten()[flat].item(),
        tolerance.flatten()[flat].item(),
        ratios.flatten()[flat].item(),
    )


def _outputs(
    model: nn.Module,
    probe: dict[str, torch.Tensor],
    hidden_states: list[int] | None = None,
    method: str | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Every floating-point tensor the model returns for ``probe`` (of its hidden states, those picked), named
    (``logits``, ``hidden_states[3]``; a picked hidden state by its index in the reference), in float32.

    Calls the model, or its ``method`` (named after it: ``get_image_features.pooler_output``). Runs
    in eval mode; the model's mode is restored.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        call = getattr(model, method) if method else model
        result = call(**{k: v.to(device) for k, v in probe.items()}, output_hidden_states=True)
    finally:
        model.train(was_training)
    values = dict(result) if hasattr(result, "keys") else dict(enumerate(result))
    named = {}
    for key, value in values.items():
        if isinstance(value, tuple):
            picked = range(len(value)) if key != "hidden_states" or hidden_states is None else hidden_states
            named.update({f"{key}[{i}]": value[i] for i in picked})
        else:
            named[str(key)] = value
    prefix = f"{method}." if method else ""
    return [
        (prefix + name, t.float())
        for name, t in named.items()
        if torch.is_tensor(t) and t.is_floating_point()
    ]
