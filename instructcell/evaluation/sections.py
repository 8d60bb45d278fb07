"""Optional report sections about one model on classification tasks: robustness and saliency.

* :func:`robustness_section`: the same test cells asked with held-out templates with and without the label
  options in the prompt (:mod:`instructcell.evaluation.robustness`), a spread plot per dataset;
* :func:`saliency_section`: marker genes per label by masked gradient saliency
  (:mod:`instructcell.evaluation.saliency`), a heatmap per dataset and the full list as a CSV.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import datasets
import pandas as pd

from instructcell.tasks import Task

from . import robustness
from .candidates import Candidate, model_predictions
from .context import Evaluation
from .plotting import plot_robustness, plot_saliency_heatmap
from .saliency import mean_saliency_by_label, row_answer_saliency, top_genes

__all__ = ["robustness_section", "saliency_csv", "saliency_section"]

logger = logging.getLogger(__name__)


def robustness_section(
    ev: Evaluation,
    candidate: Candidate,
    task: Task,
    dataset: str,
    rows: datasets.Dataset,
    section: dict[str, Any],
    templates_per_group: int,
) -> None:
    """Add one dataset's accuracy across held-out templates to ``section`` (``sections["robustness"]``).

    Parameters
    ----------
    ev : Evaluation
    candidate : Candidate
        The model; its first method predicts.
    task : Task
        A classification task.
    dataset : str
    rows : Dataset
        The test rows scored in the classification table (same cells).
    section : dict
        Filled in place: ``method``, ``templates_per_group``, ``sd_ddof``, ``templates`` (task -> group ->
        template ids) and ``results`` (task -> dataset -> ``n``, ``summary``, ``per_template``).
    templates_per_group : int
        Templates with the label options in the prompt, and as many without.
    """
    bank, lookup = ev.templates()
    robustness.check_rows_render(rows, lookup)
    method = candidate.methods[0]
    section.update(method=method, templates_per_group=templates_per_group, sd_ddof=1)
    templates = section.setdefault("templates", {})
    if task.name not in templates:
        train_ids = set(ev.train.table["template_id"])
        chosen = robustness.choose_templates(
            bank, task.name, candidate.variant, templates_per_group, ev.settings.seed, train_ids
        )
        templates[task.name] = {group: [t.id for t in ts] for group, ts in chosen.items()}
    chosen = {
        group: [lookup[(tid, candidate.variant)] for tid in ids]
        for group, ids in templates[task.name].items()
    }

    def predict(rendered: list[dict], answers: list[list[str]] | None) -> list[str | None]:
        return model_predictions(
            candidate.model,
            candidate.processor,
            rendered,
            method=method,
            batch_size=ev.settings.batch_size,
            max_new_tokens=ev.settings.max_new_tokens,
            answers=answers,
        )

    per_template = robustness.evaluate_templates(
        predict,
        list(rows),
        chosen,
        needs_answers=candidate.variant == "chat" and method == "score",
        progress=ev.settings.progress,
        desc=f"{task.name} {dataset} templates",
    )
    summary = robustness.summarize_templates(per_template, ddof=1)
    section.setdefault("results", {}).setdefault(task.name, {})[dataset] = {
        "n": len(rows),
        "summary": summary,
        "per_template": per_template,
    }
    frame = pd.DataFrame(per_template)
    frame["group"] = frame["group"].str.replace("_", " ")
    prefix = f"{task.name.upper()} {dataset}"
    title = f"{prefix}: {len(rows)} test cells x {len(per_template)} held-out templates"
    plot_robustness(
        ev.report.figure(f"{prefix} robustness", f"robustness_{task.name}_{dataset}"), frame, title
    )
    for group in robustness.GROUPS:
        acc = summary[group]["accuracy"]
        logger.info("%s %s %s: accuracy %.3f ± %.3f", task.name, dataset, group, acc["mean"], acc["sd"])


def saliency_section(
    ev: Evaluation,
    candidate: Candidate,
    task: Task,
    dataset: str,
    rows: datasets.Dataset,
    section: dict[str, Any],
    top_k: int,
) -> None:
    """Add one dataset's top genes per label by saliency to ``section`` (``sections["saliency"]``).

    Parameters
    ----------
    ev : Evaluation
    candidate : Candidate
    task : Task
        A classification task.
    dataset : str
    rows : Dataset
        The test rows (their ``response`` is the answer whose likelihood is differentiated).
    section : dict
        Filled in place: task -> dataset -> ``n_cells`` (label -> cells) and ``top_genes`` (label -> list of
        ``{"gene", "saliency"}``).
    top_k : int
        Genes per label.
    """
    saliency, _ = row_answer_saliency(
        candidate.model,
        candidate.processor,
        list(rows),
        answers=list(rows["response"]),
        batch_size=max(1, ev.settings.batch_size // 2),
        progress=ev.settings.progress,
    )
    table = mean_saliency_by_label(saliency, rows["label"], ev.genes)
    ranked = top_genes(table, top_k)
    section.setdefault(task.name, {})[dataset] = {
        "n_cells": table.attrs["n_cells"],
        "top_genes": {
            label: [{"gene": g, "saliency": v} for g, v in pairs] for label, pairs in ranked.items()
        },
    }
    union = list(dict.fromkeys(g for pairs in ranked.values() for g, _ in pairs))
    if union:
        prefix = f"{task.name.upper()} {dataset}"
        title = f"{prefix}: mean normalized saliency, top {top_k} genes per label ({len(rows)} test cells)"
        figure = ev.report.figure(f"{prefix} saliency", f"saliency_{task.name}_{dataset}")
        plot_saliency_heatmap(figure, table[union], title)


def saliency_csv(section: Mapping[str, Any]) -> pd.DataFrame:
    """Flatten the saliency section into one table: task, dataset, label, rank, gene, saliency, n_cells."""
    records = [
        {
            "task": task,
            "dataset": dataset,
            "label": label,
            "rank": rank,
            "gene": item["gene"],
            "saliency": item["saliency"],
            "n_cells": entry["n_cells"][label],
        }
        for task, by_dataset in section.items()
        for dataset, entry in by_dataset.items()
        for label, items in entry["top_genes"].items()
        for rank, item in enumerate(items, start=1)
    ]
    return pd.DataFrame.from_records(
        records, columns=["task", "dataset", "label", "rank", "gene", "saliency", "n_cells"]
    )
