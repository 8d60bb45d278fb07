"""What every metric-family evaluator reads and writes: the data, the models, the settings, the report.

:class:`Evaluation` is built once per run by :func:`instructcell.evaluation.suite.run_evaluation` (one model)
or the benchmark suite (several models, or none) and handed to the evaluators of
:data:`instructcell.evaluation.suite.EVALUATORS`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

from datasets_builder.dataset_folder import SplitRows
from datasets_builder.templates import DEFAULT_BANK_DIR, Template, TemplateBank
from instructcell.tasks import Task

from .baselines import BASELINES, Baseline, choose_baselines, parse_baseline_choice
from .candidates import Candidate
from .files import ReportFolder
from .metrics.generation import ReferenceEmbedding
from .robustness import rows_answer_texts, template_lookup

__all__ = ["Evaluation", "ScoringSettings", "timed"]


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Return ``fn(*args, **kwargs)`` and its wall time in seconds."""
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


@dataclass
class ScoringSettings:
    """How test cells are chosen, asked and compared.

    Parameters
    ----------
    seed : int
        Seed of the test-cell subset, the baselines and the cell sampler.
    max_test_cells : int, optional
        Test rows per task and dataset at most (seeded random subset); None = all.
    batch_size : int
        Rows per model call (generation requests: half as many).
    max_new_tokens : int
        Length of greedy answers (label prediction by ``generate``, the requests section).
    request_max_new_tokens : int
        Length of the answers to generation requests.
    max_generated_per_label, generated_per_request : int
        Generation: cells requested per label at most; cells sampled per request.
    baselines : str or tuple of str
        ``"cheap"``, ``"all"`` or baseline names
        (:func:`~instructcell.evaluation.baselines.parse_baseline_choice`).
    baseline_options : dict of str to dict
        Keyword arguments per baseline (``{"scvi": {"max_epochs": 50}, "celltypist": {"use_sgd": True}}``).
    markers_per_label : int
        Generation: marker genes per label in the dot plots.
    marker_method : str
        ``scanpy.tl.rank_genes_groups`` method ranking the marker genes on the real test cells.
    requests : bool
        Record the first request of every task answered in natural language (the report's requests section).
    progress : bool
        Show progress bars.
    """

    seed: int = 0
    max_test_cells: int | None = 500
    batch_size: int = 64
    max_new_tokens: int = 32
    request_max_new_tokens: int = 16
    max_generated_per_label: int = 200
    generated_per_request: int = 1
    baselines: str | tuple[str, ...] = "cheap"
    baseline_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    markers_per_label: int = 3
    marker_method: str = "t-test"
    requests: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.baselines = parse_baseline_choice(self.baselines)
        unknown = sorted(set(self.baseline_options) - set(BASELINES))
        if unknown:
            raise ValueError(f"Options for unknown baseline(s) {unknown}; known: {', '.join(BASELINES)}.")
        for name in ("batch_size", "max_new_tokens", "request_max_new_tokens", "markers_per_label"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_generated_per_label < 1 or self.generated_per_request < 1:
            raise ValueError("max_generated_per_label and generated_per_request must be at least 1.")
        if self.max_test_cells is not None and self.max_test_cells < 1:
            raise ValueError(f"max_test_cells must be at least 1, got {self.max_test_cells}.")


@dataclass
class Evaluation:
    """One run's data, models and settings, and what the evaluators collect for its report.

    Parameters
    ----------
    train, test : SplitRows
        The built dataset's training and test rows.
    variant : {"instruct", "chat"}
        Variant whose rows define the test cells and requests (a model of another variant is asked the same
        cells in its own variant's words).
    genes : list of str
        ``(n_genes,)`` the dataset's gene vocabulary (the models').
    models : sequence of Candidate
        The models under evaluation (none: baselines only).
    settings : ScoringSettings
    report : ReportFolder
        Where figures go.
    embedding_factory : callable
        Returns an unfitted embedding per generation dataset (``fit``, ``transform``, ``real_embedding_``).
    template_bank : path, optional
        The bank the dataset was built with (chat-variant scoring; default the shipped bank).

    Attributes
    ----------
    methods : dict
        ``run["methods"]`` of ``metrics.json``: every model and baseline that produced scores.
    skipped : dict of str to str
        Baselines that could not run, and why.
    requests : list of dict
        The requests section (one per task), when ``settings.requests``.
    """

    train: SplitRows
    test: SplitRows
    variant: str
    genes: list[str]
    models: Sequence[Candidate]
    settings: ScoringSettings
    report: ReportFolder
    embedding_factory: Callable[[], Any] = ReferenceEmbedding
    template_bank: str | os.PathLike | None = None
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    _templates: tuple[TemplateBank, dict[tuple[str, str], Template]] | None = field(
        default=None, init=False, repr=False
    )

    def __post_init__(self) -> None:
        for candidate in self.models:
            for method in candidate.methods:
                self.methods[candidate.key(method)] = candidate.description

    def model_rows(
        self, candidate: Candidate, task: Task, dataset: str, rows: datasets.Dataset
    ) -> datasets.Dataset:
        """Return the rows of ``rows``' cells (same order) in the candidate's variant."""
        if candidate.variant == self.variant:
            return rows
        return self.test.matching(task.name, dataset, candidate.variant, rows["cell_id"])

    def templates(self) -> tuple[TemplateBank, dict[tuple[str, str], Template]]:
        """Return the template bank and its ``(id, variant)`` lookup, loaded once."""
        if self._templates is None:
            bank = TemplateBank.load(self.template_bank or DEFAULT_BANK_DIR)
            self._templates = bank, template_lookup(bank)
        return self._templates

    def answers(self, candidate: Candidate, method: str, rows: datasets.Dataset) -> list[list[str]] | None:
        """Per row, each choice's whole answer text to score (chat variant, ``score``); None otherwise."""
        if candidate.variant == "instruct" or method != "score":
            return None
        return rows_answer_texts(rows, self.templates()[1])

    def baselines(self, task: Task) -> list[Baseline]:
        """Return the task's selected baselines that can run here (registered in :attr:`methods`)."""
        chosen = choose_baselines(task, self.settings.baselines, self.skipped)
        for baseline in chosen:
            self.methods[baseline.name] = {
                "kind": "baseline",
                "title": baseline.title,
                "description": baseline.description,
            }
        return chosen

    def run_baseline(self, baseline: Baseline, cells: Any) -> tuple[Any, dict[str, Any]]:
        """Run one baseline with its options: its output, and ``seconds`` and ``details`` for its scores."""
        options = self.settings.baseline_options.get(baseline.name, {})
        (output, details), seconds = timed(baseline.run, cells, seed=self.settings.seed, **options)
        return output, {"seconds": round(seconds, 2), **({"details": details} if details else {})}

    def wants_request(self, task: Task) -> bool:
        """Whether the requests section still lacks an example of ``task`` (and there is a model to ask)."""
        return (
            self.settings.requests
            and bool(self.models)
            and all(r["task"] != task.name for r in self.requests)
        )
