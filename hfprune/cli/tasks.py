"""The tasks ``hfprune run`` fine-tunes on: data, model head, collator and score for each.

``wnut``: named entities in WNUT-16 tweets (token classification, entity-level F1).
``polarity``: movie-review sentences (sequence classification, accuracy). Scores go through
``evaluate`` with the metric modules packaged in :mod:`hfprune.cli.metrics`, which load offline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from hfprune.cli.metrics import load_metric
from hfprune.data import split, wnut
from hfprune.errors import HfpruneError
from hfprune.recipe.run_sections import DataSection


class Task(ABC):
    """One dataset, split with a fixed seed, tokenized, with the head and score that suit it."""

    description: str  # one line for people
    metric: str  # the headline score's name, e.g. "entity F1"
    headline: str  # its key in score()'s dict
    auto_class: str  # the transformers Auto class for the head
    labels: list[str]

    def __init__(self, data: DataSection, tokenizer, seed: int, examples: list | None = None):
        """``examples`` replaces what :meth:`read` would return (the same dataset from another file)."""
        self.data, self.tokenizer = data, tokenizer
        examples = self.read() if examples is None else examples
        train, test = split(examples, data.test_fraction, seed)
        self.train_examples, self.test_examples = train[: data.train_limit], test[: data.test_limit]
        self.labels = self.label_names(examples)  # from all examples: ids do not depend on the limits
        self.train_set, self.test_set = self.encode(self.train_examples), self.encode(self.test_examples)

    def model(self, path: str, fine_tuned: bool = False):
        """The pretrained model at ``path`` with a new head for this task's labels (named in the config).

        ``fine_tuned``: a model already trained on this task, loaded with its own head, which
        must predict this task's labels.
        """
        import transformers

        labels = (
            {}
            if fine_tuned
            else {
                "num_labels": len(self.labels),
                "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)},
            }
        )
        try:
            model = getattr(transformers, self.auto_class).from_pretrained(path, **labels)
        except (OSError, ValueError) as exc:
            raise HfpruneError(
                f"cannot load a model for {self.description} from {path}: {str(exc).splitlines()[0]}"
            ) from None
        if fine_tuned and model.config.num_labels != len(self.labels):
            raise HfpruneError(
                f"{path} predicts {model.config.num_labels} labels; {self.description} has {len(self.labels)}"
            )
        return model

    @abstractmethod
    def read(self) -> list:
        """Every example of the dataset, in file order."""

    @abstractmethod
    def label_names(self, examples: list) -> list[str]:
        """The label of each class id."""

    @abstractmethod
    def encode(self, examples: list):
        """Tokenized examples with ``labels``, as the Trainer's datasets."""

    @abstractmethod
    def collator(self):
        """Pads a batch of encoded examples."""

    @abstractmethod
    def score(self, predict_output) -> dict[str, float]:
        """Scores of ``Trainer.predict`` output on the test split (the headline among them), rounded to 4
        places."""


class EntityTask(Task):
    description = "named-entity recognition on WNUT-16 tweets"
    metric, headline, auto_class = "entity F1", "f1", "AutoModelForTokenClassification"

    def read(self):
        return wnut.read_wnut()

    def label_names(self, examples):
        return wnut.label_list(examples)

    def encode(self, examples):
        if not self.tokenizer.is_fast:
            raise HfpruneError(
                "entity labels are aligned through word ids, which only a fast tokenizer reports; "
                "give a model folder with tokenizer.json"
            )
        label_to_id = {label: i for i, label in enumerate(self.labels)}
        return wnut.tokenize_and_align(examples, self.tokenizer, label_to_id, self.data.max_length)

    def collator(self):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(self.tokenizer)

    def score(self, predict_output):
        return score_entities(predict_output, self.test_set, self.test_examples, dict(enumerate(self.labels)))


class PolarityTask(Task):
    description = "sentiment of movie-review sentences (polarity)"
    metric, headline, auto_class = "accuracy", "accuracy", "AutoModelForSequenceClassification"

    def read(self):
        from hfprune.data.polarity import read_polarity

        return read_polarity()

    def label_names(self, examples):
        return ["negative", "positive"]

    def encode(self, examples):
        return [
            {**self.tokenizer(text, truncation=True, max_length=self.data.max_length), "labels": label}
            for text, label in examples
        ]

    def collator(self):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def score(self, predict_output):
        result = load_metric("accuracy").compute(
            predictions=predict_output.predictions.argmax(-1), references=predict_output.label_ids
        )
        return {"accuracy": round(result["accuracy"], 4)}


TASK_OF_DATASET: dict[str, type[Task]] = {"wnut": EntityTask, "polarity": PolarityTask}


def load_task(data: DataSection, tokenizer, seed: int, examples: list | None = None) -> Task:
    return TASK_OF_DATASET[data.dataset](data, tokenizer, seed, examples)


def score_entities(output, test_set, test_examples, id_to_label: dict[int, str]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval) of ``Trainer.predict`` output, scored per word against
    the gold tags."""
    predicted = test_set.word_tags(output.predictions.argmax(-1), id_to_label)
    result = load_metric("seqeval").compute(
        predictions=predicted, references=[tags for _, tags in test_examples]
    )
    return {key: round(result[key], 4) for key in ("f1", "precision", "recall")}
