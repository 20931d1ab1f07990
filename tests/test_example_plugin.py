"""The example third-party plugin in ``examples/hfprune-nm``, installed by pip and tested as its author would.

pip builds and installs it into a temporary ``--target`` folder, as ``test_plugins.py`` does
the test distributions; fresh processes see it only through ``PYTHONPATH``. Its own tests
then run from the repository: the source folder ``src/`` is never on the path, and the
conformance kit requires the strategy to come from the distribution ``hfprune-nm``, so they
pass only if the installed copy's entry point works.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_plugins import hfprune_plugins, run

EXAMPLE = Path(__file__).parents[1] / "examples" / "hfprune-nm"


@pytest.fixture(scope="module")
def nm_site(tmp_path_factory) -> Path:
    """hfprune-nm installed by pip into a folder of its own; the source is copied first so no build output
    lands in the repository."""
    root = tmp_path_factory.mktemp("nm_site")
    source = root / "hfprune-nm"
    shutil.copytree(
        EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache")
    )
    site = root / "site"
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--target",
        str(site),
        str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(
            f"pip could not build and install {EXAMPLE} (exit {result.returncode}); --no-build-isolation "
            "builds with "
            "this environment's setuptools (pip install -e '.[test]').\n$ "
            f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}",
            pytrace=False,
        )
    return site


def test_the_example_s_own_tests_pass_against_the_installed_copy(nm_site, tmp_path):
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")]
    out = run(
        command, nm_site, tmp_path, PYTHONDONTWRITEBYTECODE="1"
    ).stdout  # nothing written into examples/
    summary = out.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 20 and "failed" not in summary and "error" not in summary, out


def test_hfprune_plugins_lists_nm_from_its_distribution(nm_site, tmp_path):
    rows, out = hfprune_plugins(nm_site, tmp_path)
    assert rows["nm"] == ["nm", "hfprune-nm", "0.1.0"], out
    assert not [line for line in out.splitlines() if line.startswith(("failed:", "conflict:"))], out
