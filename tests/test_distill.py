"""Distillation: the loss the student's forward pass returns is the formula's, for each kind of head."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, BertForTokenClassification

from hfprune import PruneCallback, PruneOptimizer, Pruner, RecipeError
from hfprune.distill import DistillationConfig, Distiller, logit_kl, match_layers
from hfprune.model_hooks import strip_model_hooks

from conftest import BERT_FFN_RECIPE, VOCAB, StopAt, make_trainer, tiny_bert, tiny_gpt2


def distilled(student, teacher, **config) -> Distiller:
    distiller = Distiller(teacher, DistillationConfig(**config))
    distiller.attach(student)
    return distiller


def batch(size: int = 4, length: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (size, length), generator=generator)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """One distribution pair: sum_c p_t(c) * log(p_t(c) / p_s(c)), times T squared."""
    p_t = torch.softmax(teacher / temperature, -1)
    p_s = torch.softmax(student / temperature, -1)
    return temperature**2 * (p_t * (p_t / p_s).log()).sum(-1)


def test_logit_kl_is_the_temperature_scaled_kl_averaged_over_marked_positions():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [3.0, -2.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [-1.0, -1.0, 4.0]])
    per_row = [kl_by_hand(s, t, 2.0) for s, t in zip(student, teacher)]
    assert logit_kl(student, teacher, 2.0).item() == pytest.approx(sum(per_row).item() / 3, rel=1e-6)
    mask = torch.tensor([1, 0, 1])
    assert logit_kl(student, teacher, 2.0, mask).item() == pytest.approx(
        (per_row[0] + per_row[2]).item() / 2, rel=1e-6
    )


def test_sequence_classification_loss_is_the_formula():
    student, teacher = tiny_bert(seed=0).train(), tiny_bert(seed=1).eval()
    inputs = batch() | {"labels": torch.tensor([0, 1, 1, 0])}
    torch.manual_seed(0)
    plain = student(**inputs)
    with torch.no_grad():
        teacher_logits = teacher(**batch()).logits
    distilled(student, teacher, temperature=3.0, logit_weight=0.7)
    output = student(**inputs)

    kl = torch.stack([kl_by_hand(s, t, 3.0) for s, t in zip(plain.logits, teacher_logits)]).mean()
    expected = 0.3 * F.cross_entropy(plain.logits, inputs["labels"]) + 0.7 * kl
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.logits, plain.logits)  # the student's predictions are its own
    assert output.loss.requires_grad and not any(p.grad is not None for p in teacher.parameters())


def test_a_teacher_with_the_students_own_weights_gives_zero_kl():
    student = tiny_bert().train()
    distiller = distilled(student, copy.deepcopy(student), logit_weight=0.5)
    inputs = batch() | {"labels": torch.tensor([0, 1, 1, 0])}
    output = student(**inputs)
    assert distiller.last.logits.item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(output.loss, 0.5 * distiller.last.task)


def test_eval_mode_and_no_grad_leave_the_output_alone():
    student, teacher = tiny_bert(seed=0), tiny_bert(seed=1)
    distilled(student, teacher, logit_weight=1.0)
    inputs = batch() | {"labels": torch.tensor([0, 1, 1, 0])}
    student.eval()
    task = F.cross_entropy(student(**batch()).logits, inputs["labels"])
    torch.testing.assert_close(student(**inputs).loss, task)
    student.train()
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).loss, task)


def test_token_classification_averages_over_real_tokens_including_unlabelled_ones():
    config = tiny_bert().config  # the shared tiny BERT's sizes, with a token-classification head of 5
    config.num_labels = 5
    torch.manual_seed(0)
    student = BertForTokenClassification(config).train()
    torch.manual_seed(1)
    teacher = BertForTokenClassification(config)
    inputs = batch()
    labels = torch.full(inputs["input_ids"].shape, -100)
    labels[:, 1] = 2  # one labelled token per row: the KL still covers every real token
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
    distiller = distilled(student, teacher, temperature=2.0, logit_weight=1.0)
    output = student(**inputs, labels=labels)
    real = inputs["attention_mask"].bool()
    expected = kl_by_hand(s[real], t[real], 2.0).mean()
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    assert distiller.last.task is not None  # the task loss was there, weighted 0


def test_causal_lm_compares_the_shifted_positions():
    student, teacher = tiny_gpt2(seed=0).train(), tiny_gpt2(seed=1)
    inputs = batch(length=8)
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
    distilled(student, teacher, temperature=1.0, logit_weight=1.0)
    output = student(**inputs, labels=inputs["input_ids"])
    real = inputs["attention_mask"][:, 1:].bool()  # position t predicts token t + 1, which must be real
    expected = kl_by_hand(s[:, :-1][real], t[:, :-1][real], 1.0).mean()
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)


def test_left_padding_leaves_out_positions_that_read_a_pad_token():
    student, teacher = tiny_gpt2(seed=0).train(), tiny_gpt2(seed=1)
    inputs = batch(length=8)
    inputs["attention_mask"][2, :3] = 0  # left padding: tokens 0-2 of row 2 are pads
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
    distilled(student, teacher, temperature=1.0, logit_weight=1.0)
    output = student(**inputs, labels=inputs["input_ids"])
    mask = inputs["attention_mask"].bool()
    real = mask[:, :-1] & mask[:, 1:]  # the token read and the token predicted are both real
    assert not real[2, 2] and mask[2, 3]  # position 2 reads a pad and predicts the first real token
    expected = kl_by_hand(s[:, :-1][real], t[:, :-1][real], 1.0).mean()
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)


def test_a_classifier_ignores_the_accumulated_batch_count_and_so_does_its_distillation():
    """BERT's heads average each micro-batch and ignore ``num_items_in_batch``; weighting the distillation
    terms by a share of it would shrink them against the task loss under accumulation."""
    student, teacher = tiny_bert(seed=0).train(), tiny_bert(seed=1)
    distilled(student, teacher, logit_weight=0.6)
    inputs = batch() | {"labels": torch.tensor([0, 1, 1, 0])}
    alone = student(**inputs).loss
    torch.testing.assert_close(student(**inputs, num_items_in_batch=torch.tensor(16)).loss, alone)


def test_a_forward_pass_without_labels_warns_once_that_nothing_may_be_distilled(caplog):
    student, teacher = tiny_bert(seed=0).train(), tiny_bert(seed=1)
    distiller = distilled(student, teacher, logit_weight=0.6)
    with caplog.at_level("WARNING", logger="hfprune.distill"):
        output = student(**batch())
        student(**batch())
    assert [r.message for r in caplog.records if "got no labels" in r.message] and len(caplog.records) == 1
    torch.testing.assert_close(output.loss, 0.6 * distiller.last.logits)  # the distillation term alone


def test_micro_batches_weighted_by_their_share_add_up_to_the_whole_batch():
    """Under gradient accumulation the Trainer passes ``num_items_in_batch`` and expects a loss normalized by
    it (as a
    causal LM's is); the distillation terms then follow the same contract, so micro-batches add up to the
    whole."""
    student, teacher = tiny_gpt2(seed=0).train(), tiny_gpt2(seed=1)
    distilled(student, teacher, logit_weight=0.6)
    inputs = batch(size=6, length=8)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    items = int(inputs["labels"][:, 1:].ne(-100).sum())
    whole = student(**inputs, num_items_in_batch=items).loss
    first, second = ({k: v[:2] for k, v in inputs.items()}, {k: v[2:] for k, v in inputs.items()})
    parts = student(**first, num_items_in_batch=items).loss + student(**second, num_items_in_batch=items).loss
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


def test_hidden_states_are_matched_past_a_deleted_layer():
    """The teacher's layer 2 is the identity (gated off); the student is the teacher without it. Dynamic
    matching pairs
    each teacher layer with the student layer computing the same thing, so the hidden term is exactly 0; a
    fixed map
    pairs the wrong layers."""
    teacher = tiny_bert(layers=4).train()
    teacher.bert.encoder.layer[1].register_forward_hook(lambda module, args, output: args[0])
    student = copy.deepcopy(teacher)
    del student.bert.encoder.layer[1]
    student.config.num_hidden_layers = 3
    inputs = batch() | {"labels": torch.tensor([0, 1, 1, 0])}
    with torch.no_grad():
        s, t = (
            student(**batch(), output_hidden_states=True),
            teacher.eval()(**batch(), output_hidden_states=True),
        )
    assert match_layers(s.hidden_states, t.hidden_states, [1, 2, 3, 4], batch()["attention_mask"]) == [
        1,
        1,
        2,
        3,
    ]

    dynamic = distilled(student, teacher, logit_weight=0.0, hidden_weight=1.0)
    student(**inputs)
    assert dynamic.last.hidden.item() == pytest.approx(0.0, abs=1e-10)
    dynamic.close()
    fixed = distilled(student, teacher, logit_weight=0.0, hidden_weight=1.0, layers=[1, 2, 3], match="fixed")
    student(**inputs)
    assert (
        fixed.last.hidden.item() > 1e-5
    )  # random tiny layers change the hidden states little, but not nothing


def test_the_hidden_term_trains_the_student_toward_the_teacher():
    student, teacher = tiny_bert(seed=0).train(), tiny_bert(seed=1)
    distiller = distilled(student, teacher, logit_weight=0.0, hidden_weight=1.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    inputs = batch() | {"labels": torch.tensor([0, 1, 1, 0])}
    losses = []
    for _ in range(20):
        student(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(distiller.last.hidden.item())
    assert losses[-1] < 0.5 * losses[0] and all(math.isfinite(v) for v in losses)


def test_closing_takes_the_hooks_off():
    student = tiny_bert().train()
    distiller = distilled(student, tiny_bert(seed=1), logit_weight=1.0, hidden_weight=1.0)
    assert student._forward_hooks and student._forward_pre_hooks
    distiller.close()
    assert not student._forward_hooks and not student._forward_pre_hooks


@pytest.mark.parametrize("layers", [[0, 1], [2, 1], [1, 1]])
def test_layers_count_from_one_and_increase(layers):
    with pytest.raises(ValueError, match="counted from 1"):
        DistillationConfig(layers=layers)


# --- through the engine: recipe section, Trainer callback, optimizer wrapper, resume
# ------------------------------

DISTILLED_RECIPE = BERT_FFN_RECIPE + "distillation: {temperature: 2.0, logit_weight: 0.8}\n"


def test_the_trainer_callback_trains_on_the_mixed_loss_and_saves_no_teacher(tmp_path):
    teacher = tiny_bert(seed=1)
    before = {name: p.clone() for name, p in teacher.state_dict().items()}
    callback = PruneCallback(DISTILLED_RECIPE, teacher=teacher)
    trainer = make_trainer(
        tmp_path, tiny_bert(), [callback], save_strategy="steps", save_steps=6, logging_steps=1
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "distill_kl" in entry and "loss" in entry]
    assert logged and all(entry["distill_kl"] > 0 for entry in logged)
    for entry in logged:  # what the Trainer trained on (logged every step) is the mix, term by term
        mixed = 0.2 * entry["distill_task"] + 0.8 * entry["distill_kl"]
        assert entry["loss"] == pytest.approx(mixed, rel=2e-3, abs=2e-4)
    assert all(
        torch.equal(before[name], p) for name, p in teacher.state_dict().items()
    )  # the teacher never trains
    assert not teacher.training
    saved = load_file(tmp_path / "checkpoint-6" / "model.safetensors")
    assert len(saved) == len(tiny_bert().state_dict())  # the student's weights only
    assert not trainer.model._forward_hooks  # the teacher leaves with training


def test_compactions_copy_drops_the_teachers_hook():
    student = tiny_bert()
    distilled(student, tiny_bert(seed=1))
    copied = copy.deepcopy(student)
    assert strip_model_hooks(copied) == 1 and not copied._forward_hooks


@pytest.mark.parametrize(
    "setting, message",
    [({"label_smoothing_factor": 0.1}, "label_smoothing_factor"), ({}, None)],
)
def test_label_smoothing_which_bypasses_the_models_loss_is_refused(tmp_path, setting, message):
    from hfprune import HfpruneError

    callback = PruneCallback(DISTILLED_RECIPE, teacher=tiny_bert(seed=1))
    trainer = make_trainer(tmp_path, tiny_bert(), [callback], max_steps=1, **setting)
    if message is None:
        trainer.train()
    else:
        with pytest.raises(HfpruneError, match=message):
            trainer.train()


def test_a_recipe_names_its_teacher_by_folder(tmp_path):
    tiny_bert(seed=1).save_pretrained(tmp_path / "teacher")
    text = BERT_FFN_RECIPE + f"distillation: {{teacher: {tmp_path / 'teacher'}, logit_weight: 1.0}}\n"
    pruner = Pruner(text)
    student = tiny_bert().train()
    pruner.attach(student)
    pruner.start(12)
    student(**batch(), labels=torch.tensor([0, 1, 1, 0]))
    assert pruner.metrics()["distill_kl"] > 0


def test_a_teacher_that_cannot_teach_the_student_is_refused_before_training(tmp_path):
    config = tiny_bert().config
    config.num_labels = 3
    BertForSequenceClassification(config).save_pretrained(tmp_path / "three-labels")
    text = BERT_FFN_RECIPE + f"distillation:\n  teacher: {tmp_path / 'three-labels'}\n"
    with pytest.raises(
        RecipeError,
        match=r"distillation.teacher: the teacher cannot teach this model: .*3 labels, the student 2",
    ) as caught:
        Pruner(text).attach(tiny_bert())
    assert caught.value.line == BERT_FFN_RECIPE.count("\n") + 2
    with pytest.raises(RecipeError, match="vocabulary has 101 tokens, the student's 100"):
        bigger = tiny_bert().config
        bigger.vocab_size = 101
        Pruner(BERT_FFN_RECIPE, teacher=BertForSequenceClassification(bigger)).attach(tiny_bert())
    with pytest.raises(RecipeError, match="cannot load a BertForSequenceClassification teacher from"):
        Pruner(BERT_FFN_RECIPE + f"distillation: {{teacher: {tmp_path / 'missing'}}}\n").attach(tiny_bert())
    with pytest.raises(RecipeError, match="distillation needs a teacher"):
        Pruner(DISTILLED_RECIPE).attach(tiny_bert())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_labels": 1}, "compares class distributions, and the student is a regression model"),
        ({"problem_type": "multi_label_classification"}, "multi_label_classification model"),
        ({"id2label": {0: "neg", 1: "pos"}}, r"teacher's labels are \['pos', 'neg'\].*same order"),
    ],
)
def test_heads_whose_logits_are_not_the_same_class_distribution_are_refused(change, message):
    config = tiny_bert().config
    for key, value in change.items():
        setattr(config, key, value)
    student = BertForSequenceClassification(config)
    teacher = copy.deepcopy(student)
    if "id2label" in change:
        teacher.config.id2label = {0: "pos", 1: "neg"}  # the same classes, the other order
    with pytest.raises(RecipeError, match=message):
        Pruner(BERT_FFN_RECIPE, teacher=teacher).attach(student)


def test_the_optimizer_wrapper_loop_distills_too():
    student, teacher = tiny_bert(), tiny_bert(seed=1)
    pruner = Pruner(BERT_FFN_RECIPE, teacher=teacher)
    pruner.attach(student)
    pruner.start(12)
    optimizer = PruneOptimizer(torch.optim.AdamW(student.parameters(), lr=1e-3), pruner)
    student.train()
    for _ in range(3):
        loss = student(**batch(), labels=torch.tensor([0, 1, 1, 0])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert pruner.distiller.last.logits is not None
    pruner.close()
    assert not student._forward_hooks


def test_an_interrupted_run_with_a_teacher_resumes_exactly(tmp_path):
    def run(output_dir, *extra, resume=None):
        model = tiny_bert()
        callback = PruneCallback(DISTILLED_RECIPE, teacher=tiny_bert(seed=1))
        trainer = make_trainer(
            output_dir, model, [callback, *extra], max_steps=12, save_strategy="steps", save_steps=4
        )
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "cut", StopAt(6))
    resumed = run(tmp_path / "cut", resume=True)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
