"""Evaluate a saved model on the test split of a built dataset: :func:`run_evaluation`.

``instructcell evaluate`` and ``make demo`` call it; the benchmark suite calls :func:`score_pairs` with its
own models. Every (task, dataset) pair of the test split is scored by the evaluator of the task's metric
family (:data:`EVALUATORS`), the model next to the task's baselines; classification tasks can add the
robustness and saliency sections. The report folder (``metrics.json``, ``report.md``, ``figures/``, with
saliency ``saliency_top_genes.csv``) is written atomically; the schema is in :mod:`instructcell.evaluation`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import torch

from datasets_builder.dataset_folder import SplitRows, dataset_genes
from instructcell.tasks import Task, get_task, task_names

from .candidates import METHODS, Candidate
from .classification_evaluator import evaluate_classification
from .context import Evaluation, ScoringSettings
from .files import report_folder
from .generation_evaluator import evaluate_generation
from .metrics.generation import ReferenceEmbedding
from .multicell_evaluator import evaluate_multicell
from .perturbation_evaluator import evaluate_perturbation
from .sections import robustness_section, saliency_csv, saliency_section

__all__ = [
    "EVALUATORS",
    "METHODS",
    "EvaluationConfig",
    "check_gene_vocabulary",
    "run_evaluation",
    "score_pairs",
    "select_pairs",
]

logger = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("instruct", "chat")
#: The evaluator of every metric family: ``(evaluation, task, dataset) -> (scores entry, test rows)``.
EVALUATORS: dict[str, Callable[[Evaluation, Task, str], tuple[dict[str, Any], datasets.Dataset]]] = {
    "classification": evaluate_classification,
    "generation": evaluate_generation,
    "perturbation": evaluate_perturbation,
    "multicell": evaluate_multicell,
}


@dataclass
class EvaluationConfig:
    """Settings of :func:`run_evaluation` (the flags of ``instructcell evaluate``).

    Parameters
    ----------
    model : path
        Saved model folder (Hub layout: weights, config and processor files).
    dataset_dir : path
        Built dataset: ``train.parquet``, ``test.parquet`` and ``gene_vocab.txt`` (the model's genes).
    output_dir : path
        Where ``metrics.json``, ``report.md`` and ``figures/`` go (other files there are left alone).
    tasks : sequence of str
        Task names (default: every task of the registry).
    datasets : sequence of str, optional
        Dataset names (default: every dataset of the test split with one of the tasks).
    variant : {"instruct", "chat"}
        Rows (and templates) of this variant.
    max_test_cells : int, optional
        Test rows per task and dataset at most (seeded random subset); None = all.
    method : str or sequence of str
        Label prediction: ``"score"`` (the most likely label, ``score_labels``) or ``"generate"`` (the greedy
        answer mapped to a label by ``modeling_instructcell.answer_extraction``; unanswered = wrong), or
        several, each a row of the report (the first is the one of the sections).
    baselines : str or sequence of str
        ``"cheap"`` (default: logistic regression, per-label mean, real-cell reference), ``"all"`` (also
        CellTypist and scVI when installed), ``"none"`` or baseline names; each task runs those of its own.
    seed : int
        Seed of the test-cell subset, the baselines, the cell sampler and the template draw.
    robustness : bool
        Also evaluate classification tasks with ``templates_per_group`` held-out templates with options in
        the prompt and as many without, on the same cells.
    templates_per_group : int
        Templates per group in the robustness mode.
    saliency : bool
        Also rank marker genes per label by masked vanilla-gradient saliency (classification test cells).
    saliency_top_k : int
        Genes per label.
    markers_per_label : int
        Marker genes per label in the generation dot plots.
    marker_method : str
        ``scanpy.tl.rank_genes_groups`` method used to rank marker genes on the real test cells.
    max_generated_per_label, generated_per_request : int
        Generation: cells generated per label at most; cells sampled per request.
    batch_size : int
        Rows per model call.
    requests : bool
        Show the first request of every task, answered in natural language, at the top of the report.
    title : str
        The report's title.
    template_bank : path, optional
        The template bank the dataset was built with (default: the shipped bank).
    device : str, optional
        ``cpu``, ``cuda``...; default the first GPU when there is one.
    progress : bool
        Show progress bars.
    started_at : float, optional
        ``time.time()`` when the whole run began (e.g. before building data and training); the report's wall
        time counts from it (default: from the call).
    extra : dict
        Stored as is under ``run`` in ``metrics.json`` (e.g. ``{"command": ...}``).
    """

    model: str | os.PathLike
    dataset_dir: str | os.PathLike
    output_dir: str | os.PathLike
    tasks: Sequence[str] = field(default_factory=task_names)
    datasets: Sequence[str] | None = None
    variant: str = "instruct"
    max_test_cells: int | None = 500
    method: str | Sequence[str] = "score"
    baselines: str | Sequence[str] = "cheap"
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
    requests: bool = False
    title: str = "InstructCell evaluation (test split)"
    template_bank: str | os.PathLike | None = None
    device: str | None = None
    progress: bool = True
    started_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if not self.tasks:
            raise ValueError("Unknown task(s) (none given): pass at least one task name.")
        for name in self.tasks:
            get_task(name)
        methods = self.methods
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"Unknown method {unknown or '(none given)'}: use 'score' or 'generate'.")
        if self.variant not in VARIANTS:
            raise ValueError(f"Unknown variant {self.variant!r}: use 'instruct' or 'chat'.")
        for name in ("templates_per_group", "saliency_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.datasets is not None:
            self.datasets = tuple(self.datasets)
        self.scoring()  # checks the remaining settings

    @property
    def methods(self) -> tuple[str, ...]:
        """The label prediction methods, the first one the headline."""
        return (self.method,) if isinstance(self.method, str) else tuple(self.method)

    def scoring(self) -> ScoringSettings:
        """Return the settings the metric-family evaluators read."""
        return ScoringSettings(
            seed=self.seed,
            max_test_cells=self.max_test_cells,
            batch_size=self.batch_size,
            max_generated_per_label=self.max_generated_per_label,
            generated_per_request=self.generated_per_request,
            baselines=self.baselines,
            markers_per_label=self.markers_per_label,
            marker_method=self.marker_method,
            requests=self.requests,
            progress=self.progress,
        )


def check_gene_vocabulary(processor: Any, dataset_dir: str | os.PathLike) -> list[str]:
    """Require the model's gene vocabulary to equal the dataset's ``gene_vocab.txt`` (same genes, same order).

    The dataset's sparse gene indices point into ``gene_vocab.txt``; with another vocabulary they would
    address the wrong genes.

    Returns
    -------
    list of str
        The genes.
    """
    data_genes = dataset_genes(dataset_dir)
    model_genes = [str(g) for g in processor.feature_extractor.gene_names]
    if data_genes == model_genes:
        return data_genes
    first = next(
        (i for i, (a, b) in enumerate(zip(model_genes, data_genes, strict=False)) if a != b),
        min(len(model_genes), len(data_genes)),
    )
    model_gene = model_genes[first] if first < len(model_genes) else "(end)"
    data_gene = data_genes[first] if first < len(data_genes) else "(end)"
    raise ValueError(
        f"The model's gene vocabulary ({len(model_genes)} genes) differs from the dataset's gene_vocab.txt "
        f"({len(data_genes)} genes), first at position {first}: {model_gene!r} vs {data_gene!r}. Evaluate "
        "the model on data built with its own vocabulary (the dataset it was trained on)."
    )


def select_pairs(
    test: SplitRows, tasks: Sequence[str], names: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """(task, dataset) pairs of the test split to evaluate, in the order of ``tasks``, then by name.

    Raises
    ------
    ValueError
        For a dataset name that is not in the test split, or when nothing is left to evaluate.
    """
    present = test.pairs()
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


def score_pairs(
    ev: Evaluation,
    pairs: Sequence[tuple[str, str]],
    scores: dict[str, dict[str, Any]],
    after: Callable[[Task, str, datasets.Dataset], None] | None = None,
) -> dict[str, float]:
    """Score every (task, dataset) pair with its metric family's evaluator, into ``scores[task][dataset]``.

    Parameters
    ----------
    ev : Evaluation
    pairs : sequence of (str, str)
    scores : dict
        ``metrics.json``'s ``scores``, filled in place.
    after : callable, optional
        ``after(task, dataset, rows)`` runs after each pair (per-model sections).

    Returns
    -------
    dict of str to float
        ``"<task>/<dataset>"`` -> seconds.
    """
    timings = {}
    for name, dataset in pairs:
        task = get_task(name)
        start = time.time()
        scores.setdefault(name, {})[dataset], rows = EVALUATORS[task.metric_family](ev, task, dataset)
        if after is not None:
            after(task, dataset, rows)
        timings[f"{name}/{dataset}"] = round(time.time() - start, 1)
    return timings


def run_evaluation(
    config: EvaluationConfig, embedding_factory: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """Evaluate ``config.model`` on the test split of ``config.dataset_dir``; write the report.

    Parameters
    ----------
    config : EvaluationConfig
    embedding_factory : callable, optional
        Returns an unfitted embedding per generation dataset (``fit``, ``transform``, ``real_embedding_``);
        default PCA-50 + UMAP seeded with ``config.seed`` (the paper's protocol).

    Returns
    -------
    dict
        The metrics written to ``metrics.json`` (schema in :mod:`instructcell.evaluation`).

    Raises
    ------
    ValueError
        Unknown task / dataset / method / variant, missing dataset files, a model whose gene vocabulary
        differs from the dataset's, or a dataset built from another template bank (robustness, chat scoring).
    """
    from ..inference import load_pipeline

    start = time.time()
    datasets.disable_progress_bars()
    train = SplitRows.load(config.dataset_dir, "train", variant=config.variant)
    test = SplitRows.load(config.dataset_dir, "test", variant=config.variant)
    pairs = select_pairs(test, config.tasks, config.datasets)
    pipe = load_pipeline(config.model, device=config.device)
    candidate = Candidate(
        "instructcell",
        pipe.model.eval(),
        pipe.processor,
        variant=config.variant,
        methods=config.methods,
        path=str(config.model),
    )
    genes = check_gene_vocabulary(pipe.processor, config.dataset_dir)
    run: dict[str, Any] = {
        key: (str(value) if isinstance(value, os.PathLike) else value)
        for key, value in asdict(config).items()
        if key not in ("extra", "started_at", "title")
    }
    run.update(config.extra)
    run.update(device=str(candidate.model.device), torch_threads=torch.get_num_threads())
    timings: dict[str, float] = {**run.get("timings", {}), "load": round(time.time() - start, 1)}
    sections: dict[str, Any] = {}

    with report_folder(config.output_dir) as report:
        factory = embedding_factory or (lambda: ReferenceEmbedding(random_state=config.seed))
        ev = Evaluation(
            train,
            test,
            config.variant,
            genes,
            [candidate],
            config.scoring(),
            report,
            factory,
            config.template_bank,
        )

        def model_sections(task: Task, dataset: str, rows: datasets.Dataset) -> None:
            if task.metric_family != "classification":
                return
            if config.robustness:
                section = sections.setdefault("robustness", {})
                robustness_section(ev, candidate, task, dataset, rows, section, config.templates_per_group)
            if config.saliency:
                saliency_section(
                    ev,
                    candidate,
                    task,
                    dataset,
                    rows,
                    sections.setdefault("saliency", {}),
                    config.saliency_top_k,
                )

        scores: dict[str, Any] = {}
        timings.update(score_pairs(ev, pairs, scores, after=model_sections))
        if ev.requests:
            sections = {"requests": ev.requests, **sections}
        if sections.get("saliency"):
            saliency_csv(sections["saliency"]).to_csv(report.file("saliency_top_genes.csv"), index=False)
        run.update(methods=ev.methods, skipped=ev.skipped, timings=timings)
        run["wall_seconds"] = round(time.time() - (config.started_at or start), 1)
        metrics = {"title": config.title, "run": run, "scores": scores, "sections": sections}
        return report.publish(metrics)
