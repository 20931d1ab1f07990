"""Metrics for the main job, loaded through ``evaluate`` from modules inside this package (no Hub)."""

from __future__ import annotations

from pathlib import Path


def load_metric(name: str):
    """``evaluate.load`` of the packaged metric module ``name`` ('seqeval' or 'accuracy')."""
    import evaluate

    folder = Path(__file__).parent / name
    if not (folder / f"{name}.py").is_file():
        raise ValueError(f"no packaged metric {name!r}; available: {', '.join(sorted(available()))}")
    return evaluate.load(str(folder))


def available() -> list[str]:
    return [p.name for p in Path(__file__).parent.iterdir() if (p / f"{p.name}.py").is_file()]
