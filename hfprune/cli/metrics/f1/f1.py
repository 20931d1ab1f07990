"""Macro-averaged F1 of class predictions, as an ``evaluate`` metric that loads offline from the package.

``evaluate``'s own f1 module calls scikit-learn, which hfprune does not otherwise need; the
macro average of per-class F1 is a few lines of counting.
"""

import datasets
import evaluate


class F1(evaluate.Metric):
    """The mean over classes of each class's F1 (classes absent from both lists are left out)."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Macro F1: the unweighted mean of per-class F1, so a rare class counts as much as a "
            "common one.",
            citation="",
            inputs_description="predictions, references: lists of integer class ids.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        scores = []
        for label in set(predictions) | set(references):
            true_positive = sum(1 for p, r in zip(predictions, references) if p == r == label)
            predicted, actual = predictions.count(label), references.count(label)
            scores.append(2 * true_positive / (predicted + actual))
        return {"f1": sum(scores) / len(scores) if scores else 0.0}
