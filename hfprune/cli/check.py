"""``hfprune check RECIPE``: validate a recipe against a model and show what each entry will act on."""

from __future__ import annotations

import argparse

from hfprune.cli.model_sources import (
    AUTO_CLASSES,
    DEFAULT_MODEL_HINT,
    load_model_structure,
    resolve_model_source,
)
from hfprune.errors import HfpruneError
from hfprune.integrations.peft_names import model_view
from hfprune.pruner import Pruner
from hfprune.recipe import builtin as builtin_recipes
from hfprune.recipe.schema import load_recipe
from hfprune.schedule import Schedule, ScheduleSpec
from hfprune.strategy import OneShotStrategy
from hfprune.tied import distinct_numel


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``check`` subcommand to the ``hfprune`` command line."""
    check = commands.add_parser(
        "check",
        help="validate a recipe against a model and show what each entry matches",
        description="Validate RECIPE and match its targets in a model, without training. For each entry, "
        "print the "
        "modules it matched, their parameter counts and the sparsity it will reach. Exits 1 with the recipe "
        "error "
        "(file, line, key) when the recipe is bad.",
    )
    check.add_argument(
        "recipe",
        help=f"a YAML recipe file or a built-in recipe's name ({', '.join(builtin_recipes.builtin_names())})",
    )
    check.add_argument(
        "--model",
        help=f"model folder (config.json), or smollm2 (a packaged LLM); default: {DEFAULT_MODEL_HINT}",
    )
    check.add_argument(
        "--task",
        choices=sorted(AUTO_CLASSES),
        default="sequence-classification",
        help="which head to build (module names depend on it)",
    )
    check.add_argument(
        "--total-steps", type=int, help="resolve fractional schedules against this many optimizer steps"
    )
    lora = check.add_mutually_exclusive_group()
    lora.add_argument(
        "--lora",
        metavar="MODULES",
        help="check against the model with LoRA on these comma-separated modules "
        "(peft's target_modules), showing which base weight each target resolves to",
    )
    lora.add_argument(
        "--adapter",
        metavar="DIR",
        help="the same, with the LoRA config of a saved peft adapter (adapter_config.json)",
    )
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    if args.total_steps is not None and args.total_steps < 1:
        raise HfpruneError(f"--total-steps {args.total_steps}: a run has at least 1 optimizer step")
    recipe = load_recipe(builtin_recipes.resolve(args.recipe))
    model = _with_adapter(load_model_structure(resolve_model_source(args.model), args.task), args)
    distillation = recipe.distillation
    # A recipe that distills without naming its teacher gets one at run time (hfprune run's dense model,
    # PruneCallback(teacher=)): the model stands in for it here, so only a named teacher is checked.
    run_time_teacher = distillation is not None and distillation.teacher is None
    pruner = Pruner(recipe, teacher=model if run_time_teacher else None)
    plans = pruner.attach(model)
    view = model_view(model)
    if view.prefix:
        print(
            f"names are the model's own: in the PeftModel each is prefixed {view.prefix!r} (targets may be "
            "written either way)"
        )
    total_model = distinct_numel(model.parameters())  # tied weights once, like the entries count them
    total_targeted = 0
    schedules = []
    for plan in plans:
        entry = pruner.recipe.pruners[plan.index]
        try:
            schedule = (
                entry.schedule.resolve(args.total_steps)
                if args.total_steps or not entry.schedule.uses_fractions
                else entry.schedule
            )
        except ValueError as exc:
            raise pruner.recipe.error(
                [pruner.recipe.problem(("pruners", plan.index, "schedule"), str(exc))]
            ) from None
        schedules.append(schedule)
        count = plan.numel
        total_targeted += count
        one_shot = issubclass(plan.strategy.cls, OneShotStrategy)
        when = "one-shot, from calibration data" if one_shot else f"schedule {_schedule_text(schedule)}"
        print(f"pruners[{plan.index}] {plan.strategy.name} ({plan.strategy.plugin.provenance})  {when}")
        if not plan.parameters:
            for line in plan.strategy.cls.describe(plan.modules, plan.config):
                print(f"  {line}")
            continue
        width = max(len(n) for n in plan.parameters)
        for name, param in plan.parameters.items():
            print(
                f"  {name:<{width}}  {type(view.modules[name.rpartition('.')[0]]).__name__:<10} "
                f"{tuple(param.shape)!s:<14} {param.numel():>10,}"
            )
            if view.wrapped_layer(name):
                print(
                    f"    = {view.peft_name(name)} (LoRA base weight: its adapter's update is masked like it)"
                )
            for other in plan.tied.get(name, ()):
                print(f"    = {other} (tied weights: the same tensor, pruned and counted once)")
        planned = plan.planned_sparsity
        decided_by = "calibration" if one_shot else "training"
        reach = (
            f"will zero {planned:.1%} ({round(planned * count):,} weights)"
            if planned is not None
            else f"sparsity set by {decided_by}"
        )
        print(f"  {len(plan.parameters)} parameters, {count:,} weights; {reach}")
    if total_targeted:
        entries = "1 entry targets" if len(plans) == 1 else f"{len(plans)} entries target"
        print(
            f"recipe OK: {entries} {total_targeted:,} of {total_model:,} model weights "
            f"({total_targeted / total_model:.1%})"
        )
    else:
        print(
            f"recipe OK: {len(plans)} {'entry' if len(plans) == 1 else 'entries'}, acting on what is listed "
            "above"
        )
    if distillation is not None:
        source = (
            "given at run time (hfprune run: the dense model it fine-tunes first; PruneCallback(teacher=))"
            if run_time_teacher
            else f"{distillation.teacher}, which can teach this model"
        )
        print(
            f"distillation: T {distillation.temperature:g}, logit weight {distillation.logit_weight:g}, "
            f"hidden weight {distillation.hidden_weight:g}; the teacher is {source}"
        )
    _warn_of_early_best_checkpoints(recipe, schedules)
    return 0


def _warn_of_early_best_checkpoints(recipe, schedules: list) -> None:
    """When the recipe's ``training:`` asks the Trainer to reload its best checkpoint, say that one saved
    before the last schedule ends holds a pattern not yet fixed, which training refuses at its end (the
    warning PruneCallback gives at train begin, here before any training)."""
    training = (recipe.training.model_extra or {}) if recipe.training is not None else {}
    if not training.get("load_best_model_at_end") or not schedules:
        return
    ends = [schedule.end for schedule in schedules]
    if all(isinstance(end, int) for end in ends):
        fixed_after = max(ends) + 1
        if training.get("eval_strategy") == "steps" and training.get("eval_delay", 0) >= fixed_after:
            return
        when = f"{fixed_after} optimizer steps"
        advice = f"eval_strategy: steps with eval_delay: {fixed_after}"
    else:
        when = "the last schedule ends"
        advice = "eval_strategy: steps with eval_delay past it (--total-steps N gives the step)"
    print(
        f"warning: training: load_best_model_at_end can reload a checkpoint saved before {when}, when the "
        f"pruning is fixed; training refuses it at its end: evaluate from then on ({advice})"
    )


def _with_adapter(model, args: argparse.Namespace):
    """``model`` wrapped by peft as ``--lora`` or ``--adapter`` say (structure only: no adapter weights are
    read)."""
    if not (args.lora or args.adapter):
        return model
    from peft import LoraConfig, PeftConfig, get_peft_model

    if args.lora:
        config = LoraConfig(target_modules=[m.strip() for m in args.lora.split(",") if m.strip()])
    else:
        try:
            config = PeftConfig.from_pretrained(args.adapter)
        except (OSError, ValueError) as exc:
            raise HfpruneError(f"cannot read a peft adapter config from {args.adapter}: {exc}") from None
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise HfpruneError(f"peft cannot wrap the model: {exc}") from None


def _schedule_text(schedule: Schedule | ScheduleSpec) -> str:
    text = f"start {schedule.start}, end {schedule.end}, every {schedule.every}"
    if isinstance(schedule, ScheduleSpec) and schedule.uses_fractions:
        text += " (floats are fractions of training; --total-steps N shows steps)"
    return text
