"""The pruning metrics reach every logger of a stock Trainer, not only the callbacks after PruneCallback.

The Trainer lists the ``report_to`` integrations before the user's callbacks and calls ``on_log`` in
list order, so TensorBoard would write the logs before PruneCallback adds its metrics to them.
"""

from __future__ import annotations

import logging

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerCallback

from hfprune import PruneCallback

from conftest import BERT_FFN_RECIPE, make_trainer, tiny_bert, training_args


class LogRecorder(TrainerCallback):
    """A user's own logger: the training logs it was given, and how often its on_init_end ran."""

    def __init__(self):
        self.logs: list[dict] = []
        self.init_ends = 0

    def on_init_end(self, args, state, control, **kwargs):
        self.init_ends += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs.append(dict(logs))


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    """Every scalar TensorBoard wrote under ``folder``: tag -> step -> the last value at that step."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def train_with_tensorboard(tmp_path, monkeypatch, callback, add_after_init=False):
    """Six logged steps of a tiny BERT, reported to TensorBoard under ``tmp_path/tb``; the Trainer."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callbacks = [] if add_after_init else [callback]
    trainer = make_trainer(
        tmp_path / "out", tiny_bert(), callbacks, max_steps=6, logging_steps=1, report_to=["tensorboard"]
    )
    if add_after_init:
        trainer.add_callback(callback)
    trainer.train()
    return trainer


@pytest.mark.parametrize("add_after_init", [False, True], ids=["passed-to-trainer", "add-callback"])
def test_sparsity_reaches_tensorboard(tmp_path, monkeypatch, add_after_init):
    callback = PruneCallback(BERT_FFN_RECIPE)
    trainer = train_with_tensorboard(tmp_path, monkeypatch, callback, add_after_init)

    scalars = tensorboard_scalars(tmp_path / "tb")
    final = callback.pruner.metrics()
    assert final["sparsity"] > 0.5  # the recipe pruned: a logged 0 would not tell the steps apart
    training_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in training_logs] == [1, 2, 3, 4, 5, 6]
    for name in final:
        tag = f"train/{name}"
        assert tag in scalars, f"{tag} missing from TensorBoard's {sorted(scalars)}"
        for entry in training_logs:
            assert scalars[tag][entry["step"]] == pytest.approx(entry[name], rel=1e-6)
        assert scalars[tag][6] == pytest.approx(final[name], rel=1e-6)


def test_every_callback_sees_the_metrics_once(tmp_path, monkeypatch, capsys):
    """A user's logger listed before PruneCallback gets them too, every callback's on_init_end still runs
    once, and the progress printer prints them."""
    before, after = LogRecorder(), LogRecorder()
    callback = PruneCallback(BERT_FFN_RECIPE)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    trainer = make_trainer(
        tmp_path / "out",
        tiny_bert(),
        [before, callback, after],
        max_steps=6,
        logging_steps=1,
        report_to=["tensorboard"],
    )
    trainer.train()

    assert (before.init_ends, after.init_ends) == (1, 1)
    history = [entry["sparsity"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 6
    for recorder in (before, after):
        assert [logs.get("sparsity") for logs in recorder.logs] == history
    assert capsys.readouterr().out.count("'sparsity':") >= 6  # PrinterCallback (disable_tqdm=True)


def test_warns_once_when_no_handler_calls_it(tmp_path, caplog):
    """Called other than through a transformers CallbackHandler, the callback works and says, once, that
    loggers before it miss the metrics."""
    callback = PruneCallback(BERT_FFN_RECIPE)
    args = training_args(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hfprune.callback"):
        for _ in range(2):
            callback.on_init_end(args, None, None, model=tiny_bert())
    warnings = [r for r in caplog.records if "report_to integrations" in r.getMessage()]
    assert len(warnings) == 1
