"""Which heads and neurons to keep under a budget (Kwon et al. 2022, sections 4.1 and 4.2).

Heads and neurons compete for one budget but cost different amounts (a head brings its
share of four projections and of the attention itself, a neuron two or three vectors), so
the search tries every number of heads: heads are taken in order of importance, the budget
they leave is filled with neurons in order of importance, and the combination that keeps
the most summed importance wins. Every block keeps its most important head or neuron:
compaction removes groups, not whole attention or FFN blocks.

Within a block, rearrangement then swaps which groups are pruned (not how many) so that
the pruned groups' gradients cancel best: the Fisher diagonal ranks each mask alone, but
pruning several at once costs about ``|sum of their per-batch gradients|^2``.
"""

from __future__ import annotations

import torch


def search(
    importances: list[torch.Tensor], costs: list[torch.Tensor], is_head: list[bool], budget: float
) -> list[torch.Tensor]:
    """Keep flags per block (a set of heads or of neurons) whose summed cost is at most ``budget``.

    ``importances[b]`` and ``costs[b]`` hold one value per group of block ``b``; ``is_head[b]``
    says which kind competes with which. Raises ValueError when the budget cannot pay for one
    group per block.
    """
    keeps = [torch.zeros(imp.numel(), dtype=torch.bool) for imp in importances]
    spent = 0.0
    for keep, importance, cost in zip(keeps, importances, costs):
        best = int(importance.argmax())
        keep[best] = True
        spent += float(cost[best])
    if spent > budget:
        raise ValueError(
            f"the budget ({budget:.4g}) is below the cost of keeping one head or neuron in every block "
            f"({spent:.4g})"
        )
    ranked = {kind: _ranked(importances, costs, keeps, is_head, kind) for kind in (True, False)}
    heads, neurons = ranked[True], ranked[False]
    head_costs = torch.cat([torch.zeros(1, dtype=torch.float64), heads["cost"].cumsum(0)])
    head_values = torch.cat([torch.zeros(1, dtype=torch.float64), heads["importance"].cumsum(0)])
    neuron_costs = neurons["cost"].cumsum(0)
    neuron_values = torch.cat([torch.zeros(1, dtype=torch.float64), neurons["importance"].cumsum(0)])
    left = budget - spent - head_costs  # for each number of extra heads, the budget left for neurons
    affordable = left >= 0
    neuron_counts = torch.searchsorted(neuron_costs, left.clamp_min(0), right=True)
    value = head_values + neuron_values[neuron_counts]
    value[~affordable] = -torch.inf
    head_count = int(value.argmax())
    for kind, count in ((heads, head_count), (neurons, int(neuron_counts[head_count]))):
        for block, group in zip(kind["block"][:count].tolist(), kind["group"][:count].tolist()):
            keeps[block][group] = True
    return keeps


def _ranked(importances, costs, keeps, is_head, kind: bool) -> dict[str, torch.Tensor]:
    """The groups of one kind not kept yet, most important first: block, group, importance and cost."""
    rows = [
        (torch.full((int((~keep).sum()),), block), (~keep).nonzero().flatten(), imp[~keep], cost[~keep])
        for block, (imp, cost, keep, head) in enumerate(zip(importances, costs, keeps, is_head))
        if head == kind
    ]
    if not rows:
        empty = torch.zeros(0)
        return {
            "block": empty.long(),
            "group": empty.long(),
            "importance": empty.double(),
            "cost": empty.double(),
        }
    block, group, importance, cost = (torch.cat(parts) for parts in zip(*rows))
    order = importance.double().argsort(descending=True, stable=True)
    return {
        "block": block[order],
        "group": group[order],
        "importance": importance.double()[order],
        "cost": cost.double()[order],
    }


def rearrange(gradients: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep flags with as many pruned groups as ``keep``, chosen so their per-batch gradients cancel best.

    ``gradients`` is (batches, groups): each batch's loss gradient of every group's mask. Greedy,
    as Kwon et al.: start from the lowest-Fisher groups; offer each next group in turn and drop
    from the pruned set the one whose absence leaves the smallest summed gradient.
    """
    pruned = int((~keep).sum())
    if pruned == 0 or pruned == keep.numel():
        return keep
    vectors = gradients.t().double()  # (groups, batches)
    order = vectors.square().sum(1).argsort().tolist()
    chosen = order[:pruned]
    for candidate in order[pruned:]:
        chosen.append(candidate)
        members = vectors[chosen]
        without_each = members.sum(0) - members  # the summed gradient left when each one is dropped
        del chosen[int(without_each.square().sum(1).argmin())]
    result = torch.ones_like(keep)
    result[chosen] = False
    return result
