"""What ``hfprune run`` and ``hfprune prune`` leave behind: report.json for scripts, report.md for people,
and the picture.

Each report is written beside its final name and renamed into place, so an interrupted run
leaves the last complete report, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

from hfprune.atomic import write_atomically

MODEL_FOLDER, REPORT_JSON, REPORT_MD, PICTURE = "model", "report.json", "report.md", "pruning.png"
SETTLE_SHIFT_NOTE = (
    0.1  # a settling layer-lasso gate that moved a layer's output by more than this gets a note in report.md
)


def write_results(output_dir: Path, report: dict, headline: str) -> None:
    """Both reports, each written beside its final name and renamed into place, then the picture."""
    from hfprune.cli.plot import plot_pruning

    output_dir.mkdir(parents=True, exist_ok=True)
    json_text, markdown = json.dumps(report, indent=2) + "\n", _markdown(report)
    write_atomically(output_dir / REPORT_JSON, lambda path: path.write_text(json_text, encoding="utf-8"))
    write_atomically(output_dir / REPORT_MD, lambda path: path.write_text(markdown, encoding="utf-8"))
    pairs, compared = _comparison(report, headline)
    plot_pruning(
        report["structure"],
        output_dir / PICTURE,
        pairs,
        title=f"{Path(report['recipe']).name}: {report['task']}",
        compared=compared,
    )


def _comparison(report: dict, headline: str) -> tuple[dict[str, tuple[float, float]] | None, tuple[str, str]]:
    """The picture's pairs and what they compare: the dense baseline (when run) or the full-size pruned model,
    against the compacted one; latency is the full-size architecture's either way. None when there is nothing
    to compare."""
    scores, metric = report["scores"], report["metric"]
    after = scores["compacted"] or scores["pruned"]
    if scores["baseline"]:
        before, compared = scores["baseline"], ("dense", "pruned")
    elif scores["compacted"]:
        before, compared = scores["pruned"], ("full size", "compacted")
    else:
        return None, ("", "")
    pairs = {metric: (before[headline], after[headline])}
    for row in report["latency"]:
        pairs[f"latency ms, batch {row['batch']}"] = (row["full_size_ms"], row["compacted_ms"])
    return pairs, compared


def summary(report: dict, headline: str) -> str:
    """The line printed at the end: the headline score (``headline`` is its key in the scores), size and
    speed-up."""
    scores, metric = report["scores"], report["metric"]
    final = scores["compacted"] or scores["pruned"]
    text = f"done in {report['seconds']:.0f} s: {metric} {final[headline]:.3f}"
    if scores["baseline"]:
        text += f" (dense {scores['baseline'][headline]:.3f})"
    parameters = report["parameters"]
    if parameters["compacted"]:
        text += f", {parameters['full_size'] / parameters['compacted']:.2f}x fewer parameters"
    if report["latency"]:
        text += ", " + ", ".join(
            f"{row['speedup']:.2f}x faster at batch {row['batch']}" for row in report["latency"]
        )
    return text


def _markdown(report: dict) -> str:
    """report.md: the run, the scores, size and speed, what was pruned, how to load the model."""
    scores, parameters = report["scores"], report["parameters"]
    score_keys = list(scores["pruned"])
    rows = [
        ("dense (no pruning)", scores["baseline"]),
        ("pruned, full size", scores["pruned"]),
        ("compacted", scores["compacted"]),
    ]
    score_table = "\n".join(
        f"| {label} | " + " | ".join(f"{values[k]:.3f}" for k in score_keys) + " |"
        for label, values in rows
        if values
    )
    size_lines = [
        _size_row("parameters", parameters["full_size"], parameters["compacted"]),
        _size_row(
            "parameters in the layer stacks", parameters["layers_full_size"], parameters["layers_compacted"]
        ),
    ]
    size_lines += [
        f"| ms per batch of {row['batch']} x {row['sequence']} tokens | {row['full_size_ms']:.1f} | "
        f"{row['compacted_ms']:.1f} | {row['speedup']:.2f}x |"
        for row in report["latency"]
    ]
    entries = "\n".join(
        f"| {label} | {value:.1%} |" for label, value in report["sparsity"]["entries"].items()
    )
    sparsity = (
        (
            f"{report['sparsity']['global']:.1%} of the {parameters['targeted']:,} weights the recipe "
            "targets are zero.\n\n"
            f"| recipe entry | zero weights |\n|---|---:|\n{entries}\n"
        )
        if entries
        else ""
    )
    compaction = (
        "The model was compacted; its outputs were checked against the pruned full-size model's."
        if report["compaction"] == "ok"
        else f"Nothing was compacted: {report['compaction']}"
    )
    metrics = "\n".join(f"- `{name}`: {value:g}" for name, value in report["strategy_metrics"].items())
    shifts = [
        value
        for name, value in report["strategy_metrics"].items()
        if name.startswith("settle_shift/") and value > SETTLE_SHIFT_NOTE
    ]
    if shifts:
        metrics += (
            "\n\nlayer-lasso's gates had not reached 0 or 1 by themselves when its schedule ended: "
            "settling them moved a "
            f"layer's output by up to {max(shifts):.0%} (warnings in the log). A longer selection window or "
            "a higher "
            f"`gate_lr` lets the gates settle during training."
        )
    return f"""# hfprune {report.get("command", "run")}

- model: `{report["model"]}`
- recipe: `{report["recipe"]}`
{_how_it_ran(report)}

## Test set

| model | {" | ".join(score_keys)} |
|---|{"---:|" * len(score_keys)}
{score_table}

## Size and speed (this machine, CPU, timed alternately)

| | full size | compacted | ratio |
|---|---:|---:|---:|
{chr(10).join(size_lines)}

## What was pruned

![what was pruned](pruning.png)

{_layer_table(report["structure"])}
{sparsity}
{compaction}

Strategy metrics at the end:

{metrics or "(none)"}

## Loading the model

`model/` holds the model and its tokenizer; load it with `{report["loader"]}("model")`.
"""


def _how_it_ran(report: dict) -> str:
    """The lines on the data and the work: training (``hfprune run``) or calibration (``hfprune prune``)."""
    if report.get("command") == "prune":
        return (
            f"- task: {report['task']}; {report['calibration_examples']} calibration and "
            f"{report['test_examples']} test examples\n"
            f"- no training: pruned from the calibration examples in {report['pruning_seconds']:.0f} s; "
            f"{report['seconds']:.0f} s in all"
        )
    return (
        f"- task: {report['task']}; {report['train_examples']} training and {report['test_examples']} test "
        "examples\n"
        f"- training: {report['steps']} optimizer steps, {report['epochs']} epochs; "
        f"{report['seconds']:.0f} s in all\n"
        f"- distillation: {('from ' + report['teacher']) if report['teacher'] else 'none'}"
    )


def _size_row(label: str, full_size: int, compacted: int | None) -> str:
    if not compacted:
        return f"| {label} | {full_size:,} | - | - |"
    return f"| {label} | {full_size:,} | {compacted:,} | {full_size / compacted:.2f}x |"


def _layer_table(structure: dict) -> str:
    """Per layer of the trained full-size model: deleted or kept, live heads and neurons, zero weights."""

    def groups(value: dict | None) -> str:
        return (
            "-"
            if value is None
            else f"{value['live']} of {value['of']}"
            if value["of"]
            else str(value["live"])
        )

    lines = []
    for stack in structure["stacks"]:
        lines += [
            f"`{stack['name']}`:",
            "",
            "| layer | | heads | neurons | zero weights |",
            "|---:|---|---:|---:|---:|",
        ]
        lines += [
            f"| {layer['index']} | {'kept' if layer['kept'] else 'deleted'} | {groups(layer['heads'])} | "
            f"{groups(layer['neurons'])} | "
            f"{layer['sparsity']:.1%} |"
            for layer in stack["layers"]
        ]
        lines.append("")
    return "\n".join(lines)
