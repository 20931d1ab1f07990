"""The ``hfprune`` command: run the main job, check a recipe, compact a checkpoint, list plugins.

Failures print one line plus a hint, never a traceback. Exit codes: 0 success, 1 a
problem with the recipe, a plugin, state, compaction or the file system, 2 a usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hfprune import recipes
from hfprune.errors import HfpruneError
from hfprune.models import TASKS, DEFAULT_MODEL_HINT, default_model_path, load_model, load_model_structure
from hfprune.peft_names import model_view
from hfprune.plugins import DISABLE_AUTOLOAD_ENV, default_registry
from hfprune.pruner import Pruner
from hfprune.schedule import Schedule, ScheduleSpec
from hfprune.text_table import print_table

TRAINER_STATE = "trainer_state.json"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except HfpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or a folder without write permission: the system's words are clear enough
        print(f"error: {exc}\n  hint: check the paths and free space; nothing was half-written over earlier results", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    from hfprune import __version__, main_job, report_command

    parser = argparse.ArgumentParser(
        prog="hfprune",
        description="Prune Hugging Face models during training from a YAML recipe, and compact them into smaller ones.",
        epilog="'hfprune COMMAND --help' explains each command. Exit codes: 0 success; 1 a problem with the recipe, a "
        "plugin, state, compaction or the file system (one line, with a hint); 2 a usage error; 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"hfprune {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    main_job.register(commands)
    report_command.register(commands)

    check = commands.add_parser(
        "check",
        help="validate a recipe against a model and show what each entry matches",
        description="Validate RECIPE and match its targets in a model, without training. For each entry, print the "
        "modules it matched, their parameter counts and the sparsity it will reach. Exits 1 with the recipe error "
        "(file, line, key) when the recipe is bad.",
    )
    check.add_argument("recipe", help=f"a YAML recipe file or a built-in recipe's name ({', '.join(recipes.builtin_names())})")
    check.add_argument("--model", help=f"model folder (config.json); default: {DEFAULT_MODEL_HINT}")
    check.add_argument("--task", choices=sorted(TASKS), default="sequence-classification", help="which head to build (module names depend on it)")
    check.add_argument("--total-steps", type=int, help="resolve fractional schedules against this many optimizer steps")
    lora = check.add_mutually_exclusive_group()
    lora.add_argument("--lora", metavar="MODULES", help="check against the model with LoRA on these comma-separated modules "
                      "(peft's target_modules), showing which base weight each target resolves to")
    lora.add_argument("--adapter", metavar="DIR", help="the same, with the LoRA config of a saved peft adapter (adapter_config.json)")
    check.set_defaults(handler=run_check)

    compact = commands.add_parser(
        "compact",
        help="turn a pruned Trainer checkpoint into a smaller model without its pruned layers, heads and neurons",
        description="Load the model in CHECKPOINT (a Trainer checkpoint folder holding hfprune_state.safetensors), remove "
        "the layers, heads and neurons RECIPE's structured strategies pruned, check the smaller model's outputs against the "
        "pruned one's, and save it (with the tokenizer, if the checkpoint has one) to OUTPUT. A checkpoint of a LoRA run "
        "(adapter_config.json) is loaded over the base model its config names, and the adapters are merged with the "
        "pruned weights kept zero before compacting. Load the result with "
        "hfprune.load_compacted(OUTPUT); when every layer kept the same sizes and the config can state them, plain "
        "AutoModelFor*.from_pretrained(OUTPUT) loads it too.",
    )
    compact.add_argument("checkpoint", help="Trainer checkpoint folder (config.json and weights, or a LoRA adapter; hfprune_state.safetensors)")
    compact.add_argument("--recipe", required=True, help="the recipe the run trained with (a file or a built-in recipe's name)")
    compact.add_argument("--output", required=True, help="folder to write the compacted model to (must not exist or be empty)")
    compact.add_argument("--task", choices=sorted(TASKS), default="sequence-classification", help="which head the checkpoint has")
    compact.set_defaults(handler=run_compact)

    plugins = commands.add_parser(
        "plugins",
        help="list installed strategies and architecture adapters and the distributions that provide them",
        description=f"List every strategy and architecture adapter found through the 'hfprune' entry-point group, with "
        f"its plugin, distribution and version, and any plugin that failed to load. {DISABLE_AUTOLOAD_ENV}=1 turns autoloading off.",
    )
    plugins.set_defaults(handler=run_plugins)
    return parser


def run_check(args: argparse.Namespace) -> int:
    if args.total_steps is not None and args.total_steps < 1:
        raise HfpruneError(f"--total-steps {args.total_steps}: a run has at least 1 optimizer step")
    pruner = Pruner(recipes.resolve(args.recipe))
    model = _with_adapter(load_model_structure(args.model or default_model_path(), args.task), args)
    plans = pruner.attach(model)
    view = model_view(model)
    if view.prefix:
        print(f"names are the model's own: in the PeftModel each is prefixed {view.prefix!r} (targets may be written either way)")
    total_model = sum(p.numel() for p in model.parameters())
    total_targeted = 0
    for plan in plans:
        entry = pruner.recipe.pruners[plan.index]
        try:
            schedule = entry.schedule.resolve(args.total_steps) if args.total_steps or not entry.schedule.uses_fractions else entry.schedule
        except ValueError as exc:
            raise pruner.recipe.error([pruner.recipe.problem(("pruners", plan.index, "schedule"), str(exc))]) from None
        count = plan.numel
        total_targeted += count
        print(f"pruners[{plan.index}] {plan.strategy.name} ({plan.strategy.plugin.provenance})  schedule {_schedule_text(schedule)}")
        if not plan.parameters:
            for line in plan.strategy.cls.describe(plan.modules, plan.config):
                print(f"  {line}")
            continue
        width = max(len(n) for n in plan.parameters)
        for name, param in plan.parameters.items():
            print(f"  {name:<{width}}  {type(view.modules[name.rpartition('.')[0]]).__name__:<10} {tuple(param.shape)!s:<14} {param.numel():>10,}")
            if view.wrapped_layer(name):
                print(f"    = {view.peft_name(name)} (LoRA base weight: its adapter's update is masked like it)")
        planned = plan.config.planned_sparsity()
        reach = f"will zero {planned:.1%} ({round(planned * count):,} weights)" if planned is not None else "sparsity set by training"
        print(f"  {len(plan.parameters)} parameters, {count:,} weights; {reach}")
    if total_targeted:
        entries = "1 entry targets" if len(plans) == 1 else f"{len(plans)} entries target"
        print(f"recipe OK: {entries} {total_targeted:,} of {total_model:,} model weights ({total_targeted / total_model:.1%})")
    else:
        print(f"recipe OK: {len(plans)} {'entry' if len(plans) == 1 else 'entries'}, acting on what is listed above")
    return 0


def _with_adapter(model, args: argparse.Namespace):
    """``model`` wrapped by peft as ``--lora`` or ``--adapter`` say (structure only: no adapter weights are read)."""
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


def run_compact(args: argparse.Namespace) -> int:
    from hfprune.compaction import LAYOUT_KEY, save_compacted

    checkpoint = Path(args.checkpoint)
    pruner = Pruner(recipes.resolve(args.recipe))
    model = load_model(checkpoint, args.task)
    pruner.attach(model)
    pruner.start(_max_steps(checkpoint))
    pruner.load(checkpoint)
    before = sum(p.numel() for p in model.parameters())
    compacted = pruner.compact(model)
    save_compacted(compacted, args.output, tokenizer_from=checkpoint)
    after = sum(p.numel() for p in compacted.parameters())
    print(f"compacted {before:,} -> {after:,} parameters ({before / after:.2f}x fewer); outputs checked on a probe batch")
    if getattr(compacted.config, LAYOUT_KEY, None):
        how = f"hfprune.load_compacted({str(args.output)!r}) (the config records per-block sizes a stock config cannot state)"
    else:
        how = f"plain {TASKS[args.task]}.from_pretrained({str(args.output)!r}) (stock config) or hfprune.load_compacted"
    print(f"saved to {args.output}; load it with {how}")
    return 0


def _max_steps(checkpoint: Path) -> int | None:
    """The run length the Trainer recorded, which fractional schedules resolve against."""
    state = checkpoint / TRAINER_STATE
    return json.loads(state.read_text()).get("max_steps") if state.is_file() else None


def _schedule_text(schedule: Schedule | ScheduleSpec) -> str:
    text = f"start {schedule.start}, end {schedule.end}, every {schedule.every}"
    if isinstance(schedule, ScheduleSpec) and schedule.uses_fractions:
        text += " (floats are fractions of training; --total-steps N shows steps)"
    return text


def run_plugins(args: argparse.Namespace) -> int:
    registry = default_registry()
    rows = [(s.name, s.plugin.name, s.plugin.distribution, s.plugin.version, s.description) for s in registry.strategies.values()]
    print_table(("strategy", "plugin", "distribution", "version", "description"), rows)
    if registry.architectures:
        print()
        owners = registry.architecture_owners
        rows = [(a.name, owners[a.name].name, owners[a.name].distribution, owners[a.name].version, (type(a).__doc__ or "").strip().splitlines()[0])
                for a in registry.architectures]
        print_table(("architecture", "plugin", "distribution", "version", "recognizes"), rows)
    providers = {s.plugin.name for s in registry.strategies.values()} | {p.name for p in registry.architecture_owners.values()}
    for plugin in registry.plugins:
        if plugin.error:
            print(f"failed: plugin {plugin.name!r} from {plugin.provenance}: {plugin.error}")
        elif plugin.name not in providers:
            print(f"note: plugin {plugin.name!r} from {plugin.provenance} registered nothing (is its hook marked @hfprune.hookimpl?)")
    for message in registry.conflicts.values():
        print(f"conflict: {message}")
    if not registry.autoload:
        print(f"note: plugin autoloading is off ({DISABLE_AUTOLOAD_ENV})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
