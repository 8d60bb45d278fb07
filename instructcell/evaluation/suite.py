"""Evaluate a saved model on the test split of a built dataset: per task and dataset, with figures.

``examples/evaluate.py`` is the command line; :func:`run_evaluation` does the work. Outputs in
``output_dir`` (written into a temporary folder first, then moved into place):

``metrics.json``::

    {"run": {...settings, timings...},
     "cta" / "dsp": {dataset: {"accuracy", "macro_f1", "weighted_f1", "answered_rate", "method", "n",
                               "logreg": {same keys}}},
     "cpcg": {dataset: {"mmd", "delta_sknn", "pknn", "pknn_k10", "reference": {...},
                        "markers": {label: [genes]}, ...}},
     "robustness": {"templates_per_group", "sd_ddof", "target_sd_accuracy",
                    "templates": {task: {group: [ids]}},
                    "results": {task: {dataset: {"per_template": [...],
                                                 "summary": {group: {metric: {"mean", "sd", "min", "max",
                                                                              "n_templates"}}}}}}},
                                                                              (with --robustness)
     "saliency": {task: {dataset: {"n_cells": {label: n}, "top_genes": {label: [{"gene", "saliency"}]}}}},
     "figures": {title: path}}

``report.md`` (the same numbers as markdown tables), ``saliency_top_genes.csv`` (with saliency) and
``figures/*.png``: a confusion matrix per CTA/DSP dataset (model and logistic regression), per CPCG dataset a
UMAP of real vs generated cells and a marker-gene dot plot, per CTA/DSP dataset a per-template robustness plot
and a saliency heatmap.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from datasets_builder.gene_vocab import GENE_VOCAB_FILENAME, read_gene_vocab
from datasets_builder.templates import DEFAULT_BANK_DIR, TemplateBank
from instructcell.evaluation.metrics.generation import ReferenceEmbedding, normalize_log1p

from . import robustness
from .files import fmt, publish, safe_name, staging_dir, write_json
from .plotting import (
    plot_confusion,
    plot_marker_dotplot,
    plot_robustness,
    plot_saliency_heatmap,
    plot_umap,
)
from .predictions import (
    cap_rows,
    evaluate_classification,
    evaluate_generation,
    model_predictions,
    select_rows,
)
from .report import (
    ClassificationResult,
    GenerationResult,
    classification_entry,
    classification_table,
    generation_entry,
    generation_table,
)
from .saliency import mean_saliency_by_label, row_answer_saliency, top_genes

__all__ = [
    "METHODS",
    "TARGET_SD_ACCURACY",
    "TASKS",
    "EvaluationConfig",
    "check_gene_vocabulary",
    "dotplot_stats",
    "load_splits",
    "rank_marker_genes",
    "report_markdown",
    "run_evaluation",
    "select_pairs",
]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("cta", "dsp", "cpcg")
METHODS: tuple[str, ...] = ("score", "generate")
VARIANTS: tuple[str, ...] = ("instruct", "chat")
#: The issue's robustness target: sd of accuracy across templates (reported, not enforced).
TARGET_SD_ACCURACY = 0.02


@dataclass
class EvaluationConfig:
    """Settings of :func:`run_evaluation` (the flags of ``examples/evaluate.py``).

    Parameters
    ----------
    model : path
        Saved model folder (Hub layout: weights, config and processor files).
    dataset_dir : path
        Built dataset: ``train.parquet``, ``test.parquet`` and ``gene_vocab.txt`` (the model's genes).
    output_dir : path
        Where ``metrics.json``, ``report.md`` and ``figures/`` go (other files there are left alone).
    tasks : sequence of str
        Among ``cta``, ``dsp``, ``cpcg``.
    datasets : sequence of str, optional
        Dataset names (default: every dataset of the test split with one of the tasks).
    variant : {"instruct", "chat"}
        Rows (and templates) of this variant.
    max_test_cells : int, optional
        Test rows per task and dataset at most (seeded random subset); None = all.
    method : {"score", "generate"}
        CTA/DSP prediction: the most likely label (``score_labels``) or the greedy answer mapped to a label
        by ``modeling_instructcell.answer_extraction`` (unanswered = wrong).
    seed : int
        Seed of the test-cell subset, the logistic regression, the cell sampler and the template draw.
    robustness : bool
        Also evaluate CTA/DSP with ``templates_per_group`` held-out templates with options in the prompt and
        as many without, on the same cells.
    templates_per_group : int
        Templates per group in the robustness mode.
    saliency : bool
        Also rank marker genes per label by masked vanilla-gradient saliency (CTA/DSP test cells).
    saliency_top_k : int
        Genes per label.
    markers_per_label : int
        Marker genes per label in the CPCG dot plots.
    marker_method : str
        ``scanpy.tl.rank_genes_groups`` method used to rank marker genes on the real test cells.
    max_generated_per_label, generated_per_request : int
        CPCG: cells generated per label at most; cells sampled per request.
    batch_size : int
        Rows per model call.
    template_bank : path, optional
        The template bank the dataset was built with (default: the committed bank).
    device : str, optional
        ``cpu``, ``cuda``...; default the first GPU when there is one.
    progress : bool
        Show progress bars.
    extra : dict
        Stored as is under ``run`` in ``metrics.json`` (e.g. ``{"command": ...}``).
    """

    model: str | os.PathLike
    dataset_dir: str | os.PathLike
    output_dir: str | os.PathLike
    tasks: Sequence[str] = TASKS
    datasets: Sequence[str] | None = None
    variant: str = "instruct"
    max_test_cells: int | None = 500
    method: str = "score"
    seed: int = 0
    robustness: bool = False
    templates_per_group: int = 20
    saliency: bool = False
    saliency_top_k: int = 10
    markers_per_label: int = 3
    marker_method: str = "t-test"
    max_generated_per_label: int = 200
    generated_per_request: int = 1
    batch_size: int = 64
    template_bank: str | os.PathLike | None = None
    device: str | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"Unknown task(s) {unknown or '(none given)'}: choose among {', '.join(TASKS)}.")
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}: use 'score' or 'generate'.")
        if self.variant not in VARIANTS:
            raise ValueError(f"Unknown variant {self.variant!r}: use 'instruct' or 'chat'.")
        for name in ("templates_per_group", "saliency_top_k", "markers_per_label", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_test_cells is not None and self.max_test_cells < 1:
            raise ValueError(f"max_test_cells must be at least 1, got {self.max_test_cells}.")
        if self.datasets is not None:
            self.datasets = tuple(self.datasets)


def load_splits(dataset_dir: str | os.PathLike, variant: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Read the train and test rows of one variant from ``<dataset_dir>/{train,test}.parquet``."""
    dataset_dir = Path(dataset_dir)
    files = {split: dataset_dir / f"{split}.parquet" for split in ("train", "test")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise ValueError(
            f"No {', '.join(missing)}: pass --dataset-dir a folder written by examples/build_dataset.py."
        )
    splits = datasets.load_dataset("parquet", data_files={k: str(v) for k, v in files.items()})
    out = []
    for split in ("train", "test"):
        table = splits[split]
        rows = table.filter(lambda r: r["variant"] == variant)
        if len(rows) == 0:
            raise ValueError(
                f"The {split} split has no {variant!r} rows "
                f"(variants present: {sorted(set(table['variant']))})."
            )
        out.append(rows)
    return out[0], out[1]


def check_gene_vocabulary(processor: Any, dataset_dir: str | os.PathLike) -> None:
    """Require the model's gene vocabulary to equal the dataset's ``gene_vocab.txt`` (same genes, same order).

    The dataset's sparse gene indices point into ``gene_vocab.txt``; with another vocabulary they would
    address the wrong genes.
    """
    path = Path(dataset_dir) / GENE_VOCAB_FILENAME
    if not path.is_file():
        raise ValueError(f"No {path}: the dataset folder must hold the gene vocabulary it was built with.")
    data_genes = read_gene_vocab(path)
    model_genes = [str(g) for g in processor.feature_extractor.gene_names]
    if data_genes == model_genes:
        return
    first = next(
        (i for i, (a, b) in enumerate(zip(model_genes, data_genes, strict=False)) if a != b),
        min(len(model_genes), len(data_genes)),
    )
    model_gene = model_genes[first] if first < len(model_genes) else "(end)"
    data_gene = data_genes[first] if first < len(data_genes) else "(end)"
    raise ValueError(
        f"The model's gene vocabulary ({len(model_genes)} genes) differs from the dataset's {path.name} "
        f"({len(data_genes)} genes), first at position {first}: {model_gene!r} vs {data_gene!r}. Evaluate "
        "the model on data built with its own vocabulary (the dataset it was trained on)."
    )


def select_pairs(
    test: datasets.Dataset, tasks: Sequence[str], names: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """(task, dataset) pairs of the test split to evaluate, in task order then by name.

    Raises
    ------
    ValueError
        For a dataset name that is not in the test split, or when nothing is left to evaluate.
    """
    present = sorted(set(zip(test["task"], test["dataset"], strict=True)))
    available = sorted({d for _, d in present})
    if names is not None:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"Unknown dataset(s) {unknown}: the test split has {', '.join(available)}.")
    pairs = [(t, d) for task in tasks for t, d in present if t == task and (names is None or d in names)]
    if not pairs:
        offered = ", ".join(f"{t}/{d}" for t, d in present)
        raise ValueError(
            f"No test rows for tasks {list(tasks)} and datasets {names}; the split has {offered}."
        )
    return pairs


def rank_marker_genes(
    counts: Any, labels: Sequence[str], genes: Sequence[str], n: int, method: str = "t-test"
) -> dict[str, list[str]]:
    """Top ``n`` marker genes per label on log-normalized counts, ``scanpy.tl.rank_genes_groups`` vs the rest.

    Parameters
    ----------
    counts : array or scipy.sparse matrix
        ``(n_cells, n_genes)`` raw counts.
    labels : sequence of str
        ``(n_cells,)`` labels.
    genes : sequence of str
        ``(n_genes,)`` names.
    n : int
        Genes per label.
    method : str
        ``rank_genes_groups`` method (``"t-test"``, ``"wilcoxon"``...).

    Returns
    -------
    dict of str to list of str
        Sorted labels with at least 2 cells -> their top genes (highest score first). Empty when fewer than
        two labels have 2 cells (nothing to compare).
    """
    import anndata
    import scanpy as sc

    labels = np.asarray(labels).astype(str)
    names, sizes = np.unique(labels, return_counts=True)
    groups = [str(g) for g, size in zip(names, sizes, strict=True) if size >= 2]
    if len(groups) < 2 or len(names) < 2:
        return {}
    adata = anndata.AnnData(
        X=normalize_log1p(counts),
        obs=pd.DataFrame({"label": pd.Categorical(labels)}, index=[str(i) for i in range(len(labels))]),
        var=pd.DataFrame(index=[str(g) for g in genes]),
    )
    sc.tl.rank_genes_groups(adata, "label", groups=groups, method=method, use_raw=False)
    ranked = adata.uns["rank_genes_groups"]["names"]
    return {group: [str(g) for g in ranked[group][:n]] for group in groups}


def dotplot_stats(
    real: Any,
    real_labels: Sequence[str],
    generated: Any,
    generated_labels: Sequence[str],
    markers: Mapping[str, Sequence[str]],
    genes: Sequence[str],
) -> pd.DataFrame:
    """Fraction expressing and mean log-normalized expression of every marker gene, per label and source.

    Parameters
    ----------
    real, generated : array or scipy.sparse matrix
        ``(n_real, n_genes)`` and ``(n_generated, n_genes)`` raw counts (``generated`` may have 0 rows).
    real_labels, generated_labels : sequence of str
        Their labels.
    markers : mapping of str to sequence of str
        Label -> its marker genes (e.g. :func:`rank_marker_genes`).
    genes : sequence of str
        ``(n_genes,)`` column names.

    Returns
    -------
    pandas.DataFrame
        One row per (``group_label``, ``source``, ``marker_of``, ``gene``) with ``fraction`` (cells with a
        positive count / cells of the group) and ``mean`` (mean of ``log1p(counts / total * 1e4)``) and
        ``n_cells``; groups are the labels of ``markers``, sources ``real`` and ``generated`` (a source
        without cells of that label is left out).
    """
    column = {str(g): i for i, g in enumerate(genes)}
    order = [(label, gene) for label, label_genes in markers.items() for gene in label_genes]
    missing = sorted({gene for _, gene in order if gene not in column})
    if missing:
        raise ValueError(f"Marker genes {missing[:5]} are not among the genes.")
    index = [column[gene] for _, gene in order]
    records = []
    for source, counts, labels in (("real", real, real_labels), ("generated", generated, generated_labels)):
        labels = np.asarray(labels).astype(str)
        if counts is None or counts.shape[0] == 0:
            continue
        logged = normalize_log1p(counts)
        sub_counts = _dense_columns(counts, index)
        sub_logged = _dense_columns(logged, index)
        for label in markers:
            rows = labels == label
            if not rows.any():
                continue
            fraction = (sub_counts[rows] > 0).mean(axis=0)
            mean = sub_logged[rows].mean(axis=0)
            for k, (owner, gene) in enumerate(order):
                records.append(
                    {
                        "group_label": label,
                        "source": source,
                        "marker_of": owner,
                        "gene": gene,
                        "fraction": float(fraction[k]),
                        "mean": float(mean[k]),
                        "n_cells": int(rows.sum()),
                    }
                )
    return pd.DataFrame.from_records(
        records, columns=["group_label", "source", "marker_of", "gene", "fraction", "mean", "n_cells"]
    )


def _dense_columns(matrix: Any, index: Sequence[int]) -> np.ndarray:
    """Columns ``index`` of a dense or sparse matrix as a dense float64 array."""
    sub = matrix[:, list(index)]
    return np.asarray(sub.toarray() if hasattr(sub, "toarray") else sub, dtype=np.float64)


# ------------------------------------------------------------------------------------------ the run
@dataclass
class _Context:
    """What every step needs: model, data, settings and where to write."""

    config: EvaluationConfig
    model: Any
    processor: Any
    train: datasets.Dataset
    test: datasets.Dataset
    tmp: Path
    metrics: dict[str, Any]
    figures: dict[str, str]
    embedding_factory: Callable[[], Any] = ReferenceEmbedding
    bank: TemplateBank | None = None
    lookup: dict | None = None

    def figure(self, title: str, name: str) -> Path:
        """Register a figure under ``figures/`` and return the path to write it to."""
        relative = f"figures/{safe_name(name)}.png"
        self.figures[title] = relative
        return self.tmp / relative

    def templates(self) -> tuple[TemplateBank, dict]:
        """Return the template bank and its (id, variant) lookup, loaded once."""
        if self.bank is None:
            self.bank = TemplateBank.load(self.config.template_bank or DEFAULT_BANK_DIR)
            self.lookup = robustness.template_lookup(self.bank)
        return self.bank, self.lookup


def _answers(ctx: _Context, rows: datasets.Dataset) -> list[list[str]] | None:
    """Per row, each choice's answer text for likelihood scoring (chat variant only; None for instruct)."""
    if ctx.config.variant == "instruct" or ctx.config.method != "score":
        return None
    _, lookup = ctx.templates()
    return robustness.rows_answer_texts(rows, lookup)


def _classification(ctx: _Context, task: str, dataset: str) -> None:
    config = ctx.config
    rows = cap_rows(select_rows(ctx.test, task, dataset), config.max_test_cells, config.seed)
    result: ClassificationResult = evaluate_classification(
        ctx.model,
        ctx.processor,
        select_rows(ctx.train, task, dataset),
        rows,
        task,
        dataset,
        methods=(config.method,),
        seed=config.seed,
        batch_size=config.batch_size,
        answers=_answers(ctx, rows),
        progress=config.progress,
    )
    entry = classification_entry(result)
    ctx.metrics[task][dataset] = entry
    plot_confusion(
        ctx.figure(f"{task.upper()} {dataset} confusion matrix", f"confusion_{task}_{dataset}"), result
    )
    logger.info(
        "%s %s: accuracy %.3f, macro-F1 %.3f (logistic regression %.3f, %.3f) on %d test cells",
        task,
        dataset,
        entry["accuracy"],
        entry["macro_f1"],
        entry["logreg"]["accuracy"],
        entry["logreg"]["macro_f1"],
        entry["n"],
    )
    if config.robustness:
        _robustness(ctx, task, dataset, rows)
    if config.saliency:
        _saliency(ctx, task, dataset, rows)


def _robustness(ctx: _Context, task: str, dataset: str, rows: datasets.Dataset) -> None:
    config = ctx.config
    bank, lookup = ctx.templates()
    robustness.check_rows_render(rows, lookup)
    section = ctx.metrics.setdefault(
        "robustness",
        {
            "method": config.method,
            "templates_per_group": config.templates_per_group,
            "sd_ddof": 1,
            "target_sd_accuracy": TARGET_SD_ACCURACY,
            "templates": {},
            "results": {},
        },
    )
    if task not in section["templates"]:
        train_ids = set(ctx.train["template_id"])
        chosen = robustness.choose_templates(
            bank, task, config.variant, config.templates_per_group, config.seed, train_ids
        )
        section["templates"][task] = {group: [t.id for t in ts] for group, ts in chosen.items()}
    chosen = {
        group: [lookup[(tid, config.variant)] for tid in ids]
        for group, ids in section["templates"][task].items()
    }

    def predict(rendered: list[dict], answers: list[list[str]] | None) -> list[str | None]:
        return model_predictions(
            ctx.model,
            ctx.processor,
            rendered,
            method=config.method,
            batch_size=config.batch_size,
            answers=answers,
        )

    per_template = robustness.evaluate_templates(
        predict,
        list(rows),
        chosen,
        needs_answers=config.variant == "chat" and config.method == "score",
        progress=config.progress,
        desc=f"{task} {dataset} templates",
    )
    summary = robustness.summarize_templates(per_template, ddof=1)
    section["results"].setdefault(task, {})[dataset] = {
        "n": len(rows),
        "summary": summary,
        "per_template": per_template,
    }
    frame = pd.DataFrame(per_template)
    frame["group"] = frame["group"].str.replace("_", " ")
    title = f"{task.upper()} {dataset}: {len(rows)} test cells x {len(per_template)} held-out templates"
    plot_robustness(
        ctx.figure(f"{task.upper()} {dataset} robustness", f"robustness_{task}_{dataset}"), frame, title
    )
    for group in robustness.GROUPS:
        acc = summary[group]["accuracy"]
        logger.info("%s %s %s: accuracy %.3f ± %.3f", task, dataset, group, acc["mean"], acc["sd"])


def _saliency(ctx: _Context, task: str, dataset: str, rows: datasets.Dataset) -> None:
    config = ctx.config
    genes = [str(g) for g in ctx.processor.feature_extractor.gene_names]
    saliency, _ = row_answer_saliency(
        ctx.model,
        ctx.processor,
        list(rows),
        answers=list(rows["response"]),
        batch_size=max(1, config.batch_size // 2),
        progress=config.progress,
    )
    table = mean_saliency_by_label(saliency, rows["label"], genes)
    ranked = top_genes(table, config.saliency_top_k)
    ctx.metrics.setdefault("saliency", {}).setdefault(task, {})[dataset] = {
        "n_cells": table.attrs["n_cells"],
        "top_genes": {
            label: [{"gene": g, "saliency": v} for g, v in pairs] for label, pairs in ranked.items()
        },
    }
    union = list(dict.fromkeys(g for pairs in ranked.values() for g, _ in pairs))
    if union:
        title = (
            f"{task.upper()} {dataset}: mean normalized saliency, top {config.saliency_top_k} genes per "
            f"label ({len(rows)} test cells)"
        )
        plot_saliency_heatmap(
            ctx.figure(f"{task.upper()} {dataset} saliency", f"saliency_{task}_{dataset}"),
            table[union],
            title,
        )


def _generation(ctx: _Context, dataset: str) -> None:
    config = ctx.config
    genes = [str(g) for g in ctx.processor.feature_extractor.gene_names]
    rows = cap_rows(select_rows(ctx.test, "cpcg", dataset), config.max_test_cells, config.seed)
    result: GenerationResult
    result, example = evaluate_generation(
        ctx.model,
        ctx.processor,
        select_rows(ctx.train, "cpcg", dataset),
        rows,
        dataset,
        max_generated_per_label=config.max_generated_per_label,
        generated_per_request=config.generated_per_request,
        seed=config.seed,
        batch_size=max(1, config.batch_size // 2),
        progress=config.progress,
    )
    entry, coords = generation_entry(result, ctx.embedding_factory())
    plot_umap(ctx.figure(f"CPCG {dataset} UMAP", f"umap_cpcg_{dataset}"), result, coords)
    markers = rank_marker_genes(
        result.real, result.real_labels, genes, config.markers_per_label, config.marker_method
    )
    entry["markers"] = markers
    entry["example"] = example
    if markers:
        stats = dotplot_stats(
            result.real, result.real_labels, result.generated, result.generated_labels, markers, genes
        )
        title = (
            f"CPCG {dataset}: marker genes, real vs generated cells\n(top {config.markers_per_label} per "
            f"cell type, ranked on the real test cells with {config.marker_method})"
        )
        plot_marker_dotplot(
            ctx.figure(f"CPCG {dataset} marker genes", f"markers_cpcg_{dataset}"), stats, title
        )
    ctx.metrics["cpcg"][dataset] = entry
    logger.info(
        "cpcg %s: %d cells generated for %d requests; MMD %s (reference %s), pKNN %s (reference %s)",
        dataset,
        entry["n_generated"],
        entry["n_requests"],
        fmt(entry["mmd"]),
        fmt(entry["reference"]["mmd"]),
        fmt(entry["pknn"]),
        fmt(entry["reference"]["pknn"]),
    )


def _saliency_csv(metrics: Mapping[str, Any]) -> pd.DataFrame:
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
        for task, by_dataset in metrics.get("saliency", {}).items()
        for dataset, entry in by_dataset.items()
        for label, items in entry["top_genes"].items()
        for rank, item in enumerate(items, start=1)
    ]
    return pd.DataFrame.from_records(
        records, columns=["task", "dataset", "label", "rank", "gene", "saliency", "n_cells"]
    )


def run_evaluation(
    config: EvaluationConfig, embedding_factory: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """Evaluate ``config.model`` on the test split of ``config.dataset_dir``; write the report.

    Parameters
    ----------
    config : EvaluationConfig
    embedding_factory : callable, optional
        Returns an unfitted embedding per CPCG dataset (``fit``, ``transform``, ``real_embedding_``);
        default PCA-50 + UMAP seeded with ``config.seed`` (the paper's protocol).

    Returns
    -------
    dict
        The metrics written to ``metrics.json`` (schema in the module docstring).

    Raises
    ------
    ValueError
        Unknown task / dataset / method / variant, missing dataset files, a model whose gene vocabulary
        differs from the dataset's, or a dataset built from another template bank (robustness, chat scoring).
    """
    from ..inference import load_pipeline

    start = time.time()
    datasets.disable_progress_bars()
    train, test = load_splits(config.dataset_dir, config.variant)
    pairs = select_pairs(test, config.tasks, config.datasets)
    pipe = load_pipeline(config.model, device=config.device)
    model, processor = pipe.model.eval(), pipe.processor
    check_gene_vocabulary(processor, config.dataset_dir)
    timings: dict[str, float] = {"load": round(time.time() - start, 1)}
    run_info = {
        key: (str(value) if isinstance(value, os.PathLike) else value)
        for key, value in asdict(config).items()
        if key != "extra"
    }
    run_info.update(config.extra)
    run_info["device"] = str(model.device)
    run_info["torch_threads"] = __import__("torch").get_num_threads()
    metrics: dict[str, Any] = {"run": run_info, "cta": {}, "dsp": {}, "cpcg": {}}
    with staging_dir(config.output_dir) as tmp:
        (tmp / "figures").mkdir()
        factory = embedding_factory or (lambda: ReferenceEmbedding(random_state=config.seed))
        ctx = _Context(config, model, processor, train, test, tmp, metrics, {}, factory)
        for task, dataset in pairs:
            step = time.time()
            if task == "cpcg":
                _generation(ctx, dataset)
            else:
                _classification(ctx, task, dataset)
            timings[f"{task}/{dataset}"] = round(time.time() - step, 1)
        for task in TASKS:
            if not metrics[task]:
                del metrics[task]
        run_info["timings"] = timings
        run_info["wall_seconds"] = round(time.time() - start, 1)
        metrics["figures"] = dict(ctx.figures)
        names = ["figures", "report.md", "metrics.json"]
        if config.saliency and "saliency" in metrics:
            _saliency_csv(metrics).to_csv(tmp / "saliency_top_genes.csv", index=False)
            names.append("saliency_top_genes.csv")
        (tmp / "report.md").write_text(report_markdown(metrics))
        write_json(tmp / "metrics.json", metrics)
        publish(tmp, Path(config.output_dir), names)
    return metrics


# ------------------------------------------------------------------------------------------ markdown
def _robustness_lines(section: Mapping[str, Any]) -> list[str]:
    target = section["target_sd_accuracy"]
    lines = [
        "## Robustness to the instruction's wording (held-out templates)",
        "",
        f"The same test cells are asked with {section['templates_per_group']} test-split templates that "
        f"list the label options in the prompt and {section['templates_per_group']} that do not (drawn "
        "from the template bank, none used in training); each cell's instruction is re-rendered with every "
        f"template as the dataset builder would have. Method: `{section['method']}`. sd = sample standard "
        f"deviation across templates (ddof = {section['sd_ddof']}); target sd ≤ {target} accuracy "
        "(reported, not tuned to).",
        "",
        "| task | dataset | cells | templates | accuracy mean ± sd | macro F1 mean ± sd | accuracy min–max "
        f"| sd ≤ {target} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, by_dataset in section["results"].items():
        for dataset, result in by_dataset.items():
            for group, summary in result["summary"].items():
                acc, f1 = summary["accuracy"], summary["macro_f1"]
                met = "yes" if acc["sd"] <= target + 1e-12 else "**no**"
                lines.append(
                    f"| {task.upper()} | {dataset} | {result['n']} | {group.replace('_', ' ')} "
                    f"({acc['n_templates']}) | {fmt(acc['mean'])} ± {fmt(acc['sd'])} "
                    f"| {fmt(f1['mean'])} ± {fmt(f1['sd'])} | {fmt(acc['min'])}–{fmt(acc['max'])} | {met} |"
                )
    return lines


def _saliency_lines(section: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Marker genes by gradient saliency",
        "",
        "Per test cell: gradient of the loss (negative log-likelihood of its true answer) with respect to "
        "the input counts; genes kept where the gradient is negative (more of the gene lowers the loss) and "
        "the count is positive; |gradient| min-max normalized per cell, averaged over the cells of each true "
        "label. Full list: `saliency_top_genes.csv`.",
        "",
    ]
    for task, by_dataset in section.items():
        for dataset, entry in by_dataset.items():
            lines += [f"**{task.upper()} {dataset}**", "", "| label | cells | top genes (mean saliency) |"]
            lines.append("|---|---|---|")
            for label, items in entry["top_genes"].items():
                genes = ", ".join(f"{item['gene']} ({item['saliency']:.2f})" for item in items)
                lines.append(f"| {label} | {entry['n_cells'][label]} | {genes or '(none)'} |")
            lines.append("")
    return lines


def report_markdown(metrics: Mapping[str, Any]) -> str:
    """Write the markdown report of :func:`run_evaluation`'s metrics (tables and figure links)."""
    run = metrics.get("run", {})
    lines = ["# InstructCell evaluation (test split)", ""]
    lines.append(f"- Model: `{run.get('model')}`")
    lines.append(f"- Data: `{run.get('dataset_dir')}`, variant `{run.get('variant')}`")
    lines.append(
        f"- At most {run.get('max_test_cells')} test cells per task and dataset (seeded subset, seed "
        f"{run.get('seed')}); CTA/DSP method `{run.get('method')}`"
    )
    if "wall_seconds" in run:
        lines.append(
            f"- Wall time: {run['wall_seconds']:.0f} s on {run.get('device')} "
            f"({run.get('torch_threads')} threads)"
        )
    if "command" in run:
        lines.append(f"- Command: `{run['command']}`")
    if metrics.get("cta") or metrics.get("dsp"):
        lines += ["", "## Cell type annotation and drug sensitivity", ""]
        lines.append(
            "`score`: the most likely label of the dataset's label set; `generate`: the greedy answer mapped "
            "to a label (unanswered = wrong, F1 over answered cells). The logistic regression is fitted on "
            "the training split's cells of the same dataset (log-normalized counts) and predicts the same "
            "test cells."
        )
        lines += ["", *classification_table(metrics)]
    if metrics.get("cpcg"):
        lines += ["", "## Conditional pseudo-cell generation", ""]
        lines.append(
            "One request per test cell (its own held-out instruction); generated cells are compared with the "
            "real test cells in a PCA-50 + UMAP embedding fitted on the real cells (generated cells mapped "
            "in with `transform`). **ref** = real training cells of the requested types, as many per type: "
            "what a perfect generator would score."
        )
        lines += ["", *generation_table(metrics), ""]
        for dataset, entry in metrics["cpcg"].items():
            if entry.get("markers"):
                shown = "; ".join(f"{label}: {', '.join(genes)}" for label, genes in entry["markers"].items())
                lines.append(f"- Marker genes of {dataset} (real test cells): {shown}")
    if metrics.get("robustness"):
        lines += ["", *_robustness_lines(metrics["robustness"])]
    if metrics.get("saliency"):
        lines += ["", *_saliency_lines(metrics["saliency"])]
    if metrics.get("figures"):
        lines += ["", "## Figures", ""]
        for title, path in metrics["figures"].items():
            lines += [f"![{title}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"
