"""The baselines registry: what runs beside the model, one entry per baseline, picked from ``task.baselines``.

Each :class:`Baseline` belongs to one metric family and is trained in the same run on the same training cells
as the model is scored on:

* ``classification``: fitted on the training cells and their labels, it labels the test cells
  (:class:`ClassificationCells` in, one label per test cell out);
* ``generation``: given the training cells and the cells requested per label, it returns cells over the same
  genes with their labels (:class:`GenerationCells` in); labels without training cells are left out;
* ``perturbation``: given the training pairs (control -> perturbed cell) and the query control cells with
  their cell types and perturbations, it returns one predicted perturbed cell per query cell, as
  log-normalized expression (:class:`PerturbationCells` in);
* ``multicell``: fitted on the training cells and their labels, it gives every test cell's label probabilities
  (:class:`ClassificationCells` in, a cells x labels frame out); each multi-cell question is answered from
  the probabilities of its cells.

``logistic_regression``, ``logistic_regression_cells``, ``label_mean``, ``reference``, ``no_change`` and
``additive`` are cheap and always available; ``celltypist`` and ``scvi`` need optional installs
(:mod:`instructcell.evaluation.optional_baselines`) and are skipped, with the reason recorded, when those are
missing.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from instructcell.tasks import Task

from .cells import sparse_cells
from .metrics.generation import normalize_log1p

__all__ = [
    "BASELINES",
    "Baseline",
    "ClassificationCells",
    "GenerationCells",
    "PerturbationCells",
    "additive_shift_cells",
    "choose_baselines",
    "label_mean_cells",
    "logistic_regression_predictions",
    "logistic_regression_probabilities",
    "parse_baseline_choice",
    "reference_cells",
]


@dataclass
class ClassificationCells:
    """What a classification baseline sees: labelled training cells and the test cells to label.

    Attributes
    ----------
    train_counts : scipy.sparse.csr_matrix
        ``(n_train, n_genes)`` raw counts.
    train_labels : list of str
        ``(n_train,)`` labels.
    test_counts : scipy.sparse.csr_matrix
        ``(n_test, n_genes)`` raw counts over the same genes.
    genes : list of str
        ``(n_genes,)`` gene names.
    """

    train_counts: sp.csr_matrix
    train_labels: list[str]
    test_counts: sp.csr_matrix
    genes: list[str]

    @classmethod
    def from_rows(
        cls, train_rows: datasets.Dataset, test_rows: datasets.Dataset, genes: Sequence[str]
    ) -> ClassificationCells:
        """Read the input cells of builder rows (``n_genes = len(genes)``)."""
        n_genes = len(genes)
        return cls(
            sparse_cells(train_rows, "input", n_genes),
            list(train_rows["label"]),
            sparse_cells(test_rows, "input", n_genes),
            list(genes),
        )


@dataclass
class GenerationCells:
    """What a generation baseline sees: labelled training cells and the cells requested per label.

    Attributes
    ----------
    train_counts : scipy.sparse.csr_matrix
        ``(n_train, n_genes)`` raw counts.
    train_labels : list of str
        ``(n_train,)`` labels.
    requested : dict of str to int
        Label -> cells to generate.
    genes : list of str
        ``(n_genes,)`` gene names.
    """

    train_counts: sp.csr_matrix
    train_labels: list[str]
    requested: dict[str, int]
    genes: list[str]


@dataclass
class PerturbationCells:
    """What a perturbation baseline sees: training pairs and the control cells to predict from.

    Attributes
    ----------
    train_controls, train_perturbed : scipy.sparse.csr_matrix
        ``(n_train, n_genes)`` raw counts of the training rows' control (input) and perturbed (target) cells.
    train_labels, train_perturbations : list of str
        ``(n_train,)`` cell type and perturbation of every training row.
    query_controls : scipy.sparse.csr_matrix
        ``(n_query, n_genes)`` raw counts of the control cells to predict from.
    query_labels, query_perturbations : list of str
        ``(n_query,)`` their cell types and the perturbations asked for.
    genes : list of str
        ``(n_genes,)`` gene names.
    """

    train_controls: sp.csr_matrix
    train_perturbed: sp.csr_matrix
    train_labels: list[str]
    train_perturbations: list[str]
    query_controls: sp.csr_matrix
    query_labels: list[str]
    query_perturbations: list[str]
    genes: list[str]

    @classmethod
    def from_rows(
        cls, train_rows: datasets.Dataset, query_rows: datasets.Dataset, genes: Sequence[str]
    ) -> PerturbationCells:
        """Read training pairs and query control cells from builder rows (``n_genes = len(genes)``)."""
        n_genes = len(genes)
        return cls(
            sparse_cells(train_rows, "input", n_genes),
            sparse_cells(train_rows, "target", n_genes),
            list(train_rows["label"]),
            list(train_rows["perturbation"]),
            sparse_cells(query_rows, "input", n_genes),
            list(query_rows["label"]),
            list(query_rows["perturbation"]),
            list(genes),
        )


#: A baseline's output: labels (classification) or ``(counts or None, labels)`` (generation), and details
#: worth reporting (e.g. training epochs).
BaselineOutput = tuple[Any, dict[str, Any]]


@dataclass(frozen=True)
class Baseline:
    """One baseline of the registry.

    Parameters
    ----------
    name : str
        Registry key, as in :attr:`instructcell.tasks.Task.baselines` and ``metrics.json``.
    title : str
        Name in reports.
    family : {"classification", "generation", "multicell"}
        The metric family it is scored with.
    description : str
        One sentence for the report: what it is and how it was fitted.
    cheap : bool
        Runs by default in ``instructcell evaluate`` and the demo (seconds, no optional install).
    run : callable
        ``run(cells, seed=..., **options) -> (output, details)`` with :class:`ClassificationCells` or
        :class:`GenerationCells`.
    requires : tuple of (str, str), optional
        ``(module, pip package)`` of an optional install.
    """

    name: str
    title: str
    family: str
    description: str
    cheap: bool
    run: Callable[..., BaselineOutput]
    requires: tuple[str, str] | None = None

    def missing(self) -> str | None:
        """Why the baseline cannot run here (its optional install is missing), or None."""
        if self.requires is None or importlib.util.find_spec(self.requires[0]) is not None:
            return None
        return f'{self.requires[1]} is not installed (pip install -e ".[bench]")'


def logistic_regression_predictions(
    train_counts: sp.spmatrix, train_labels: Sequence[str], test_counts: sp.spmatrix, seed: int = 0
) -> list[str]:
    """Fit scikit-learn's LogisticRegression on log-normalized training counts and label the test cells.

    Parameters
    ----------
    train_counts, test_counts : scipy.sparse matrix
        ``(n_train, n_genes)`` and ``(n_test, n_genes)`` raw counts.
    train_labels : sequence of str
        ``(n_train,)`` labels.
    seed : int
        ``random_state`` of the model.

    Returns
    -------
    list of str
        ``(n_test,)`` predicted labels.
    """
    model = _fit_logistic_regression(train_counts, train_labels, seed)
    return list(model.predict(normalize_log1p(test_counts)))


def _fit_logistic_regression(
    train_counts: sp.spmatrix, train_labels: Sequence[str], seed: int
) -> LogisticRegression:
    model = LogisticRegression(max_iter=2000, random_state=seed)
    return model.fit(normalize_log1p(train_counts), list(train_labels))


def logistic_regression_probabilities(
    train_counts: sp.spmatrix, train_labels: Sequence[str], test_counts: sp.spmatrix, seed: int = 0
) -> pd.DataFrame:
    """Fit the logistic regression of :func:`logistic_regression_predictions`; return the label probabilities.

    Returns
    -------
    pandas.DataFrame
        ``(n_test, n_labels)``: one column per training label (sorted), rows summing to 1.
    """
    model = _fit_logistic_regression(train_counts, train_labels, seed)
    return pd.DataFrame(model.predict_proba(normalize_log1p(test_counts)), columns=list(model.classes_))


def _label_rows(labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Row indices of every label."""
    labels = np.asarray(labels).astype(str)
    return {label: np.flatnonzero(labels == label) for label in np.unique(labels)}


def label_mean_cells(
    train_counts: sp.spmatrix | np.ndarray,
    train_labels: Sequence[str],
    requested: Mapping[str, int],
    seed: int = 0,
) -> tuple[sp.csr_matrix | None, list[str]]:
    """Generate every cell as a Poisson sample of its label's mean training profile.

    A generator that collapses each label onto its centroid: it gets the labels right (high pKNN) but has
    none of the within-type variation of real cells, which the MMD and sKNN should expose.

    Parameters
    ----------
    train_counts : scipy.sparse matrix or numpy.ndarray
        ``(n_train, n_genes)`` raw training counts.
    train_labels : sequence of str
        ``(n_train,)`` labels.
    requested : mapping of str to int
        Cells to generate per label (visited in sorted order, so seeded draws are reproducible).
    seed : int
        Seed of the Poisson draws.

    Returns
    -------
    counts : scipy.sparse.csr_matrix or None
        ``(sum of requested, n_genes)`` integer-valued float32 counts; None when no label has training cells.
    labels : list of str
        The label of every generated cell.
    """
    counts = sp.csr_matrix(train_counts, dtype=np.float64)
    if len(train_labels) != counts.shape[0]:
        raise ValueError(f"Got {len(train_labels)} labels for {counts.shape[0]} training cells.")
    rows = _label_rows(train_labels)
    rng = np.random.default_rng(seed)
    blocks, labels = [], []
    for label, n in sorted(requested.items()):
        if label not in rows or n < 1:
            continue
        mean = np.asarray(counts[rows[label]].mean(axis=0)).ravel()
        blocks.append(sp.csr_matrix(rng.poisson(mean, size=(n, mean.size)).astype(np.float32)))
        labels += [label] * n
    return (sp.vstack(blocks).tocsr() if blocks else None), labels


def reference_cells(
    train_counts: sp.spmatrix, train_labels: Sequence[str], requested: Mapping[str, int], seed: int = 0
) -> tuple[sp.csr_matrix | None, list[str]]:
    """Draw real training cells of the requested labels, as many per label as requested.

    What a perfect generator would return. Cells are drawn without replacement, or with replacement when a
    label has fewer training cells.

    Parameters
    ----------
    train_counts : scipy.sparse matrix
        ``(n_train, n_genes)`` raw counts.
    train_labels : sequence of str
        ``(n_train,)`` labels.
    requested : mapping of str to int
        Label -> number of cells (visited in sorted order).
    seed : int
        Seed of the draw.

    Returns
    -------
    cells : scipy.sparse.csr_matrix or None
        ``(n_drawn, n_genes)`` counts; None when no requested label has training cells.
    labels : list of str
        ``(n_drawn,)`` their labels.
    """
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(train_labels):
        by_label[label].append(i)
    picks: list[int] = []
    labels: list[str] = []
    for label, count in sorted(requested.items()):
        pool = by_label.get(label, [])
        if not pool:
            continue
        chosen = rng.choice(pool, size=count, replace=count > len(pool))
        picks += chosen.tolist()
        labels += [label] * count
    if not picks:
        return None, []
    return sp.csr_matrix(train_counts)[picks], labels


def additive_shift_cells(
    cells: PerturbationCells, seed: int = 0
) -> tuple[np.ndarray, dict[str, dict[str, list[str]]]]:
    """Control cells plus the mean perturbation shift of the training cell types (the linear baseline).

    In log-normalized expression, the shift of perturbation ``p`` is the average over the training cell types
    with rows of ``p`` of ``mean(perturbed) - mean(paired controls)``: a query cell type never seen perturbed
    gets the other types' average response. Values are clipped at 0 (no negative expression).

    Parameters
    ----------
    cells : PerturbationCells
    seed : int
        Unused (the baseline is deterministic); part of every baseline's signature.

    Returns
    -------
    predicted : numpy.ndarray
        ``(n_query, n_genes)`` log-normalized expression.
    details : dict
        ``{"shift_cell_types": {perturbation: [cell types averaged]}}``.
    """
    controls = normalize_log1p(cells.train_controls)
    perturbed = normalize_log1p(cells.train_perturbed)
    labels = np.asarray(cells.train_labels).astype(str)
    perturbations = np.asarray(cells.train_perturbations).astype(str)
    shifts: dict[str, np.ndarray] = {}
    used: dict[str, list[str]] = {}
    for perturbation in sorted(set(cells.query_perturbations)):
        types = sorted(set(labels[perturbations == perturbation].tolist()))
        if not types:
            raise ValueError(
                f"No training rows of perturbation {perturbation!r}: the additive baseline has no shift."
            )
        per_type = []
        for cell_type in types:
            rows = np.flatnonzero((perturbations == perturbation) & (labels == cell_type))
            mean_perturbed = np.asarray(perturbed[rows].mean(axis=0)).ravel()
            per_type.append(mean_perturbed - np.asarray(controls[rows].mean(axis=0)).ravel())
        shifts[perturbation] = np.mean(per_type, axis=0)
        used[perturbation] = types
    predicted = np.asarray(normalize_log1p(cells.query_controls).toarray())
    for perturbation, shift in shifts.items():
        rows = np.asarray(cells.query_perturbations) == perturbation
        predicted[rows] += shift
    return np.clip(predicted, 0.0, None), {"shift_cell_types": used}


def _run_no_change(cells: PerturbationCells, seed: int = 0) -> BaselineOutput:
    return np.asarray(normalize_log1p(cells.query_controls).toarray()), {}


def _run_additive(cells: PerturbationCells, seed: int = 0) -> BaselineOutput:
    return additive_shift_cells(cells, seed)


def _run_logistic_regression(cells: ClassificationCells, seed: int = 0) -> BaselineOutput:
    return logistic_regression_predictions(
        cells.train_counts, cells.train_labels, cells.test_counts, seed
    ), {}


def _run_logistic_regression_cells(cells: ClassificationCells, seed: int = 0) -> BaselineOutput:
    return logistic_regression_probabilities(
        cells.train_counts, cells.train_labels, cells.test_counts, seed
    ), {}


def _run_celltypist(cells: ClassificationCells, seed: int = 0, use_sgd: bool = False) -> BaselineOutput:
    from .optional_baselines import celltypist_predictions

    predictions = celltypist_predictions(
        cells.train_counts, cells.train_labels, cells.test_counts, cells.genes, use_sgd=use_sgd, seed=seed
    )
    return predictions, {"mode": "sgd" if use_sgd else "lr"}


def _run_label_mean(cells: GenerationCells, seed: int = 0) -> BaselineOutput:
    return label_mean_cells(cells.train_counts, cells.train_labels, cells.requested, seed=seed), {}


def _run_reference(cells: GenerationCells, seed: int = 0) -> BaselineOutput:
    return reference_cells(cells.train_counts, cells.train_labels, cells.requested, seed=seed), {}


def _run_scvi(cells: GenerationCells, seed: int = 0, max_epochs: int = 200) -> BaselineOutput:
    from .optional_baselines import train_scvi

    generator = train_scvi(cells.train_counts, cells.train_labels, max_epochs=max_epochs, seed=seed)
    generated = generator.sample(cells.requested, seed=seed)
    details = {
        "epochs": generator.epochs,
        "train_seconds": round(generator.train_seconds, 1),
        "final_elbo": generator.final_elbo,
        "genes_with_counts": int(generator.genes.size),
    }
    return generated, details


#: Every baseline by name.
BASELINES: dict[str, Baseline] = {
    baseline.name: baseline
    for baseline in (
        Baseline(
            "logistic_regression",
            "logistic regression",
            "classification",
            "scikit-learn's LogisticRegression on log-normalized counts (1e4 per cell, log1p).",
            cheap=True,
            run=_run_logistic_regression,
        ),
        Baseline(
            "logistic_regression_cells",
            "logistic regression, single-cell calls",
            "multicell",
            "the logistic regression's label probabilities of every cell of the question, fitted on the "
            "training cells; the question is answered from them as from the model's own single-cell calls.",
            cheap=True,
            run=_run_logistic_regression_cells,
        ),
        Baseline(
            "celltypist",
            "CellTypist",
            "classification",
            "a CellTypist model trained on the training cells (one-vs-rest L2 logistic regression, or SGD).",
            cheap=False,
            run=_run_celltypist,
            requires=("celltypist", "celltypist"),
        ),
        Baseline(
            "scvi",
            "scVI",
            "generation",
            "scVI trained on the training cells with the label as its batch covariate; cells sampled from "
            "its prior (z ~ N(0, I), per-label library-size prior).",
            cheap=False,
            run=_run_scvi,
            requires=("scvi", "scvi-tools"),
        ),
        Baseline(
            "label_mean",
            "per-label mean",
            "generation",
            "Poisson samples of each label's mean training profile (collapses every label onto its "
            "centroid).",
            cheap=True,
            run=_run_label_mean,
        ),
        Baseline(
            "reference",
            "reference (real training cells)",
            "generation",
            "real training cells of the requested labels, as many per label: what a perfect generator "
            "would score (closeness to it is the goal, not the maximum).",
            cheap=True,
            run=_run_reference,
        ),
        Baseline(
            "no_change",
            "no change",
            "perturbation",
            "the control cells themselves: a prediction that the perturbation changes nothing.",
            cheap=True,
            run=_run_no_change,
        ),
        Baseline(
            "additive",
            "additive",
            "perturbation",
            "each control cell plus the mean perturbed - control shift (log-normalized) of the training cell "
            "types, averaged over types: the linear baseline.",
            cheap=True,
            run=_run_additive,
        ),
    )
}


def parse_baseline_choice(text: str | Sequence[str] | None) -> str | tuple[str, ...]:
    """``"cheap"``, ``"all"``, ``"none"`` or comma-separated baseline names (checked) -> a choice.

    Returns
    -------
    str or tuple of str
        ``"cheap"`` or ``"all"``, else the names (empty for ``"none"`` or "").
    """
    if text in ("cheap", "all"):
        return text
    if text is None or text == "none":
        return ()
    names = tuple(n.strip() for n in text.split(",")) if isinstance(text, str) else tuple(text)
    names = tuple(n for n in names if n)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(
            f"Unknown baseline(s) {unknown}: choose 'cheap', 'all', 'none' or among {', '.join(BASELINES)}."
        )
    return names


def choose_baselines(task: Task, choice: str | Sequence[str], skipped: dict[str, str]) -> list[Baseline]:
    """Pick the task's baselines (``task.baselines``, in order) selected by ``choice`` that can run here.

    Parameters
    ----------
    task : Task
    choice : str or sequence of str
        ``"cheap"``, ``"all"`` or baseline names (:func:`parse_baseline_choice`).
    skipped : dict of str to str
        Selected baselines whose optional install is missing are added here with the reason.

    Returns
    -------
    list of Baseline

    Raises
    ------
    ValueError
        When the task names a baseline of another metric family.
    """
    choice = parse_baseline_choice(choice)
    chosen = []
    for name in task.baselines:
        baseline = BASELINES[name]
        if baseline.family != task.metric_family:
            raise ValueError(
                f"Task {task.name!r} ({task.metric_family}) names the {baseline.family} baseline {name!r}."
            )
        wanted = baseline.cheap if choice == "cheap" else choice == "all" or name in choice
        if not wanted:
            continue
        reason = baseline.missing()
        if reason:
            skipped[name] = reason
            continue
        chosen.append(baseline)
    return chosen
