"""Pruning state survives checkpoints: an interrupted run resumes to the same weights and masks."""

from __future__ import annotations

import pytest
import torch

from hfprune import PruneCallback, StateError
from hfprune.state import STATE_FILE

from conftest import BERT_FFN_RECIPE, StopAt, make_trainer, tiny_bert

STEPS = 12  # the ramp ends at 0.5 of the run (step 6); checkpoints every 4 steps


def run(output_dir, *extra_callbacks, resume=None, prune_callback=None):
    model = tiny_bert()
    callback = prune_callback or PruneCallback(BERT_FFN_RECIPE)
    trainer = make_trainer(
        output_dir, model, [callback, *extra_callbacks], max_steps=STEPS, save_strategy="steps", save_steps=4
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, callback


def masks_of(callback):
    return callback.pruner.strategies[0].masks.masks


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run(tmp_path_factory.mktemp("full"))


def test_interrupted_run_resumes_to_the_same_weights_and_masks(tmp_path, uninterrupted):
    full_model, full_callback = uninterrupted
    _, interrupted = run(tmp_path, StopAt(6))
    assert interrupted.pruner.step == 6
    assert (tmp_path / "checkpoint-4" / STATE_FILE).is_file() and not (tmp_path / "checkpoint-8").exists()

    resumed_model, resumed = run(tmp_path, resume=True)
    assert resumed.pruner.step == STEPS
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(masks_of(full_callback), masks_of(resumed)))


def test_resume_from_a_checkpoint_in_another_folder_needs_resume_from(tmp_path, uninterrupted):
    source = tmp_path / "first"
    run(source, StopAt(4))
    with pytest.raises(StateError, match="no hfprune_state.safetensors was found"):
        run(tmp_path / "second", resume=str(source / "checkpoint-4"))
    model, callback = run(
        tmp_path / "third",
        resume=str(source / "checkpoint-4"),
        prune_callback=PruneCallback(BERT_FFN_RECIPE, resume_from=source / "checkpoint-4"),
    )
    assert all(torch.equal(a, b) for a, b in zip(masks_of(uninterrupted[1]), masks_of(callback)))


def test_state_from_another_run_is_refused(tmp_path):
    run(tmp_path / "a", StopAt(4))
    run(tmp_path / "b", StopAt(8))
    # Checkpoint b/checkpoint-4 holds weights; give it the pruning state of a different run at the same step.
    other = tmp_path / "a" / "checkpoint-4" / STATE_FILE
    target = tmp_path / "b" / "checkpoint-4" / STATE_FILE
    target.write_bytes(other.read_bytes())
    torch.manual_seed(1)
    with pytest.raises(StateError, match="different recipe|belongs to another checkpoint"):
        run(
            tmp_path / "b",
            resume=str(tmp_path / "b" / "checkpoint-4"),
            prune_callback=PruneCallback(BERT_FFN_RECIPE.replace("0.75", "0.7")),
        )
