"""The ``hfprune`` command: run the main job, check a recipe against a model, list plugins.

Failures print one line plus a hint, never a traceback. Exit codes: 0 success, 1 a
problem with the recipe, a plugin, state or compaction, 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys

from hfprune.errors import HfpruneError
from hfprune.models import TASKS, DEFAULT_MODEL_HINT, default_model_path, load_model_structure
from hfprune.plugins import DISABLE_AUTOLOAD_ENV, default_registry
from hfprune.pruner import Pruner
from hfprune.schedule import Schedule, ScheduleSpec


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except HfpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    from hfprune import __version__, main_job

    parser = argparse.ArgumentParser(prog="hfprune", description="Prune Hugging Face models during training from a YAML recipe.")
    parser.add_argument("--version", action="version", version=f"hfprune {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    main_job.register(commands)

    check = commands.add_parser(
        "check",
        help="validate a recipe against a model and show what each entry matches",
        description="Validate RECIPE and match its targets in a model, without training. For each entry, print the "
        "modules it matched, their parameter counts and the sparsity it will reach. Exits 1 with the recipe error "
        "(file, line, key) when the recipe is bad.",
    )
    check.add_argument("recipe", help="path to a YAML recipe")
    check.add_argument("--model", help=f"model folder (config.json); default: {DEFAULT_MODEL_HINT}")
    check.add_argument("--task", choices=sorted(TASKS), default="sequence-classification", help="which head to build (module names depend on it)")
    check.add_argument("--total-steps", type=int, help="resolve fractional schedules against this many optimizer steps")
    check.set_defaults(handler=run_check)

    plugins = commands.add_parser(
        "plugins",
        help="list installed strategies and the distributions that provide them",
        description=f"List every strategy found through the 'hfprune' entry-point group, with its plugin, distribution "
        f"and version, and any plugin that failed to load. {DISABLE_AUTOLOAD_ENV}=1 turns autoloading off.",
    )
    plugins.set_defaults(handler=run_plugins)
    return parser


def run_check(args: argparse.Namespace) -> int:
    pruner = Pruner(args.recipe)
    model = load_model_structure(args.model or default_model_path(), args.task)
    plans = pruner.attach(model)
    total_model = sum(p.numel() for p in model.parameters())
    total_targeted = 0
    for plan in plans:
        entry = pruner.recipe.pruners[plan.index]
        schedule = entry.schedule.resolve(args.total_steps) if args.total_steps or not entry.schedule.uses_fractions else entry.schedule
        count = plan.numel
        total_targeted += count
        print(f"pruners[{plan.index}] {plan.strategy.name} ({plan.strategy.plugin.provenance})  schedule {_schedule_text(schedule)}")
        width = max(len(n) for n in plan.parameters)
        for name, param in plan.parameters.items():
            print(f"  {name:<{width}}  {type(model.get_submodule(name.rsplit('.', 1)[0])).__name__:<10} {tuple(param.shape)!s:<14} {param.numel():>10,}")
        planned = plan.config.planned_sparsity()
        reach = f"will zero {planned:.1%} ({round(planned * count):,} weights)" if planned is not None else "sparsity set by training"
        print(f"  {len(plan.parameters)} parameters, {count:,} weights; {reach}")
    entries = "1 entry targets" if len(plans) == 1 else f"{len(plans)} entries target"
    print(f"recipe OK: {entries} {total_targeted:,} of {total_model:,} model weights ({total_targeted / total_model:.1%})")
    return 0


def _schedule_text(schedule: Schedule | ScheduleSpec) -> str:
    text = f"start {schedule.start}, end {schedule.end}, every {schedule.every}"
    if isinstance(schedule, ScheduleSpec) and schedule.uses_fractions:
        text += " (floats are fractions of training; --total-steps N shows steps)"
    return text


def run_plugins(args: argparse.Namespace) -> int:
    registry = default_registry()
    rows = [(s.name, s.plugin.name, s.plugin.distribution, s.plugin.version, s.description) for s in registry.strategies.values()]
    header = ("strategy", "plugin", "distribution", "version", "description")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(f"{str(v):<{w}}" for v, w in zip(row, widths)) + "  " + row[4])
    providers = {s.plugin.name for s in registry.strategies.values()}
    for plugin in registry.plugins:
        if plugin.error:
            print(f"failed: plugin {plugin.name!r} from {plugin.provenance}: {plugin.error}")
        elif plugin.name not in providers:
            print(f"note: plugin {plugin.name!r} from {plugin.provenance} registered no strategy (is its hook marked @hfprune.hookimpl?)")
    for message in registry.conflicts.values():
        print(f"conflict: {message}")
    if not registry.autoload:
        print(f"note: plugin autoloading is off ({DISABLE_AUTOLOAD_ENV})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
