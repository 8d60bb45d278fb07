"""The generation family: answer the same requests with every model and baseline, compare with real cells.

For one task and dataset: a seeded subset of the test rows; each row is one request (its own held-out
instruction) for cells of its label, at most ``max_generated_per_label`` cells per label. Every model answers
the requests, every selected baseline is given the same labels and counts, and all cell sets are scored
against the real test cells in one PCA + UMAP embedding fitted on the real cells (MMD, ΔsKNN, pKNN per K and
averaged). Figures: the UMAP of every cell set and a marker-gene dot plot of real vs the first model's cells.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import datasets

from datasets_builder.dataset_folder import cap_rows
from instructcell.tasks import Task

from .baselines import GenerationCells
from .candidates import generate_for_requests
from .cells import sparse_cells
from .context import Evaluation, timed
from .markers import dotplot_stats, rank_marker_genes
from .metrics.generation import DEFAULT_KS, compare_generators
from .plotting import plot_marker_dotplot, plot_umap
from .render import fmt

__all__ = ["GENERATION_KEYS", "evaluate_generation", "requested_counts", "select_requests"]

logger = logging.getLogger(__name__)

#: The headline metrics (None for a generator with fewer than 2 cells).
GENERATION_KEYS: tuple[str, ...] = ("mmd", "delta_sknn", "pknn", "pknn_k10")


def select_requests(
    test_rows: datasets.Dataset, max_generated_per_label: int = 200, generated_per_request: int = 1
) -> datasets.Dataset:
    """Keep the test rows (requests) that fit ``max_generated_per_label`` cells per label.

    Each row is one request for ``generated_per_request`` cells of its label; the first
    ``max_generated_per_label // generated_per_request`` rows of every label are kept, in their order.
    """
    if generated_per_request < 1 or max_generated_per_label < 1:
        raise ValueError("generated_per_request and max_generated_per_label must be at least 1.")
    max_requests = max(1, max_generated_per_label // generated_per_request)
    seen: Counter = Counter()
    keep = []
    for i, label in enumerate(test_rows["label"]):
        if seen[label] < max_requests:
            seen[label] += 1
            keep.append(i)
    return test_rows.select(keep)


def requested_counts(labels: Sequence[str], generated_per_request: int = 1) -> dict[str, int]:
    """Count the cells requested per label (sorted) when each request asks for ``generated_per_request``."""
    counts = Counter(labels)
    return {label: counts[label] * generated_per_request for label in sorted(counts)}


def evaluate_generation(ev: Evaluation, task: Task, dataset: str) -> tuple[dict[str, Any], datasets.Dataset]:
    """Score every model and selected baseline on one dataset of a generation task.

    Parameters
    ----------
    ev : Evaluation
    task : Task
        A task of the ``generation`` family.
    dataset : str

    Returns
    -------
    entry : dict
        ``n_test`` (real cells), ``n_train``, ``n_requests``, ``requested`` (label -> cells), ``markers``
        (label -> genes) and ``methods``: generator -> ``mmd``, ``delta_sknn``, ``pknn``, ``pknn_k10``, the
        per-K values, ``n_cells``, ``seconds`` (models: ``signal_rate``; baselines: ``details``).
    rows : Dataset
        The test rows whose target cells are the real cells.
    """
    settings = ev.settings
    n_genes = len(ev.genes)
    rows = cap_rows(ev.test.get(task.name, dataset, ev.variant), settings.max_test_cells, settings.seed)
    requests = select_requests(rows, settings.max_generated_per_label, settings.generated_per_request)
    requested = requested_counts(requests["label"], settings.generated_per_request)
    train_rows = ev.train.get(task.name, dataset, ev.variant)
    generated: dict[str, tuple[Any, list[str]]] = {}
    extras: dict[str, dict[str, Any]] = {}
    for candidate in ev.models:
        answered, seconds = timed(
            generate_for_requests,
            candidate.model,
            candidate.processor,
            ev.model_rows(candidate, task, dataset, requests),
            generated_per_request=settings.generated_per_request,
            seed=settings.seed,
            batch_size=max(1, settings.batch_size // 2),
            max_new_tokens=settings.request_max_new_tokens,
            progress=settings.progress,
            desc=f"{task.name} {dataset} {candidate.name}",
        )
        generated[candidate.name] = (answered.counts, answered.labels)
        extras[candidate.name] = {
            "signal_rate": answered.n_signal / len(requests),
            "seconds": round(seconds, 2),
        }
        if ev.wants_request(task):
            ev.requests.append({"task": task.name, "dataset": dataset, **_request(answered.example)})
    baselines = ev.baselines(task)
    if baselines:
        cells = GenerationCells(
            sparse_cells(train_rows, "target", n_genes), list(train_rows["label"]), requested, ev.genes
        )
        for baseline in baselines:
            generated[baseline.name], extras[baseline.name] = ev.run_baseline(baseline, cells)
    real = sparse_cells(rows, "target", n_genes)
    scores, coords = compare_generators(real, rows["label"], generated, ev.embedding_factory(), DEFAULT_KS)
    methods = {
        name: {
            **(scores[name] or dict.fromkeys(GENERATION_KEYS)),
            "n_cells": 0 if counts is None else int(counts.shape[0]),
            **extras[name],
        }
        for name, (counts, _) in generated.items()
    }
    markers = rank_marker_genes(
        real, rows["label"], ev.genes, settings.markers_per_label, settings.marker_method
    )
    entry = {
        "n_test": len(rows),
        "n_train": len(train_rows),
        "n_requests": len(requests),
        "requested": requested,
        "markers": markers,
        "methods": methods,
    }
    _figures(ev, task, dataset, real, list(rows["label"]), generated, coords, markers)
    logger.info(
        "%s %s (%d requests): %s",
        task.name,
        dataset,
        len(requests),
        ", ".join(f"{name} MMD {fmt(values['mmd'])}" for name, values in methods.items()),
    )
    return entry, rows


def _request(example: dict[str, Any]) -> dict[str, str]:
    """Build the requests-section entry of a model's first generation request."""
    detail = f"{example['n_cells']} cell(s) of the requested label {example['label']!r}"
    if example["mean_total_counts"] is None:
        detail += " (no <SIGNAL>: no cells)"
    else:
        detail += f", total counts {example['mean_total_counts']:.0f}"
    return {"instruction": example["instruction"], "answer": example["answer"], "detail": detail}


def _figures(
    ev: Evaluation,
    task: Task,
    dataset: str,
    real: Any,
    real_labels: list[str],
    generated: dict[str, tuple[Any, list[str]]],
    coords: dict[str, Any],
    markers: dict[str, list[str]],
) -> None:
    """Plot the UMAP of every cell set and the marker-gene dot plot (real vs the first model's cells)."""
    prefix = f"{task.name.upper()} {dataset}"
    panels = {"real test cells": (coords["real"], real_labels)}
    panels.update(
        {ev.methods[name]["title"]: (coords[name], labels) for name, (_, labels) in generated.items()}
    )
    plot_umap(
        ev.report.figure(f"{prefix} UMAP", f"umap_{task.name}_{dataset}"),
        f"{prefix}: real vs generated cells, coloured by label",
        panels,
    )
    if not markers:
        return
    model_cells, model_labels = generated[ev.models[0].name] if ev.models else (None, [])
    stats = dotplot_stats(real, real_labels, model_cells, model_labels, markers, ev.genes)
    title = (
        f"{prefix}: marker genes, real vs generated cells\n(top {ev.settings.markers_per_label} per "
        f"label, ranked on the real test cells with {ev.settings.marker_method})"
    )
    plot_marker_dotplot(
        ev.report.figure(f"{prefix} marker genes", f"markers_{task.name}_{dataset}"), stats, title
    )
