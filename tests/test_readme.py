"""The README's two setup commands stay true: CI runs the README's test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    block = re.search(
        r"## Setup: two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S
    ).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_two_commands_the_main_job_and_the_tests():
    run, test = setup_commands()
    assert run.endswith("hfprune run") and "torch==2.13.0" in run
    assert "pytest" in test and "torch==2.13.0" in test


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = setup_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


def python_block(path: Path, section: str) -> str:
    """The first ```python block under the markdown heading ``section`` (any level) of the file at
    ``path``."""
    text = path.read_text()
    found = re.search(rf"^#+ {re.escape(section)}\n.*?```python\n(.*?)```", text, re.S | re.M)
    assert found, f"{path.relative_to(ROOT)} has no python block under a heading {section!r}"
    return found.group(1)


def test_the_trainer_example_runs_as_written(tmp_path, monkeypatch):
    """The README's Trainer example, verbatim but for the model folder, on a tiny BERT: it trains, prunes and
    compacts."""
    import hfprune

    from conftest import TokenDataset, tiny_bert

    model_dir = tmp_path / "my-bert"
    tiny_bert().save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)  # "out" and "small" land here
    code = python_block(ROOT / "README.md", "With your Trainer")
    assert '"my-bert"' in code and 'PruneCallback("block-lasso")' in code
    namespace = {"train": TokenDataset(size=64)}
    exec(compile(code, "README.md", "exec"), namespace)
    small = hfprune.load_compacted(tmp_path / "small")
    full = sum(p.numel() for p in namespace["model"].parameters())
    assert sum(p.numel() for p in small.parameters()) < full
    assert (
        small.config.hfprune_layout
    )  # half the heads of a BERT: per-block sizes, as the example's comment says


def test_the_peft_example_runs_as_written(tmp_path):
    """docs/peft.md's LoRA example on a tiny BERT: the merged model keeps the pruned zeros, and compacts."""
    from transformers import TrainingArguments

    from conftest import TokenDataset, tiny_bert

    code = python_block(ROOT / "docs" / "peft.md", "Prune the base while LoRA trains")
    # A small learning rate: the built-in lam, made for MiniLM, would shrink all of a tiny model's frozen
    # weights to zero.
    args = TrainingArguments(
        str(tmp_path / "out"),
        max_steps=20,
        per_device_train_batch_size=8,
        learning_rate=1e-5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    namespace = {"base": tiny_bert(), "args": args, "train": TokenDataset(size=64)}
    exec(compile(code, "docs/peft.md", "exec"), namespace)
    merged, small = namespace["merged"], namespace["small"]
    assert type(merged).__name__ == "BertForSequenceClassification"
    query = merged.bert.encoder.layer[0].attention.self.query.weight
    assert (query == 0).all(
        dim=1
    ).sum() == 16  # half of the rows: one of two heads, still exactly zero after the merge
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in merged.parameters())
