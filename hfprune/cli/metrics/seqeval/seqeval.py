"""Entity-level precision, recall and F1 of IOB2 tag sequences (seqeval), as an ``evaluate`` metric.

``evaluate.load("seqeval")`` fetches its script from the Hub; this module is loaded from the
installed package instead, so scoring works offline. Imports stay one per line: evaluate's
import scanner misreads ``import a, b``.
"""

import datasets
import evaluate
from seqeval.metrics import f1_score, precision_score, recall_score


class Seqeval(evaluate.Metric):
    """Scores whole entities: a prediction counts only when its span and type both match."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Entity-level precision, recall and F1 (seqeval, default CoNLL evaluation).",
            citation="Nakayama, seqeval: a Python framework for sequence labeling evaluation (2018).",
            inputs_description="predictions, references: lists of tag sequences such as ['B-person', "
            "'I-person', 'O'].",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references):
        return {
            "f1": float(f1_score(references, predictions, zero_division=0)),
            "precision": float(precision_score(references, predictions, zero_division=0)),
            "recall": float(recall_score(references, predictions, zero_division=0)),
        }
