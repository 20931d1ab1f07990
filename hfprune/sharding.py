"""Parameters split across processes (FSDP, DeepSpeed ZeRO-3), which hfprune does not prune yet.

Every strategy reads and writes whole parameters: a magnitude threshold over a matrix, a
group norm over a head's rows and columns, a mask the size of the weight. Under DDP each
process holds every parameter whole and identical, so that holds. Under FSDP2 a parameter is
a DTensor whose rows are spread over the processes, under FSDP1 it is a slice of a flat
buffer, under ZeRO-3 it is gathered only around its forward pass: masking one process's
piece with a whole-matrix mask would fail or, worse, prune the wrong weights. The engine
refuses such parameters when it attaches, before training.
"""

from __future__ import annotations

import sys

from torch import nn


def sharding_of(param: nn.Parameter) -> str | None:
    """How ``param`` is split across processes, in words, or None when each process holds it whole."""
    if hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 marks the parameters it partitions
        return "partitioned by DeepSpeed ZeRO-3"
    if "torch.distributed.tensor" in sys.modules:
        from torch.distributed.tensor import DTensor

        if isinstance(param, DTensor):
            return "a DTensor (FSDP2's fully_shard, or tensor parallelism)"
    if type(param).__name__ == "FlatParameter":  # FSDP1 flattens a module's parameters into one
        return "an FSDP1 flat parameter"
    return None
