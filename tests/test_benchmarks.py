"""Smoke test of the overhead benchmark: the script runs end to end and writes its JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def test_overhead_benchmark_quick(tmp_path):
    """`--quick`: tiny random BERT, 3 timed steps; well under a minute on 2 cores."""
    output = tmp_path / "overhead.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--steps", "3", "--warmup", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())

    names = [row["name"] for row in result["rows"]]
    assert {"stock again (A/A control)", "magnitude, fixed masks", "magnitude, during ramp"} <= set(names)
    assert len(result["stock"]["times_ms"]) == 4
    for row in result["rows"]:
        for key in ("median_ms", "stock_median_ms", "ratio_median", "ratio_mean", "memory_ratio", "peak_rss_mb"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (row["name"], key, row[key])
        assert len(row["times_ms"]) == 4
        engine_time = row["engine_ms_mean"]
        assert engine_time > 0 if row["recipe"] else engine_time == 0, (row["name"], engine_time)
    assert "step-time ratio <= 1.03" in done.stdout
    for name in names:
        assert name in done.stdout
