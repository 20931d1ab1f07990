"""Built-in plugin: layer lasso, learned layer selection (LD-Net, Liu et al., EMNLP 2018, arXiv 1804.07827).

Shipped inside hfprune but found exactly as a third-party plugin is: through the
``layer-lasso`` entry point in the ``hfprune`` group.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch import nn

from hfprune import StrategyConfig, hookimpl
from hfprune.architecture import find_layer_stacks, refusal
from hfprune.errors import StateError, TargetError
from hfprune.integrations.peft_names import named_modules
from hfprune.strategy import StepContext, Strategy, Targets
from hfprune_layer_lasso.gates import LayerGateHook, StackKind

logger = logging.getLogger("hfprune.layer_lasso")

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class LayerLassoConfig(StrategyConfig):
    """``config:`` of the layer-lasso strategy."""

    keep: int | None = Field(
        default=None,
        ge=1,
        description="layers to keep, counted over every targeted stack together; leave out for layer-wise "
        "dropout alone",
    )
    l0: float = Field(
        default=0.05,
        ge=0.0,
        description="weight of the regularizer that drives gates to 0 or 1 and to at most `keep` layers",
    )
    gate_lr: float = Field(
        default=0.05,
        gt=0.0,
        description="Adam learning rate of the gates: a gate moves at most about this far per step, so give "
        "the schedule 1/gate_lr steps or more",
    )
    train_layers: bool = Field(
        default=True,
        description="false: the stack's layers stay frozen (LD-Net); only gates and the rest train",
    )
    dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="layer-wise dropout: chance a layer is skipped on a training forward pass",
    )
    settle: Literal["top", "round"] = Field(
        default="top",
        description="at schedule end, gates go to 1 or 0: each stack's largest to 1, then up to `keep` in "
        "all the largest others "
        "('top') or those of them at 0.5 or more ('round')",
    )
    stack: StackKind = Field(
        default="residual",
        description="'residual': x + g (f(x) - x); 'dense': g f(x) wherever it is consumed",
    )

    @model_validator(mode="after")
    def _something_to_do(self) -> LayerLassoConfig:
        if self.keep is None and self.dropout == 0.0:
            raise ValueError("set keep (layers to select) or dropout (layer-wise dropout alone), or both")
        if self.stack == "dense" and self.dropout > 0.0:
            raise ValueError(
                "layer-wise dropout on a densely connected stack drops a layer from deeper layers' inputs "
                "but keeps it in the "
                "stack's output, which a hook on the layer cannot tell apart: the model must do it "
                "(dropout: 0 here)"
            )
        return self


def find_stacks(targets: Targets) -> dict[str, nn.ModuleList]:
    """The layer stacks of the matched modules, by full name: a matched ModuleList, or the stacks adapters
    find inside."""
    stacks: dict[str, nn.ModuleList] = {}
    for name, module in targets.items():
        names = {id(m): n for n, m in named_modules(module, name)}
        for stack in find_layer_stacks(module, targets.architectures):
            stacks.setdefault(names[id(stack)], stack)
    return stacks


def layer_refusal(targets: Targets) -> str | None:
    """Why an adapter refuses to delete layers of the matched modules (ALBERT, T5, BART), or None: asked of
    every target, a layer list named directly included."""
    for module in targets.values():
        reason = refusal(module, "layer", targets.architectures)
        if reason:
            return reason
    return None


class LayerLassoStrategy(Strategy):
    """A gate per layer and LD-Net's regularizer, which select ``keep`` layers to keep; or layer-wise dropout
    alone.

    Gates start at 1 and learn during ``[start, end)`` of the schedule, with their own Adam
    (``gate_lr``) on the task gradient plus the gradient of
    ``R(g) = l0 * sum_i g_i (1 - g_i) + l0 * sum_{i: g_i > 0} g_i``, whose L1 part acts only
    while more than ``keep`` gates are non-zero; after every step they are clamped to [0, 1].
    The model's optimizer never sees them, so its schedule, weight decay and clipping do not
    either. At ``end`` every gate is settled at 0 or 1 (``settle``; each stack keeps at least
    one layer); a gate that had not reached an end is logged with how far the change moves its
    layer's output on the last training batch. Layers at 0 are then the identity, and
    compaction deletes them.

    Layer-wise dropout skips each layer of a residual stack with probability ``dropout`` on a
    training forward pass during ``[start, end]`` (drawn from torch's CPU generator, which the
    Trainer seeds and checkpoints); it trains a stack whose layers can go.

    With ``train_layers: false`` the layers' gradients are dropped before each optimizer step
    (so AdamW skips them, weight decay included); they are still computed, and gradient
    clipping still counts them. Freezing them with ``requires_grad`` instead would break a
    DistributedDataParallel model wrapped before the strategy exists. The gates act through
    forward hooks that stay on the model after training, so it is evaluated as gated;
    ``pruner.close()`` removes them, and the compacted model has none.
    """

    Config = LayerLassoConfig

    def __init__(self, config, targets, parameters, schedule):
        super().__init__(config, targets, parameters, schedule)
        self.stacks = find_stacks(targets)
        self.layer_names = [f"{name}.{i}" for name, stack in self.stacks.items() for i in range(len(stack))]
        layers = [layer for stack in self.stacks.values() for layer in stack]
        device = next(layers[0].parameters()).device
        self.frozen = [] if config.train_layers else [p for layer in layers for p in layer.parameters()]
        self.gates = torch.ones(len(layers), device=device, requires_grad=True)
        self.exp_avg = torch.zeros(len(layers), device=device)
        self.exp_avg_sq = torch.zeros(len(layers), device=device)
        self.adam_steps = 0
        self.settled: list[float] | None = None
        self.next_step = 0
        self.settle_shift = 0.0
        self._branch_ratio = torch.zeros(len(layers), device=device)
        self._grad: torch.Tensor | None = None
        self._handles = [LayerGateHook(self, i, config.stack).attach(layer) for i, layer in enumerate(layers)]

    @classmethod
    def select_parameters(cls, targets, config):
        refused = layer_refusal(targets)
        if refused:
            raise TargetError(refused)
        stacks = find_stacks(targets)
        if not stacks:
            raise TargetError(
                f"matched {len(targets)} modules, but none is a layer stack (an nn.ModuleList such as "
                "bert.encoder.layer, transformer.h or model.layers) or holds one an architecture adapter "
                "recognizes"
            )
        depth = sum(len(stack) for stack in stacks.values())
        if config.keep is not None and config.keep >= depth:
            raise TargetError(
                f"keep is {config.keep}, but the targeted stacks have {depth} layers in all: nothing would go"
            )
        if config.keep is not None and config.keep < len(stacks):
            raise TargetError(
                f"keep is {config.keep}, but each of the {len(stacks)} targeted stacks keeps at least one "
                "layer"
            )
        return {}  # the gates are the strategy's own; no weight of the model is pruned

    @classmethod
    def describe(cls, targets, config):
        stacks = find_stacks(targets)
        lines = [
            f"{name}: {len(stack)} layers ({type(stack[0]).__name__}), {config.stack}"
            for name, stack in stacks.items()
        ]
        depth = sum(len(stack) for stack in stacks.values())
        if config.keep is not None:
            if config.settle == "round":  # gates that fell below 0.5 stay off, so fewer than keep may survive
                lines.append(
                    f"keeps at most {config.keep} of {depth} layers (settle: round); compaction deletes the "
                    "others"
                )
            else:
                lines.append(
                    f"keeps {config.keep} of {depth} layers; compaction deletes the other "
                    f"{depth - config.keep}"
                )
        if config.dropout:
            lines.append(f"layer-wise dropout {config.dropout:g} during the schedule")
        return lines

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- what the hooks read ---------------------------------------------------------------
    def gate_for(self, index: int, training: bool):
        if self.settled is not None:
            return self.settled[index]
        if not self.schedule.acts_at(self.next_step):
            return None
        dropped = training and self.config.dropout > 0 and torch.rand(()).item() < self.config.dropout
        if self.config.keep is None:
            return 0.0 if dropped else None
        gate = self.gates[index]
        return gate * 0.0 if dropped else gate

    @torch.no_grad()
    def observe_branch(self, index: int, branch: torch.Tensor, reference: torch.Tensor) -> None:
        if self.next_step != self.schedule.end:  # only the settling report reads it: the last step's batch
            return
        self._branch_ratio[index] = branch.float().norm() / reference.float().norm().clamp_min(1e-12)

    # --- the hot path ------------------------------------------------------------------------
    def before_optimizer_step(self, ctx: StepContext) -> None:
        self.next_step = ctx.step + 1  # here too: after a step a GradScaler skips, on_step_end is not called
        for param in self.frozen:
            param.grad = None  # AdamW skips a parameter without a gradient, weight decay included
        if self.gates.grad is None:
            return
        self._grad, self.gates.grad = (
            self.gates.grad,
            None,
        )  # taken now: a skipped step must not leave it behind
        if (
            ctx.grad_scale != 1.0
        ):  # the optimizer's GradScaler unscales its own parameters' gradients, not the gates'
            self._grad /= ctx.grad_scale
        if ctx.world_size > 1:
            dist.all_reduce(self._grad)
            self._grad /= ctx.world_size

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        if self.config.keep is None or self.settled is not None or not self.schedule.in_phase(ctx.step):
            return
        gates, l0 = self.gates, self.config.l0
        grad = self._grad if self._grad is not None else torch.zeros_like(gates)
        self._grad = None
        too_many = ((gates > 0).sum() > self.config.keep).float()
        grad = grad + l0 * (1 - 2 * gates) + l0 * too_many * (gates > 0).float()
        self.adam_steps += 1
        beta1, beta2 = ADAM_BETAS
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (self.exp_avg_sq / (1 - beta2**self.adam_steps)).sqrt_().add_(ADAM_EPS)
        gates.addcdiv_(self.exp_avg, denominator, value=-self.config.gate_lr / (1 - beta1**self.adam_steps))
        gates.clamp_(0.0, 1.0)

    def on_step_end(self, ctx: StepContext) -> None:
        self.next_step = ctx.step + 1
        if self.config.keep is not None and self.settled is None and self.schedule.has_ended(ctx.step):
            self.settle(ctx.world_size)

    # --- settling ----------------------------------------------------------------------------
    @torch.no_grad()
    def settle(self, world_size: int = 1) -> None:
        """Fix every gate at 0 or 1 for good, keeping at most ``keep`` layers and at least one per stack.

        Each stack's largest gate goes to 1 first (a stack with no layer could not be
        compacted), then the largest of the others until ``keep`` layers are kept (under
        ``settle: round`` only those at 0.5 or more). Under DDP every rank settles the same
        gates; the output shift reported is averaged over the ranks' last batches, so the
        state each rank saves is the same too.
        """
        if world_size > 1:
            dist.all_reduce(self._branch_ratio)
            self._branch_ratio /= world_size
        values = self.gates.detach().float().cpu()
        keep = torch.zeros_like(values, dtype=torch.bool)
        start = 0
        for stack in self.stacks.values():
            keep[start + int(values[start : start + len(stack)].argmax())] = True
            start += len(stack)
        others = [i for i in values.argsort(descending=True, stable=True).tolist() if not keep[i]]
        for i in others[: max(self.config.keep - len(self.stacks), 0)]:
            keep[i] = self.config.settle == "top" or bool(values[i] >= 0.5)
        self.settle_shift = self._report_settling(values, keep.float())
        self.gates.copy_(keep.float())
        self.settled = keep.float().tolist()

    def _report_settling(self, values: torch.Tensor, settled: torch.Tensor) -> float:
        """Log each gate that moves and the layers kept; the largest relative output shift (last training
        batch)."""
        moved = (settled - values).abs()
        shift = moved * self._branch_ratio.cpu()
        for i in moved.nonzero().flatten().tolist():
            logger.warning(
                "layer-lasso: gate of %s settled from %.3f to %d; on the last training batch that moves the "
                "layer's output "
                "by about %.1f%% of its norm",
                self.layer_names[i],
                values[i],
                int(settled[i]),
                100 * shift[i],
            )
        kept = [name for name, s in zip(self.layer_names, settled.tolist()) if s]
        logger.info(
            "layer-lasso: keeping %d of %d layers: %s", len(kept), len(self.layer_names), ", ".join(kept)
        )
        return float(shift.max())

    # --- reporting, compaction, state ----------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        if self.config.keep is None:
            return {}
        values = self.gates.detach().tolist()
        result = {"live_layers": float(sum(v > 0 for v in values))}
        result.update({f"gate/{name}": v for name, v in zip(self.layer_names, values)})
        if self.settled is not None:
            result["settle_shift"] = self.settle_shift
        return result

    def fixes_a_pattern(self) -> bool:
        """Only with ``keep``: layer-wise dropout alone settles nothing."""
        return self.config.keep is not None

    def compaction_plan(self):
        if self.settled is None:
            return None
        plan, start = {}, 0
        for name, stack in self.stacks.items():
            plan[name] = torch.tensor(self.settled[start : start + len(stack)], dtype=torch.bool)
            start += len(stack)
        return plan

    def state_dict(self):
        state = {"next_step": self.next_step}
        if self.config.keep is not None:
            state.update(
                gates=self.gates.detach().cpu(),
                exp_avg=self.exp_avg.cpu(),
                exp_avg_sq=self.exp_avg_sq.cpu(),
                adam_steps=self.adam_steps,
                settled=self.settled is not None,
                settle_shift=self.settle_shift,
            )
        return state

    @torch.no_grad()
    def load_state_dict(self, state):
        self.next_step = int(state["next_step"])
        if self.config.keep is None:
            return
        for name in ("gates", "exp_avg", "exp_avg_sq"):
            saved = state[name]
            if saved.shape != self.gates.shape:
                raise StateError(
                    f"saved {name} has {saved.numel()} layers, the targeted stacks {self.gates.numel()}"
                )
            getattr(self, name).copy_(saved)
        self.adam_steps = int(state["adam_steps"])
        self.settle_shift = float(
            state.get("settle_shift", 0.0)
        )  # absent from states saved before it was kept
        self.settled = self.gates.detach().tolist() if state["settled"] else None


@hookimpl
def hfprune_register_strategies(register):
    register("layer-lasso", LayerLassoStrategy)
