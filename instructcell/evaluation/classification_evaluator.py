"""The classification family: label the same test cells with every model and baseline, score, plot.

For one task and dataset: a seeded subset of the test rows; each model predicts a label per cell with each of
its methods, each selected baseline is fitted on the training cells and labels the same cells; accuracy,
macro-F1, weighted-F1 and the answered rate of every method, and a confusion matrix per method in one figure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch

from datasets_builder.dataset_folder import cap_rows
from instructcell.tasks import Task

from .baselines import ClassificationCells
from .candidates import greedy_answer, model_predictions
from .context import Evaluation, timed
from .metrics.classification import cell_classification_metrics
from .plotting import plot_confusion
from .render import method_title

__all__ = ["classification_entry", "classification_scores", "evaluate_classification"]

logger = logging.getLogger(__name__)


def classification_scores(predictions: Sequence[str | None], rows: datasets.Dataset) -> dict[str, float]:
    """Accuracy (unanswered = wrong), macro/weighted F1 over answered rows and the answered rate.

    Parameters
    ----------
    predictions : sequence of str or None
        ``(n_rows,)`` predicted labels.
    rows : Dataset
        The ``n_rows`` builder rows (``label``; the label set is the first row's ``choices``).
    """
    return cell_classification_metrics(
        list(predictions), list(rows["label"]), labels=sorted(rows[0]["choices"])
    )


def classification_entry(
    references: Sequence[str],
    labels: Sequence[str],
    predictions: Mapping[str, Sequence[str | None]],
    extras: Mapping[str, Mapping[str, Any]],
    n_train: int,
) -> dict[str, Any]:
    """Build the ``scores`` entry of one classification dataset.

    Parameters
    ----------
    references : sequence of str
        ``(n_test,)`` true labels.
    labels : sequence of str
        The label set; predictions outside it are unanswered.
    predictions : mapping of str to sequence
        Method -> ``(n_test,)`` predicted labels (None = unanswered), models first.
    extras : mapping of str to mapping
        Method -> values stored beside its scores (``seconds``, ``method``, ``details``).
    n_train : int
        Training cells the baselines were fitted on.

    Returns
    -------
    dict
        ``n_test``, ``n_train``, ``labels`` (sorted) and ``methods``: method -> ``accuracy``, ``macro_f1``,
        ``weighted_f1``, ``answered_rate`` and its extras.
    """
    methods = {
        name: {
            **cell_classification_metrics(list(preds), list(references), labels=list(labels)),
            **extras[name],
        }
        for name, preds in predictions.items()
    }
    return {"n_test": len(references), "n_train": n_train, "labels": sorted(labels), "methods": methods}


def evaluate_classification(
    ev: Evaluation, task: Task, dataset: str
) -> tuple[dict[str, Any], datasets.Dataset]:
    """Score every model and selected baseline on one dataset of a classification task.

    Parameters
    ----------
    ev : Evaluation
    task : Task
        A task of the ``classification`` family.
    dataset : str

    Returns
    -------
    entry : dict
        :func:`classification_entry`.
    rows : Dataset
        The test rows scored (in the evaluation's variant), for the per-model sections.
    """
    settings = ev.settings
    rows = cap_rows(ev.test.get(task.name, dataset, ev.variant), settings.max_test_cells, settings.seed)
    train_rows = ev.train.get(task.name, dataset, ev.variant)
    predictions: dict[str, list[str | None]] = {}
    extras: dict[str, dict[str, Any]] = {}
    for candidate in ev.models:
        model_rows = ev.model_rows(candidate, task, dataset, rows)
        for method in candidate.methods:
            torch.manual_seed(settings.seed)
            key = candidate.key(method)
            predictions[key], seconds = timed(
                model_predictions,
                candidate.model,
                candidate.processor,
                model_rows,
                method=method,
                batch_size=settings.batch_size,
                max_new_tokens=settings.max_new_tokens,
                answers=ev.answers(candidate, method, model_rows),
                progress=settings.progress,
                desc=f"{task.name} {dataset} {key}",
            )
            extras[key] = {"method": method, "seconds": round(seconds, 2)}
        if ev.wants_request(task):
            first = model_rows[0]
            answer = greedy_answer(candidate.model, candidate.processor, first, settings.max_new_tokens)
            scored = predictions[candidate.key(candidate.methods[0])][0]
            ev.requests.append(
                {
                    "task": task.name,
                    "dataset": dataset,
                    "instruction": first["instruction"],
                    "answer": answer,
                    "detail": f"{candidate.methods[0]}: {scored}; truth: {first['label']}",
                }
            )
    baselines = ev.baselines(task)
    if baselines:
        cells = ClassificationCells.from_rows(train_rows, rows, ev.genes)
        for baseline in baselines:
            predictions[baseline.name], extras[baseline.name] = ev.run_baseline(baseline, cells)
    label_set = list(rows[0]["choices"])
    entry = classification_entry(list(rows["label"]), label_set, predictions, extras, len(train_rows))
    figure = ev.report.figure(
        f"{task.name.upper()} {dataset} confusion matrix", f"confusion_{task.name}_{dataset}"
    )
    panels = {
        method_title(name, entry["methods"][name], ev.methods): preds for name, preds in predictions.items()
    }
    title = f"{task.name.upper()} {dataset} (test split, n={len(rows)})"
    plot_confusion(figure, title, list(rows["label"]), label_set, panels)
    logger.info(
        "%s %s (%d test cells): %s",
        task.name,
        dataset,
        len(rows),
        ", ".join(f"{name} accuracy {v['accuracy']:.3f}" for name, v in entry["methods"].items()),
    )
    return entry, rows
