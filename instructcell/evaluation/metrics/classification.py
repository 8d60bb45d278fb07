"""Cell type annotation / drug sensitivity metrics with "unanswered" predictions.

A prediction is *unanswered* when it is ``None`` or blank, or (when a label set is given) when it is not
one of the labels. Accuracy is over all samples (unanswered = wrong); F1 scores are over the answered
samples only; ``answered_rate`` says how many those are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score

__all__ = ["cell_classification_metrics"]


def _is_answered(prediction: str | None, label_set: set[str] | None) -> bool:
    if prediction is None:
        return False
    if not isinstance(prediction, str):
        raise ValueError(
            f"Predictions must be strings or None, got {type(prediction).__name__}: {prediction!r}."
        )
    if label_set is not None:
        return prediction.strip() in label_set
    return prediction.strip() != ""


def cell_classification_metrics(
    predictions: Sequence[str | None],
    references: Sequence[str],
    labels: Sequence[str] | None = None,
) -> dict[str, float]:
    """Accuracy (unanswered = wrong), macro / weighted F1 over answered samples, answered rate.

    Parameters
    ----------
    predictions : sequence of str or None
        Predicted labels. ``None`` or a blank string means unanswered. Surrounding whitespace is ignored.
        For free-text chat outputs, map them first with
        ``modeling_instructcell.answer_extraction.extract_label``.
    references : sequence of str
        True labels, same length.
    labels : sequence of str, optional
        The label set. When given, every reference must be in it, and a prediction outside it counts as
        unanswered (an invalid answer) rather than as a wrong label.

    Returns
    -------
    dict of str to float
        ``accuracy``: correct / all samples. ``macro_f1`` and ``weighted_f1``: scikit-learn's
        ``f1_score`` on the answered samples (classes = labels seen among their references and
        predictions, ``zero_division=0``); 0.0 when nothing was answered. ``answered_rate``:
        answered / all samples.

    Examples
    --------
    >>> cell_classification_metrics(["A", None, "B", "A"], ["A", "A", "B", "B"])["accuracy"]
    0.5
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions for {len(references)} references; pass one prediction per "
            "reference (None or '' for an unanswered one)."
        )
    if len(references) == 0:
        raise ValueError("No samples: pass at least one prediction/reference pair.")
    if any(r is None or not isinstance(r, str) or not r.strip() for r in references):
        raise ValueError("Every reference must be a non-empty string label.")
    refs = np.array([r.strip() for r in references], dtype=object)
    label_set = None
    if labels is not None:
        label_set = {str(label).strip() for label in labels}
        unknown = sorted(set(refs) - label_set)
        if unknown:
            raise ValueError(f"References {unknown} are not in `labels`; add them to the label set.")
    answered = np.array([_is_answered(p, label_set) for p in predictions], dtype=bool)
    stripped = [p.strip() if a else "" for p, a in zip(predictions, answered, strict=True)]
    preds = np.array(stripped, dtype=object)

    correct = answered & (preds == refs)
    out = {
        "accuracy": float(correct.mean()),
        "macro_f1": 0.0,
        "weighted_f1": 0.0,
        "answered_rate": float(answered.mean()),
    }
    if answered.any():
        y_true, y_pred = refs[answered].astype(str), preds[answered].astype(str)
        out["macro_f1"] = float(f1_score(y_true, y_pred, average="macro", zero_division=0))
        out["weighted_f1"] = float(f1_score(y_true, y_pred, average="weighted", zero_division=0))
    return out
