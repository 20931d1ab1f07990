"""The tasks ``hfprune run`` fine-tunes for: data, model head, collator and score for each.

The task is ``data.task`` when the recipe or ``--task`` names one, else inferred
(:mod:`hfprune.cli.columns`): a label column of word-tag lists is token classification
(entity F1 through seqeval), a label column of single values sequence classification
(accuracy, and macro F1 as the headline when the classes are unbalanced), images with labels
image classification (scored the same way), and text without labels for a causal language
model is language modelling (perplexity on held-out blocks).
Scores go through ``evaluate`` with the metric modules packaged in :mod:`hfprune.cli.metrics`,
which load offline.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter

import torch

from hfprune.cli.columns import Columns, find_columns, infer_task, label_classes, named_split
from hfprune.cli.metrics import load_metric
from hfprune.cli.model_sources import load_pretrained
from hfprune.data import split_indices, wnut
from hfprune.data.sources import load_source
from hfprune.errors import HfpruneError
from hfprune.recipe.run_sections import DataSection

BUILTIN_DESCRIPTIONS = {
    "wnut": "named-entity recognition on WNUT-16 tweets",
    "polarity": "sentiment of movie-review sentences (polarity)",
    "austen": "language modelling on Jane Austen's novels",
}
UNBALANCED = 1.5  # a largest class this many times the smallest makes macro F1 the headline, not accuracy


class Task(ABC):
    """One dataset, split with a fixed seed, tokenized (or its images processed), with the head and score that
    suit it."""

    kind: str  # one of hfprune.recipe.run_sections.TASKS
    metric: str  # the headline score's name, e.g. "entity F1"
    headline: str  # its key in evaluate()'s dict
    auto_class: str  # the transformers Auto class for the head
    labels: list[str]

    def __init__(self, data: DataSection, dataset, processor, seed: int, columns: Columns):
        """``dataset`` is the source's ``DatasetDict``; ``processor`` the model's tokenizer (its image
        processor, for images); ``columns`` the ones this task reads."""
        self.data, self.processor, self.columns = data, processor, columns
        train, test = _split(data, dataset, seed)
        # From every split: class ids do not depend on the split or the limits.
        self.labels, self.label_values = self.label_classes(dataset)
        self.train_examples = train.select(range(min(len(train), data.train_limit or len(train))))
        self.test_examples = test.select(range(min(len(test), data.test_limit or len(test))))
        self.train_set, self.test_set = self.encode(self.train_examples), self.encode(self.test_examples)

    @property
    def description(self) -> str:
        """One line for people: the built-in set's name, or the task and the data's source."""
        return (
            BUILTIN_DESCRIPTIONS.get(self.data.dataset)
            or f"{self.kind.replace('-', ' ')} on {self.data.dataset}"
        )

    def model(self, path, fine_tuned: bool = False):
        """The pretrained model at ``path`` (a folder, or a packaged GGUF model) with a new head for this
        task's labels (named in the config).

        ``fine_tuned``: a model already trained on this task, loaded with its own head, which
        must predict this task's labels.
        """
        fresh_head = not fine_tuned and self.labels
        labels = (
            {
                "num_labels": len(self.labels),
                "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)},
                # A checkpoint with a head of another size (an ImageNet ViT's 1,000 classes) gets a new one.
                "ignore_mismatched_sizes": True,
            }
            if fresh_head
            else {}
        )
        model = load_pretrained(path, self.auto_class, **labels)
        # A checkpoint saved with a head for another task (a sentence classifier read as a tagger) would load
        # with that head's weights in the wrong role; a bare encoder has none, and the label count decides.
        heads = [name for name in getattr(model.config, "architectures", None) or [] if "For" in name]
        if fine_tuned and heads and type(model).__name__ not in heads:
            raise HfpruneError(
                f"{path} was saved as {heads[0]}, and {self.description} needs a "
                f"{type(model).__name__}: is this the model fine-tuned for this data? (--task sets the task)"
            )
        if fine_tuned and self.labels and model.config.num_labels != len(self.labels):
            raise HfpruneError(
                f"{path} predicts {model.config.num_labels} labels; {self.description} has {len(self.labels)}"
            )
        # A decoder classifier reads the last token that is not padding: it must know which that is.
        pad = getattr(self.processor, "pad_token_id", None)  # an image processor has none
        if pad is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = pad
        return model

    def evaluate(self, model, arguments) -> dict[str, float]:
        """Scores of ``model`` on the test split (the headline among them), rounded to 4 places."""
        from transformers import Trainer

        output = Trainer(model=model, args=arguments, data_collator=self.collator()).predict(self.test_set)
        return self.score(output)

    def label_classes(self, dataset) -> tuple[list[str], list]:
        """(name, stored value) of each class id: the column's class names, else its values sorted."""
        return label_classes(dataset, self.columns.label)

    @abstractmethod
    def encode(self, examples):
        """Tokenized examples with ``labels``, as the Trainer's datasets."""

    @abstractmethod
    def collator(self):
        """Pads a batch of encoded examples."""

    def score(self, predict_output) -> dict[str, float]:
        """Scores of ``Trainer.predict`` output on the test split; a task that scores without predictions
        (language modelling: the loss) overrides :meth:`evaluate` instead."""
        raise NotImplementedError(f"{type(self).__name__} scores in evaluate()")


class TokenClassificationTask(Task):
    """Tags per word; each word's tag sits on its first sub-token, and the score is per entity (seqeval)."""

    kind, metric, headline, auto_class = (
        "token-classification",
        "entity F1",
        "f1",
        "AutoModelForTokenClassification",
    )

    def encode(self, examples):
        if not self.processor.is_fast:
            raise HfpruneError(
                "entity labels are aligned through word ids, which only a fast tokenizer reports; "
                "give a model folder with tokenizer.json"
            )
        label_to_id = {label: i for i, label in enumerate(self.labels)}
        return wnut.tokenize_and_align(
            self._pairs(examples), self.processor, label_to_id, self.data.max_length
        )

    def collator(self):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(self.processor)

    def score(self, predict_output):
        return score_entities(
            predict_output, self.test_set, self._pairs(self.test_examples), dict(enumerate(self.labels))
        )

    def _pairs(self, examples) -> list[tuple[list[str], list[str]]]:
        """(words, tag names) per example, as the aligner and seqeval read them."""
        name = dict(zip(self.label_values, self.labels))
        return [
            (words, [name[tag] for tag in tags])
            for words, tags in zip(examples[self.columns.text], examples[self.columns.label])
        ]


class SequenceClassificationTask(Task):
    """One label per text or text pair; accuracy, with macro F1 beside it (the headline) when unbalanced."""

    kind, auto_class = "sequence-classification", "AutoModelForSequenceClassification"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        per_value = Counter(self.train_examples[self.columns.label])  # read raw: encoding images takes long
        counts = [per_value[value] for value in self.label_values]
        self.unbalanced = max(counts) > UNBALANCED * min(counts)
        self.metric, self.headline = ("macro F1", "f1") if self.unbalanced else ("accuracy", "accuracy")

    def encode(self, examples):
        text, pair, label = self.columns.text, self.columns.text_pair, self.columns.label
        label_id = {value: i for i, value in enumerate(self.label_values)}

        def tokenize(batch):
            encoded = self.processor(
                batch[text], batch[pair] if pair else None, truncation=True, max_length=self.data.max_length
            )
            return encoded | {"labels": [label_id[value] for value in batch[label]]}

        return examples.map(tokenize, batched=True, remove_columns=examples.column_names, desc="tokenizing")

    def collator(self):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.processor)

    def score(self, predict_output):
        predictions, references = predict_output.predictions.argmax(-1), predict_output.label_ids
        scores = {"accuracy": load_metric("accuracy").compute(predictions=predictions, references=references)}
        if self.unbalanced:
            scores["f1"] = load_metric("f1").compute(predictions=predictions, references=references)
        return {name: round(result[name], 4) for name, result in scores.items()}


class ImageClassificationTask(SequenceClassificationTask):
    """One label per image (a folder of images, one subfolder per class); scored as sequence classification.

    Images are processed when the Trainer reads them (:class:`ProcessedImages`), not stored
    processed: 224 x 224 pixel values take 600 kB an image.
    """

    kind, auto_class = "image-classification", "AutoModelForImageClassification"

    def encode(self, examples):
        label_id = {value: i for i, value in enumerate(self.label_values)}
        return ProcessedImages(examples, self.processor, self.columns.image, self.columns.label, label_id)

    def collator(self):
        from transformers import default_data_collator

        return default_data_collator


class ProcessedImages(torch.utils.data.Dataset):
    """``examples`` with each image turned into the model's ``pixel_values`` by its image processor when
    read."""

    def __init__(self, examples, processor, image: str, label: str, label_id: dict):
        self.examples, self.processor, self.label_id = examples, processor, label_id
        self.image, self.label = image, label

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        row = self.examples[index]
        pixels = self.processor(images=row[self.image].convert("RGB"), return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels[0], "labels": self.label_id[row[self.label]]}


class CausalLanguageModellingTask(Task):
    """Next-token prediction on blocks of ``max_length`` tokens cut from the concatenated text.

    Perplexity is exp of the mean loss over the held-out blocks. ``evaluate``'s perplexity
    module loads its own model by name, so it cannot score the model in memory.
    """

    kind, metric, headline, auto_class = "causal-lm", "perplexity", "perplexity", "AutoModelForCausalLM"

    def label_classes(self, dataset) -> tuple[list[str], list]:
        return [], []

    def encode(self, examples):
        block, text = self.data.max_length, self.columns.text

        def blocks(batch):
            ids = [token for row in self.processor(batch[text])["input_ids"] for token in row]
            chunks = [ids[start : start + block] for start in range(0, len(ids) - block + 1, block)]
            return {"input_ids": chunks, "labels": [list(chunk) for chunk in chunks]}

        encoded = examples.map(
            blocks, batched=True, remove_columns=examples.column_names, desc="cutting blocks"
        )
        if len(encoded) == 0:
            raise HfpruneError(
                f"data {self.data.dataset}: column {text!r} holds fewer than max_length={block} tokens in a "
                "split; lower max_length or give more text"
            )
        return encoded

    def collator(self):
        from transformers import default_data_collator

        return default_data_collator

    def evaluate(self, model, arguments):
        from transformers import Trainer

        trainer = Trainer(model=model, args=arguments, data_collator=self.collator())
        loss = trainer.evaluate(self.test_set)["eval_loss"]
        return {"perplexity": round(math.exp(loss), 4), "loss": round(loss, 4)}


TASK_CLASSES: dict[str, type[Task]] = {
    task.kind: task
    for task in (
        TokenClassificationTask,
        SequenceClassificationTask,
        ImageClassificationTask,
        CausalLanguageModellingTask,
    )
}


def load_task(data: DataSection, processor, model_config, seed: int, dataset=None) -> Task:
    """The task ``data`` describes, on ``dataset`` (default: read from ``data.dataset``) for this model.

    ``model_config`` (the pretrained model's config) tells a language model's text from a
    classifier's when the data has no labels; ``processor`` is its tokenizer (a tokenizer
    without a padding token pads with its end-of-text token) or, for images, its image processor.
    """
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None and data.max_length > positions:
        raise HfpruneError(
            f"data {data.dataset}: max_length {data.max_length} is longer than the model reads "
            f"({positions} positions); give --max-length {positions} or less"
        )
    from transformers import ImageProcessingMixin

    dataset = load_source(data.dataset) if dataset is None else dataset
    kind = data.task or infer_task(data, dataset, model_config)
    columns = find_columns(data, dataset, kind)
    if kind == "image-classification" and not isinstance(processor, ImageProcessingMixin):
        raise HfpruneError(
            f"data {data.dataset} holds images, and the model folder has no image processor "
            "(preprocessor_config.json): give a vision model saved with its image processor"
        )
    if getattr(processor, "pad_token", "") is None and processor.eos_token is not None:
        processor.pad_token = processor.eos_token
    return TASK_CLASSES[kind](data, dataset, processor, seed, columns)


def score_entities(output, test_set, test_examples, id_to_label: dict[int, str]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval) of ``Trainer.predict`` output, scored per word against
    the gold tags."""
    predicted = test_set.word_tags(output.predictions.argmax(-1), id_to_label)
    result = load_metric("seqeval").compute(
        predictions=predicted, references=[tags for _, tags in test_examples]
    )
    return {key: round(result[key], 4) for key in ("f1", "precision", "recall")}


def _split(data: DataSection, dataset, seed: int):
    """(train, test) ``Dataset``s: the named or found test split, else a seeded share of the training split.

    The share is :func:`hfprune.data.split_indices`' shuffle, so a built-in set splits as it
    always has and reported scores stay comparable.
    """
    train = dataset[data.train_split]  # find_columns has checked it is there
    test_name = data.test_split or next((name for name in ("test", "validation") if name in dataset), None)
    if test_name is not None:
        test = named_split(data, dataset, test_name)
    else:
        train_rows, test_rows = split_indices(len(train), data.test_fraction, seed)
        train, test = train.select(train_rows), train.select(test_rows)
    for name, part in (("training", train), ("test", test)):
        if len(part) == 0:
            raise HfpruneError(f"data {data.dataset}: the {name} split is empty")
    return train, test
