"""Accuracy of class predictions, as an ``evaluate`` metric that loads offline from the package."""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    """The fraction of predictions equal to their reference label."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy: correct predictions over all predictions.",
            citation="",
            inputs_description="predictions, references: lists of integer class ids.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references) if references else 0.0}
