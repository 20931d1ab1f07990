"""The conformance kit for architecture adapters: :class:`AdapterConformance`.

In an adapter plugin's test suite::

    from hfprune.compaction.conformance import AdapterConformance


    class TestMyFamily(AdapterConformance):
        model_factory = staticmethod(tiny_my_model)  # a fresh tiny random model of the family
        attention = "MyAttention"                    # a recipe target holding its attention blocks
        feed_forward = "MyMLP"                       # ... and its FFN blocks (None: not pruned)

Each check prunes half of every block's heads and neurons with ``block-lasso`` in three real
SGD steps on random inputs (token ids, or images for a model whose input is ``pixel_values``),
compacts, saves with ``save_pretrained`` and loads again (plain ``from_pretrained`` when the
config is stock, :func:`~hfprune.compaction.loading.load_compacted` otherwise). The built-in
adapters are held to the same checks in ``tests/test_compaction.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from hfprune.compaction.compact import KINDS, LAYOUT_KEY, probe_batch, verify
from hfprune.plugins import Registry, default_registry


def structured_recipe(
    attention: str | None, feed_forward: str | None, ratio: float = 0.5, end: int = 1
) -> str:
    """A recipe removing ``ratio`` of the heads in ``attention`` and of the neurons in ``feed_forward``
    (recipe targets; None leaves that kind) by step ``end``."""
    entries = [
        f"  - strategy: block-lasso\n    targets: [{target}]\n    schedule: {{start: 0, end: {end}}}\n"
        f"    config: {{group: {group}, ratio: {ratio}, lam: 0.01}}\n"
        for group, target in (("head", attention), ("neuron", feed_forward))
        if target
    ]
    return "version: 1\npruners:\n" + "".join(entries)


def labelled_batch(model: nn.Module, size: int = 4) -> dict[str, torch.Tensor]:
    """``size`` random inputs the model reads (:func:`probe_batch`) with labels for its loss: the tokens
    themselves for a model that generates (an encoder-decoder's decoder reads them shifted), class 0 or 1
    otherwise."""
    from transformers import GenerationMixin

    batch = probe_batch(model, batch_size=size)
    batch.pop("decoder_input_ids", None)
    if isinstance(model, GenerationMixin):
        return {**batch, "labels": batch["input_ids"]}
    return {**batch, "labels": torch.arange(size) % 2}


def pruned(model: nn.Module, recipe: str, steps: int = 3, registry: Registry | None = None):
    """The :class:`~hfprune.Pruner` of ``recipe`` on ``model`` after ``steps`` real SGD steps, so that a
    recipe ending at step 1 has fixed its pattern."""
    from hfprune.pruner import Pruner

    pruner = Pruner(recipe, registry)
    pruner.attach(model)
    pruner.start(steps)
    train_steps(model, pruner, labelled_batch(model), steps)
    return pruner


def train_steps(
    model: nn.Module, pruner, batch: dict[str, torch.Tensor], steps: int, lr: float = 0.05
) -> None:
    """``steps`` SGD steps of ``model`` on ``batch``, with the pruner's work before and after each optimizer
    step, as PruneOptimizer does."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        model(**batch).loss.backward()
        pruner.before_optimizer_step(optimizer)
        optimizer.step()
        pruner.after_optimizer_step(optimizer)
        optimizer.zero_grad()


def reload(model: nn.Module, path: Path, registry: Registry) -> nn.Module:
    """The model saved in ``path``: with its own class's ``from_pretrained`` when its config is stock, else
    with :func:`load_compacted` and ``registry``'s adapters."""
    from hfprune.compaction.loading import load_compacted

    if getattr(model.config, LAYOUT_KEY, None):
        return load_compacted(path, type(model), registry.architectures)
    return type(model).from_pretrained(path).eval()


def check_round_trip(
    model_factory: Callable[[], nn.Module],
    attention: str | None,
    feed_forward: str | None,
    output_dir: Path,
    registry: Registry | None = None,
) -> nn.Module:
    """Prune half of each block's heads and neurons, compact, save and reload; the reloaded model.

    Checks that every block lost half its groups and the model parameters, that the reloaded
    model's outputs and hidden states equal the pruned model's within compaction's relative
    tolerance (:func:`verify`), that a model which generates generates the same tokens, and
    that the report counts each shared or tied parameter once.
    """
    from hfprune.architecture import find_units
    from hfprune.compaction.structure import model_structure

    registry = registry or default_registry()
    model = model_factory()
    before = {kind: [u.count for u in find_units(model, kind, registry.architectures)] for kind in KINDS}
    compacted = pruned(model, structured_recipe(attention, feed_forward), registry=registry).compact(model)
    for kind, target in zip(KINDS, (attention, feed_forward)):
        after = [u.count for u in find_units(compacted, kind, registry.architectures)]
        expected = [count // 2 for count in before[kind]] if target else before[kind]
        assert after == expected, f"{kind} groups per block: {before[kind]} before, {after} after compaction"
    compacted.save_pretrained(output_dir)
    loaded = reload(compacted, Path(output_dir), registry)
    verify(model, loaded)
    parameters = sum(p.numel() for p in loaded.parameters())  # nn.Module.parameters yields each once
    assert parameters < sum(p.numel() for p in model.parameters()), "compaction removed no parameter"
    counted = model_structure(loaded, registry.architectures)["parameters"]
    assert counted == parameters, f"the report counts {counted} parameters, the model has {parameters}"
    _check_generation(model, loaded)
    return loaded


def _check_generation(model: nn.Module, loaded: nn.Module) -> None:
    from transformers import GenerationMixin

    if not isinstance(model, GenerationMixin):
        return
    prompt = probe_batch(model)["input_ids"][:1, :6]
    pad = getattr(model.config.get_text_config(), "pad_token_id", None)  # a multimodal config nests it
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": pad}
    expected, generated = model.eval().generate(prompt, **settings), loaded.generate(prompt, **settings)
    assert torch.equal(generated, expected), (
        f"generation changed: {expected.tolist()} -> {generated.tolist()}"
    )


class AdapterConformance:
    """Subclass in an adapter plugin's tests (name it ``Test...``); pytest runs the check.

    Set ``model_factory`` (a function returning a fresh tiny random model of the family),
    ``attention`` and ``feed_forward`` (recipe targets holding its attention and FFN blocks;
    None for a kind the family does not prune), and optionally ``registry`` (default: the
    installed plugins'; a :class:`~hfprune.plugins.Registry` holding your adapter otherwise).
    """

    model_factory: ClassVar[Callable[[], nn.Module]]
    attention: ClassVar[str | None] = None
    feed_forward: ClassVar[str | None] = None
    registry: ClassVar[Registry | None] = None

    def test_pruned_compacted_saved_and_reloaded_it_computes_as_the_pruned_model(self, tmp_path):
        check_round_trip(type(self).model_factory, self.attention, self.feed_forward, tmp_path, self.registry)
