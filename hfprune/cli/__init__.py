"""The ``hfprune`` command: one module per subcommand, each adding itself with ``register(commands)``.

``run`` (:mod:`~hfprune.cli.run`, results written by :mod:`~hfprune.cli.run_results`), ``prune``, ``check``,
``compact``, ``report`` and ``plugins``. What only the command needs lives here too: its
model sources, tasks, metric modules, latency timing, tables and picture. The library
(``hfprune``'s engine) never imports this package.

Failures print one line plus a hint, never a traceback. Exit codes: 0 success, 1 a
problem with the recipe, a plugin, state, compaction or the file system, 2 a usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from hfprune.errors import HfpruneError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(training_flags=_command(argv) == "run")
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except HfpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (
        OSError
    ) as exc:  # a full disk or a folder without write permission: the system's words are clear enough
        print(
            f"error: {exc}\n  hint: check the paths and free space; nothing was half-written over earlier "
            "results",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser(training_flags: bool = False) -> argparse.ArgumentParser:
    """The whole command line; ``training_flags`` adds a flag per TrainingArguments field to ``run`` (that
    imports transformers, seconds that only a ``run`` command line should pay)."""
    from hfprune import __version__
    from hfprune.cli import check, compact, plugins, prune, report, run

    parser = argparse.ArgumentParser(
        prog="hfprune",
        description="Prune Hugging Face models during training from a YAML recipe, and compact them into "
        "smaller ones.",
        epilog="'hfprune COMMAND --help' explains each command. Exit codes: 0 success; 1 a problem with the "
        "recipe, a "
        "plugin, state, compaction or the file system (one line, with a hint); 2 a usage error; 130 "
        "interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"hfprune {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    run.register(commands, training_flags)
    for command in (prune, report, check, compact, plugins):
        command.register(commands)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand's name: the first word that is not an option."""
    return next((word for word in argv if not word.startswith("-")), None)
