"""The README's two setup commands stay true: CI runs the README's test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    block = re.search(r"## Setup: two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_two_commands_the_main_job_and_the_tests():
    run, test = setup_commands()
    assert run.endswith("hfprune run") and "torch==2.13.0" in run
    assert "pytest" in test and "torch==2.13.0" in test


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = setup_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines
