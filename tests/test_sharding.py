"""Parameters split across processes (hfprune.integrations.sharding), in this process: FSDP2 on a one-process
gloo group.

With one process, ``fully_shard`` still makes every parameter a row-sharded DTensor and every
collective runs (over one member), so the sharded code paths run here in milliseconds; the
two-process runs in test_distributed.py check that the parts add up across processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_distributed import free_port
from torch.distributed.fsdp import fully_shard

from hfprune import HfpruneError, Pruner, RecipeError, hookimpl
from hfprune.integrations.sharding import (
    WHOLE,
    RowShard,
    UnsupportedSharding,
    kth_smallest_of_parts,
    layout_of,
    plain_class,
)
from hfprune.masks import largest_magnitude_masks
from hfprune.plugins import build_registry
from hfprune.testing import tiny_bert
from hfprune_magnitude import MagnitudeStrategy

MAGNITUDE = (
    "version: 1\npruners:\n  - strategy: {strategy}\n    targets: [{target}]\n    config: {{sparsity: 0.5}}\n"
)


@pytest.fixture(scope="module")
def one_process_group():
    """A gloo process group of this process alone, torn down after the module so other tests see no
    distributed run."""
    import os

    saved = {key: os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def sharded_bert() -> torch.nn.Module:
    model = tiny_bert()
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    return model


def test_fsdp2_rows_are_a_row_shard_and_class_targets_see_through_fully_shard(one_process_group):
    model = sharded_bert()
    layer = model.bert.encoder.layer[0]
    layout = layout_of(layer.intermediate.dense.weight)
    assert (
        isinstance(layout, RowShard) and (layout.start, layout.stop) == (0, 64) and layout.shape == (64, 32)
    )
    assert type(layer).__name__ == "FSDPBertLayer" and plain_class(layer).__name__ == "BertLayer"
    heads = (
        "version: 1\npruners:\n  - strategy: block-lasso\n    targets: [BertLayer]\n    config: {group: "
        "head, ratio: 0.5, lam: 0.1}\n"
    )
    plans = Pruner(heads).attach(model)
    assert len(plans[0].parameters) == 8  # Q, K, V and the output projection of both layers


def test_a_strategy_that_does_not_declare_sharding_support_is_refused(one_process_group):
    class UnawareMagnitude(MagnitudeStrategy):
        shardable = False

    class Plugin:
        @hookimpl
        def hfprune_register_strategies(self, register):
            register("unaware", UnawareMagnitude)

    registry = build_registry(extra_plugins={"unaware-plugin": Plugin()})
    with pytest.raises(
        RecipeError,
        match=r"(?s)targets.*intermediate\.dense\.weight is sharded by FSDP2, and strategy 'unaware' "
        r"does not declare .*2 targeted are.*CONTRIBUTING 'Sharded parameters'",
    ):
        Pruner(MAGNITUDE.format(strategy="unaware", target="intermediate.dense"), registry).attach(
            sharded_bert()
        )


def test_other_splits_are_refused_with_what_is_supported(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    model = tiny_bert()
    dense = model.bert.encoder.layer[0].intermediate.dense
    mesh = init_device_mesh("cpu", (1,))
    dense.weight = torch.nn.Parameter(distribute_tensor(dense.weight.detach(), mesh, placements=[Shard(1)]))
    with pytest.raises(
        RecipeError,
        match=r"layer\.0\.intermediate\.dense\.weight is a DTensor placed \(Shard\(dim=1\),\).*1-D row "
        r"sharding",
    ):
        Pruner(MAGNITUDE.format(strategy="magnitude", target="intermediate.dense")).attach(model)
    model = tiny_bert()
    model.bert.encoder.layer[
        1
    ].intermediate.dense.weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(
        RecipeError,
        match=r"(?s)layer\.1\.intermediate\.dense\.weight is partitioned by DeepSpeed ZeRO-3.*FSDP2",
    ):
        Pruner(MAGNITUDE.format(strategy="magnitude", target="intermediate.dense")).attach(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_bisected_threshold_is_kthvalue(one_process_group, dtype):
    """The sharded path (bisection on the float bits, counts all-reduced) finds the same k-th smallest, ties
    and zeros included."""
    generator = torch.Generator().manual_seed(0)
    magnitudes = [
        torch.rand(40, 8, generator=generator).to(dtype),
        torch.rand(24, 8, generator=generator).to(dtype),
    ]
    magnitudes[0][:5] = 0.0  # already pruned
    magnitudes[1][3:9] = magnitudes[1][0, 0]  # ties
    parts = [m.float() for m in magnitudes]
    shards = [RowShard(m.shape, 0, m.shape[0], one_process_group) for m in magnitudes]
    everything = torch.cat([p.flatten() for p in parts])
    for k in (0, 1, 5, 6, 100, 257, everything.numel() - 1, everything.numel()):
        expected = everything.kthvalue(k).values if k else torch.tensor(-1.0)
        assert kth_smallest_of_parts(parts, shards, k) == expected, k
        assert kth_smallest_of_parts(parts[:1], shards[:1], min(k, 320)) == kth_smallest_of_parts(
            parts[:1], [WHOLE], min(k, 320)
        )


def test_magnitude_masks_of_sharded_parameters_are_those_of_the_whole_ones(one_process_group):
    model = sharded_bert()
    params = [layer.intermediate.dense.weight for layer in model.bert.encoder.layer]
    layouts = [layout_of(p) for p in params]
    whole = [p.full_tensor() for p in params]
    for scope in ("layer", "global"):
        sharded = largest_magnitude_masks([p.to_local() for p in params], 0.6, scope, layouts)
        assert all(torch.equal(a, b) for a, b in zip(sharded, largest_magnitude_masks(whole, 0.6, scope)))


def test_fsdp1_is_refused_with_what_to_use_instead(one_process_group):
    """FSDP1 flattens each wrapped module's weights into one 1-D buffer: refused by name, naming FSDP2."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    cpu = torch.device("cpu")
    layers = tiny_bert()
    layers.bert.encoder.layer[0] = FullyShardedDataParallel(layers.bert.encoder.layer[0], device_id=cpu)
    whole = FullyShardedDataParallel(tiny_bert(), device_id=cpu)  # how the Trainer wraps with version 1
    recipe = MAGNITUDE.format(strategy="magnitude", target="intermediate.dense")
    for model, where in ((whole, "the model"), (layers, r"bert\.encoder\.layer\.0")):
        with pytest.raises(HfpruneError, match=rf"{where} is wrapped in FSDP1 .*'version' at 2.*fully_shard"):
            Pruner(recipe).attach(model)
    with pytest.raises(UnsupportedSharding, match="FSDP1 flat parameter"):
        layout_of(next(whole.parameters()))


def test_lora_on_a_sharded_model_is_refused(one_process_group):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"]))
    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer)
    with pytest.raises(
        RecipeError,
        match=r"attention\.self\.query\.weight is sharded by FSDP2 in a peft model: LoRA under FSDP2 is not "
        r"supported",
    ):
        Pruner(MAGNITUDE.format(strategy="magnitude", target="attention.self.query")).attach(model)
