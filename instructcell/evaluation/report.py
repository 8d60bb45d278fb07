"""Turn the demo's predictions and generated cells into ``metrics.json``, ``report.md`` and PNG figures.

Used by ``examples/demo.py`` (``make demo``); kept apart from the training code so that it can be tested on
tiny synthetic inputs. Everything is written into a temporary folder first and moved into place at the end,
so a failure leaves the previous results (or nothing), never a partial report.

``metrics.json`` has the shape::

    {"wall_seconds": s,
     "cta": {dataset: {"accuracy", "macro_f1", "weighted_f1", "logreg": {same keys}, ...}},
     "dsp": {dataset: {same as cta}},
     "cpcg": {dataset: {"mmd", "delta_sknn", "pknn", "pknn_k10", "reference": {same keys}, ...}}}

plus extra keys (``n``, ``answered_rate``, the greedy-decoding metrics under ``generate``, per-K values,
``targets``, ``run``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instructcell.evaluation.metrics.classification import cell_classification_metrics
from instructcell.evaluation.metrics.generation import DEFAULT_KS, ReferenceEmbedding, compare_generators

from .files import fmt, json_default, publish, safe_name, staging_dir
from .plotting import plot_confusion, plot_umap

__all__ = [
    "CLASSIFICATION_KEYS",
    "GENERATION_KEYS",
    "ClassificationResult",
    "GenerationResult",
    "Request",
    "check_targets",
    "classification_entry",
    "classification_table",
    "generation_entry",
    "generation_table",
    "write_demo_report",
]

CLASSIFICATION_KEYS = ("accuracy", "macro_f1", "weighted_f1")
GENERATION_KEYS = ("mmd", "delta_sknn", "pknn", "pknn_k10")
#: Issue 7's targets (reported, not enforced).
DSP_MIN_ACCURACY = 0.95
PKNN_K10_TOLERANCE = 0.10
MAX_DELTA_SKNN = 0.10
MMD_MARGIN = 0.10


@dataclass
class ClassificationResult:
    """Test-split predictions of one CTA or DSP dataset.

    ``predictions`` maps a method (``"score"``: label scoring, ``"generate"``: greedy answer) to one
    predicted label (or None) per test cell; the first method is the headline one. ``logreg`` holds the
    logistic-regression baseline's predictions on the same cells.
    """

    task: str
    dataset: str
    references: Sequence[str]
    label_set: Sequence[str]
    predictions: Mapping[str, Sequence[str | None]]
    logreg: Sequence[str]


@dataclass
class GenerationResult:
    """Cells of one CPCG dataset: real test cells, generated cells and the training-cell reference.

    Count matrices are ``(n_cells, n_genes)`` (dense or scipy sparse) over the same genes; labels give each
    cell's cell type (for generated cells: the requested one). ``reference`` holds real training cells of
    the requested labels, as many per label as were requested (= generated when every request produced
    cells): what a perfect generator would score.
    """

    dataset: str
    real: Any
    real_labels: Sequence[str]
    generated: Any
    generated_labels: Sequence[str]
    reference: Any
    reference_labels: Sequence[str]
    n_requests: int = 0
    n_answered_with_signal: int = 0


@dataclass
class Request:
    """One natural-language request answered by the model, shown in the report."""

    kind: str  # "annotate", "drug response", "generate"
    dataset: str
    instruction: str
    answer: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _rounded(values: Mapping[str, Any]) -> dict[str, Any]:
    """Plain floats (JSON) for numpy scalars."""
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in values.items()}


def classification_entry(result: ClassificationResult) -> dict[str, Any]:
    """``metrics.json`` entry of one CTA/DSP dataset: headline method, every method, and the baseline."""
    if not result.predictions:
        raise ValueError("ClassificationResult.predictions is empty; pass at least one method's predictions.")
    labels = list(result.label_set)
    references = list(result.references)
    per_method = {
        method: _rounded(cell_classification_metrics(list(preds), references, labels=labels))
        for method, preds in result.predictions.items()
    }
    headline = next(iter(per_method))
    entry: dict[str, Any] = {key: per_method[headline][key] for key in CLASSIFICATION_KEYS}
    entry["answered_rate"] = per_method[headline]["answered_rate"]
    entry["method"] = headline
    entry["n"] = len(references)
    entry["logreg"] = _rounded(cell_classification_metrics(list(result.logreg), references, labels=labels))
    for method, values in per_method.items():
        if method != headline:
            entry[method] = values
    return entry


def generation_entry(
    result: GenerationResult,
    embedding: Any | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``metrics.json`` entry of one CPCG dataset and the 2-D coordinates for its figure.

    The protocol of :func:`instructcell.evaluation.metrics.generation.cell_generation_metrics`: PCA + UMAP fitted
    on the real test cells; generated and reference cells are mapped into that embedding and scored
    against the real cells with the same kernel width.

    Parameters
    ----------
    result : GenerationResult
    embedding : object, optional
        An unfitted :class:`~instructcell.evaluation.metrics.generation.ReferenceEmbedding` (default) or any object
        with ``fit(counts)``, ``transform(counts)`` and ``real_embedding_``.
    ks : sequence of int
        Neighbourhood sizes; must contain 10 (``pknn_k10``).

    Returns
    -------
    entry : dict
        ``mmd``, ``delta_sknn``, ``pknn``, ``pknn_k10`` (None when fewer than 2 cells were generated),
        ``reference`` (same keys), ``n_generated``, ``n_real``, ``signal_rate``, per-K extras.
    coords : dict of str to numpy.ndarray
        ``real``, ``generated``, ``reference``: ``(n, 2)`` coordinates.
    """
    if 10 not in ks:
        raise ValueError(f"`ks` must contain 10 (pknn_k10 is reported), got {tuple(ks)}.")
    scores, coords = compare_generators(
        result.real,
        result.real_labels,
        {
            "reference": (result.reference, result.reference_labels),
            "generated": (result.generated, result.generated_labels),
        },
        embedding=embedding,
        ks=ks,
    )
    entry, reference = (
        _rounded(scores[name]) if scores[name] is not None else {key: None for key in GENERATION_KEYS}
        for name in ("generated", "reference")
    )
    entry["reference"] = reference
    entry["n_generated"] = 0 if result.generated is None else int(result.generated.shape[0])
    entry["n_real"] = int(coords["real"].shape[0])
    entry["n_requests"] = int(result.n_requests)
    entry["signal_rate"] = result.n_answered_with_signal / result.n_requests if result.n_requests else None
    return entry, coords


def check_targets(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Check issue 7's targets against the metrics.

    DSP accuracy >= 0.95; on each CPCG dataset pKNN(K=10) within ±0.10 of the reference, ΔsKNN <= 0.10 and
    MMD <= reference MMD + 0.10.

    Returns
    -------
    list of dict
        ``task``, ``dataset``, ``metric``, ``value``, ``target`` (text) and ``met`` (bool).
    """
    checks = []
    for dataset, entry in metrics.get("dsp", {}).items():
        value = entry["accuracy"]
        checks.append(
            {
                "task": "dsp",
                "dataset": dataset,
                "metric": "accuracy",
                "value": value,
                "target": f">= {DSP_MIN_ACCURACY}",
                "met": value >= DSP_MIN_ACCURACY,
            }
        )
    for dataset, entry in metrics.get("cpcg", {}).items():
        ref = entry["reference"]
        value, reference = entry["pknn_k10"], ref["pknn_k10"]
        met = (
            value is not None
            and reference is not None
            and abs(value - reference) <= PKNN_K10_TOLERANCE + 1e-9
        )
        checks.append(
            {
                "task": "cpcg",
                "dataset": dataset,
                "metric": "pknn_k10",
                "value": value,
                "target": f"reference {fmt(reference)} ± {PKNN_K10_TOLERANCE}",
                "met": met,
            }
        )
        value = entry["delta_sknn"]
        checks.append(
            {
                "task": "cpcg",
                "dataset": dataset,
                "metric": "delta_sknn",
                "value": value,
                "target": f"<= {MAX_DELTA_SKNN}",
                "met": value is not None and value <= MAX_DELTA_SKNN,
            }
        )
        value, reference = entry["mmd"], ref["mmd"]
        met = value is not None and reference is not None and value <= reference + MMD_MARGIN
        checks.append(
            {
                "task": "cpcg",
                "dataset": dataset,
                "metric": "mmd",
                "value": value,
                "target": f"<= reference {fmt(reference)} + {MMD_MARGIN}",
                "met": met,
            }
        )
    return checks


def _no_mark(task: str, dataset: str, metric: str) -> str:
    return ""


def classification_table(
    metrics: Mapping[str, Any], mark: Callable[[str, str, str], str] = _no_mark
) -> list[str]:
    """Markdown table of the CTA/DSP entries of ``metrics``: the model's headline method and the baseline.

    Parameters
    ----------
    metrics : dict
        ``{"cta": {dataset: entry}, "dsp": {...}}`` with entries from :func:`classification_entry`.
    mark : callable, optional
        ``mark(task, dataset, metric)`` returns text appended to a value (e.g. "(target met)").

    Returns
    -------
    list of str
        Table lines; a greedy-accuracy column appears when some entry also holds ``generate`` metrics
        beside a ``score`` headline.
    """
    entries = [(task, d, e) for task in ("cta", "dsp") for d, e in metrics.get(task, {}).items()]
    greedy_column = any("generate" in e and e.get("method") != "generate" for _, _, e in entries)
    header = "| task | dataset | n | method | accuracy | macro F1 | weighted F1 | answered |"
    if greedy_column:
        header += " greedy accuracy |"
    header += " logreg accuracy | logreg macro F1 | logreg weighted F1 |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for task, dataset, entry in entries:
        log = entry["logreg"]
        row = (
            f"| {task.upper()} | {dataset} | {entry.get('n', '')} | {entry.get('method', '')} "
            f"| {fmt(entry['accuracy'])}{mark(task, dataset, 'accuracy')} | {fmt(entry['macro_f1'])} "
            f"| {fmt(entry['weighted_f1'])} | {fmt(entry.get('answered_rate'))} |"
        )
        if greedy_column:
            row += f" {fmt(entry.get('generate', {}).get('accuracy'))} |"
        row += f" {fmt(log['accuracy'])} | {fmt(log['macro_f1'])} | {fmt(log['weighted_f1'])} |"
        lines.append(row)
    return lines


def generation_table(
    metrics: Mapping[str, Any], mark: Callable[[str, str, str], str] = _no_mark
) -> list[str]:
    """Markdown table of the CPCG entries of ``metrics`` (:func:`generation_entry`); reference in brackets."""
    lines = [
        "| dataset | generated / requests | answered `<SIGNAL>` | MMD (ref) | ΔsKNN (ref) | pKNN (ref) "
        "| pKNN K=10 (ref) |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, entry in metrics.get("cpcg", {}).items():
        ref = entry["reference"]
        cells = [f"{fmt(entry[k])}{mark('cpcg', dataset, k)} ({fmt(ref[k])})" for k in GENERATION_KEYS]
        lines.append(
            f"| {dataset} | {entry['n_generated']} / {entry['n_requests']} | {fmt(entry['signal_rate'])} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _report_markdown(
    metrics: Mapping[str, Any],
    requests: Sequence[Request],
    figures: Mapping[str, list[str]],
    checks: Sequence[Mapping[str, Any]],
) -> str:
    run = metrics.get("run", {})
    lines = ["# InstructCell demo", ""]
    lines.append(
        f"Wall time: **{metrics['wall_seconds']:.0f} s** ({metrics['wall_seconds'] / 60:.1f} min) "
        "for this run (dataset building, training, saving and evaluation)."
    )
    for key, label in (
        ("data_source", "Data"),
        ("model_dir", "Model (Hub layout)"),
        ("recipe", "Recipe"),
        ("training", "Training"),
        ("timings", "Timings (s)"),
        ("command", "Command"),
    ):
        if key in run:
            value = run[key]
            if isinstance(value, Mapping):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            lines.append(
                f"- {label}: `{value}`"
                if key in ("model_dir", "recipe", "command")
                else f"- {label}: {value}"
            )
    for note in run.get("notes", []):
        lines.append(f"- Note: {note}")
    lines += ["", "## Three requests", ""]
    for request in requests:
        lines.append(f"**{request.kind}** ({request.dataset})")
        lines.append("")
        lines.append(f"> {request.instruction}")
        lines.append("")
        answer = f"*{request.answer}*" if request.answer.strip() else "(empty answer)"
        lines.append(f"Answer: {answer}" + (f" — {request.detail}" if request.detail else ""))
        lines.append("")

    failed = {(c["task"], c["dataset"], c["metric"]) for c in checks if not c["met"]}

    def mark(task: str, dataset: str, metric: str) -> str:
        if not any(c["task"] == task and c["dataset"] == dataset and c["metric"] == metric for c in checks):
            return ""
        return " (target missed)" if (task, dataset, metric) in failed else " (target met)"

    lines += ["## Cell type annotation and drug sensitivity (test split)", ""]
    lines.append(
        "InstructCell scores every label of the dataset's label set (`score`); `greedy` maps the greedy "
        "answer to a label. The logistic regression is fitted in this run on the same training cells "
        "(log-normalized counts) and predicts the same test cells."
    )
    lines.append("")
    lines += classification_table(metrics, mark)
    if not metrics.get("dsp"):
        lines += [
            "",
            "No DSP dataset in this run (the fallback data has none): the DSP target is not assessed.",
        ]
    lines += ["", "## Conditional pseudo-cell generation (test split)", ""]
    lines.append(
        "One request per test cell (its natural-language instruction, held-out templates); the model's "
        "cells are compared with the real test cells. **reference** = real *training* cells of the "
        "requested types, as many per type as were requested: what a perfect generator would score "
        "(closeness to it is the goal, not the maximum). Embedding: PCA-50 + UMAP fitted on the real "
        "test cells; KNN metrics averaged over K = 5, 10, 25, 50."
    )
    lines.append("")
    lines += generation_table(metrics, mark)
    lines += ["", "## Targets (issue 7)", ""]
    if checks:
        for c in checks:
            status = "met" if c["met"] else "**MISSED**"
            lines.append(
                f"- {c['task'].upper()} {c['dataset']} {c['metric']} = {fmt(c['value'])} "
                f"(target {c['target']}): {status}"
            )
    else:
        lines.append("- none assessed")
    lines += ["", "## Figures", ""]
    for title, paths in figures.items():
        for path in paths:
            lines.append(f"![{title}]({path})")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_demo_report(
    out_dir: str | os.PathLike,
    classification: Sequence[ClassificationResult],
    generation: Sequence[GenerationResult],
    requests: Sequence[Request] = (),
    start_time: float | None = None,
    run_info: Mapping[str, Any] | None = None,
    embedding_factory: Callable[[], Any] = ReferenceEmbedding,
) -> dict[str, Any]:
    """Compute every metric and write ``metrics.json``, ``report.md`` and ``figures/*.png`` into ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Destination (created); other files in it (model, data) are left alone.
    classification : sequence of ClassificationResult
        One per CTA/DSP dataset.
    generation : sequence of GenerationResult
        One per CPCG dataset.
    requests : sequence of Request
        The natural-language requests shown at the top of the report.
    start_time : float, optional
        ``time.time()`` at the start of the run; ``wall_seconds`` is measured up to writing the files.
    run_info : dict, optional
        Stored under ``run`` in metrics.json (data source, recipe, training summary, timings...).
    embedding_factory : callable
        Returns an unfitted embedding for each CPCG dataset (default: PCA + UMAP, the paper's protocol).

    Returns
    -------
    dict
        The metrics written to ``metrics.json``.
    """
    start_time = time.time() if start_time is None else start_time
    out_dir = Path(out_dir)
    with staging_dir(out_dir) as tmp:
        (tmp / "figures").mkdir()
        metrics: dict[str, Any] = {"wall_seconds": 0.0, "cta": {}, "dsp": {}, "cpcg": {}}
        figures: dict[str, list[str]] = {}
        for result in classification:
            if result.task not in ("cta", "dsp"):
                raise ValueError(f"Classification task must be 'cta' or 'dsp', got {result.task!r}.")
            metrics[result.task][result.dataset] = classification_entry(result)
            name = f"figures/confusion_{result.task}_{safe_name(result.dataset)}.png"
            plot_confusion(tmp / name, result)
            figures.setdefault(f"{result.task.upper()} {result.dataset} confusion matrix", []).append(name)
        for result in generation:
            entry, coords = generation_entry(result, embedding_factory())
            metrics["cpcg"][result.dataset] = entry
            name = f"figures/umap_cpcg_{safe_name(result.dataset)}.png"
            plot_umap(tmp / name, result, coords)
            figures.setdefault(f"CPCG {result.dataset} UMAP", []).append(name)
        checks = check_targets(metrics)
        metrics["targets"] = checks
        metrics["requests"] = [
            {
                "kind": r.kind,
                "dataset": r.dataset,
                "instruction": r.instruction,
                "answer": r.answer,
                "detail": r.detail,
                **r.extra,
            }
            for r in requests
        ]
        if run_info:
            metrics["run"] = dict(run_info)
        metrics["wall_seconds"] = round(time.time() - start_time, 1)
        (tmp / "report.md").write_text(_report_markdown(metrics, requests, figures, checks))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=json_default) + "\n")
        publish(tmp, out_dir, ["figures", "report.md", "metrics.json"])
    return metrics
