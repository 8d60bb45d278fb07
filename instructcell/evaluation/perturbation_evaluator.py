"""The perturbation family: perturbed cells predicted from control cells, compared per cell type.

For one task and dataset: a seeded subset of the test rows that pair a control cell (input) with a perturbed
cell (target); the rows mapping a control cell onto itself are left out. Every model answers each row with one
cell (its own held-out instruction, its control cell in the prompt) and every selected baseline predicts from
the same control cells. Cells are grouped by (perturbation, cell type); per group, the predictions are scored
against the real perturbed cells with :func:`~.metrics.perturbation.perturbation_metrics`, the DEGs ranked on
the real perturbed vs the rows' control cells. A method's scores are the means over the groups. Figure: the
predicted vs real mean expression of every group's top DEGs.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import numpy as np

from datasets_builder.dataset_folder import cap_rows
from instructcell.tasks import CONTROL_PERTURBATION, Task

from .baselines import PerturbationCells
from .candidates import generate_for_requests
from .cells import sparse_cells
from .context import Evaluation, timed
from .metrics.generation import normalize_log1p
from .metrics.perturbation import PERTURBATION_KEYS, perturbation_metrics, top_degs
from .plotting import plot_perturbation_means
from .render import fmt

__all__ = ["evaluate_perturbation", "perturbed_rows"]

logger = logging.getLogger(__name__)
MIN_CELLS = 2  # per group: fewer real perturbed or control cells cannot rank DEGs


def perturbed_rows(rows: datasets.Dataset) -> datasets.Dataset:
    """Keep the rows that pair a control with a perturbed cell (drop the control rows)."""
    return rows.filter(lambda p: p != CONTROL_PERTURBATION, input_columns=["perturbation"])


def _groups(rows: datasets.Dataset) -> dict[tuple[str, str], np.ndarray]:
    """Row indices per (perturbation, cell type) with enough cells to score, in sorted order."""
    keys = list(zip(rows["perturbation"], rows["label"], strict=True))
    groups = {key: np.flatnonzero([k == key for k in keys]) for key in sorted(set(keys))}
    return {key: index for key, index in groups.items() if index.size >= MIN_CELLS}


def evaluate_perturbation(
    ev: Evaluation, task: Task, dataset: str
) -> tuple[dict[str, Any], datasets.Dataset]:
    """Score every model and selected baseline on one dataset of a perturbation task.

    Parameters
    ----------
    ev : Evaluation
    task : Task
        A task of the ``perturbation`` family.
    dataset : str

    Returns
    -------
    entry : dict
        ``n_test`` (rows), ``n_train``, ``groups`` (``"<perturbation> / <cell type>"`` -> ``n_test``,
        ``top_degs`` and ``methods`` -> metrics) and ``methods``: method -> the means over groups of
        :data:`~.metrics.perturbation.PERTURBATION_KEYS`, ``n_groups``, ``seconds`` (models: ``signal_rate``;
        baselines: ``details``).
    rows : Dataset
        The scored test rows.
    """
    settings = ev.settings
    n_genes = len(ev.genes)
    rows = cap_rows(
        perturbed_rows(ev.test.get(task.name, dataset, ev.variant)), settings.max_test_cells, settings.seed
    )
    train_rows = perturbed_rows(ev.train.get(task.name, dataset, ev.variant))
    predictions: dict[str, tuple[Any, np.ndarray]] = {}  # method -> (log-normalized cells, their rows)
    extras: dict[str, dict[str, Any]] = {}
    for candidate in ev.models:
        answered, seconds = timed(
            generate_for_requests,
            candidate.model,
            candidate.processor,
            ev.model_rows(candidate, task, dataset, rows),
            seed=settings.seed,
            batch_size=max(1, settings.batch_size // 2),
            max_new_tokens=settings.request_max_new_tokens,
            progress=settings.progress,
            desc=f"{task.name} {dataset} {candidate.name}",
        )
        cells = normalize_log1p(answered.counts) if answered.counts.shape[0] else None
        predictions[candidate.name] = (cells, np.asarray(answered.requests, dtype=int))
        extras[candidate.name] = {"signal_rate": answered.n_signal / len(rows), "seconds": round(seconds, 2)}
    baselines = ev.baselines(task)
    if baselines:
        cells = PerturbationCells.from_rows(train_rows, rows, ev.genes)
        for baseline in baselines:
            predicted, extras[baseline.name] = ev.run_baseline(baseline, cells)
            predictions[baseline.name] = (predicted, np.arange(len(rows)))
    real = normalize_log1p(sparse_cells(rows, "target", n_genes))
    controls = normalize_log1p(sparse_cells(rows, "input", n_genes))
    groups, panels = {}, {}
    for (perturbation, cell_type), index in _groups(rows).items():
        degs = top_degs(real[index], controls[index])
        name = f"{perturbation} / {cell_type}"
        scores, means = {}, {"real": _gene_means(real[index], degs)}
        for method, (predicted, answered) in predictions.items():
            mine = np.flatnonzero(np.isin(answered, index))
            if predicted is None or mine.size < MIN_CELLS:
                scores[method] = dict.fromkeys(PERTURBATION_KEYS)
                continue
            scores[method] = perturbation_metrics(
                predicted[mine], real[index], controls[index], degs, seed=settings.seed
            )
            title = ev.methods[method]["title"]
            means[f"{title} (R² {fmt(scores[method]['r2_top_degs'], 2)})"] = _gene_means(
                predicted[mine], degs
            )
        groups[name] = {
            "n_test": int(index.size),
            "top_degs": [ev.genes[i] for i in degs[:10]],
            "methods": scores,
        }
        panels[name] = means
    methods = {
        method: {**_mean_over_groups(groups, method), "n_groups": len(groups), **extras[method]}
        for method in predictions
    }
    entry = {
        "n_test": len(rows),
        "n_train": len(train_rows),
        "groups": groups,
        "methods": methods,
    }
    if panels:
        plot_perturbation_means(
            ev.report.figure(f"PRP {dataset} top DEGs", f"degs_{task.name}_{dataset}"),
            f"{dataset}: predicted vs real mean expression of the top DEGs (test split)",
            panels,
        )
    logger.info(
        "%s %s (%d rows, %d groups): %s",
        task.name,
        dataset,
        len(rows),
        len(groups),
        ", ".join(f"{m} R² top DEGs {fmt(v['r2_top_degs'])}" for m, v in methods.items()),
    )
    return entry, rows


def _gene_means(values: Any, genes: np.ndarray) -> list[float]:
    return np.asarray(values[:, genes].mean(axis=0)).ravel().tolist()


def _mean_over_groups(groups: dict[str, Any], method: str) -> dict[str, float | None]:
    means = {}
    for key in PERTURBATION_KEYS:
        values = [g["methods"][method][key] for g in groups.values() if g["methods"][method][key] is not None]
        means[key] = float(np.mean(values)) if values else None
    return means
