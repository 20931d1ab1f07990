"""The wheel carries what the installed package reads at run time: the built-in recipes and the metric
modules."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_the_built_in_recipes_and_the_metric_modules(tmp_path):
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(ROOT),
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "-q",
        "-w",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("hfprune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {
        f"hfprune/recipe/builtin/{path.name}"
        for path in (ROOT / "hfprune" / "recipe" / "builtin").glob("*.yaml")
    }
    assert "hfprune/recipe/builtin/default.yaml" in recipes and recipes <= names
    assert {"hfprune/cli/metrics/seqeval/seqeval.py", "hfprune/cli/metrics/accuracy/accuracy.py"} <= names
    for plugin in ("hfprune_layer_lasso", "hfprune_ldnet"):  # the built-in plugins ship in the same wheel
        assert any(name.startswith(f"{plugin}/") for name in names)
