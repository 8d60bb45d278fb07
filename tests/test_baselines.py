"""The baselines registry: each baseline on separable toy cells; CellTypist and scVI when installed."""

import numpy as np
import pytest
import scipy.sparse as sp

from instructcell.evaluation.baselines import (
    BASELINES,
    ClassificationCells,
    choose_baselines,
    label_mean_cells,
    logistic_regression_predictions,
    parse_baseline_choice,
    reference_cells,
)
from instructcell.evaluation.generation_evaluator import requested_counts
from instructcell.evaluation.optional_baselines import OneVsRestLogisticRegression
from instructcell.tasks import TASKS

N_GENES = 12


def _cells(labels, seed=0):
    """Counts whose mean depends on the label: label k is high on genes 4k..4k+3."""
    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    means = np.ones((len(labels), N_GENES))
    for i, label in enumerate(labels):
        k = names.index(label)
        means[i, 4 * k : 4 * k + 4] = 20.0
    return sp.csr_matrix(rng.poisson(means).astype(np.float32))


@pytest.fixture
def training():
    labels = ["A"] * 40 + ["B"] * 40 + ["C"] * 40
    return _cells(labels), labels


def test_label_mean_cells_follow_the_label_means(training):
    counts, labels = training
    generated, generated_labels = label_mean_cells(counts, labels, {"B": 400, "A": 300, "unknown": 5}, seed=0)
    assert generated_labels == ["A"] * 300 + ["B"] * 400  # sorted labels, unknown ones left out
    assert generated.shape == (700, N_GENES)
    dense = generated.toarray()
    assert np.all(dense >= 0) and np.all(dense == np.round(dense))
    truth = np.asarray(counts.toarray())
    for label, rows in (("A", slice(0, 300)), ("B", slice(300, 700))):
        mean = truth[np.asarray(labels) == label].mean(0)
        np.testing.assert_allclose(dense[rows].mean(0), mean, atol=1.0)
    # Poisson around one centroid: per-gene variance ~ mean, far below the real cells' spread between labels
    assert np.allclose(dense[:300].var(0), dense[:300].mean(0), rtol=0.35)


def test_label_mean_cells_are_seeded_and_handle_nothing(training):
    counts, labels = training
    first, _ = label_mean_cells(counts, labels, {"A": 5}, seed=3)
    again, _ = label_mean_cells(counts, labels, {"A": 5}, seed=3)
    other, _ = label_mean_cells(counts, labels, {"A": 5}, seed=4)
    assert (first != again).nnz == 0 and (first != other).nnz > 0
    assert label_mean_cells(counts, labels, {"Z": 3}) == (None, [])
    with pytest.raises(ValueError, match="labels"):
        label_mean_cells(counts, labels[:-1], {"A": 1})


def test_reference_cells_are_real_training_cells_of_the_requested_labels(training):
    counts, labels = training
    dense = counts.toarray()
    requested = requested_counts(["C", "A", "C"], generated_per_request=25)
    assert requested == {"A": 25, "C": 50}
    reference, reference_labels = reference_cells(counts, labels, {**requested, "Z": 3}, seed=0)
    assert reference_labels == ["A"] * 25 + ["C"] * 50
    real = {tuple(row) for row in dense}
    assert all(tuple(row) in real for row in reference.toarray())
    assert len({tuple(row) for row in reference.toarray()[:25]}) == 25  # without replacement when possible


def test_one_vs_rest_logistic_regression_stacks_binary_fits(training):
    from sklearn.linear_model import LogisticRegression

    counts, labels = training
    x = np.log1p(counts.toarray())
    y = np.asarray(labels)
    model = OneVsRestLogisticRegression(C=1.0, max_iter=500, multi_class="ovr", n_jobs=1).fit(x, y)
    assert list(model.classes_) == ["A", "B", "C"] and model.coef_.shape == (3, N_GENES)
    binary_b = LogisticRegression(C=1.0, max_iter=500).fit(x, (y == "B").astype(int))
    np.testing.assert_allclose(model.coef_[1], binary_b.coef_[0], rtol=1e-4, atol=1e-6)
    assert (model.predict(x) == y).mean() == 1.0
    two = OneVsRestLogisticRegression(max_iter=500).fit(x[:80], y[:80])
    plain = LogisticRegression(max_iter=500).fit(x[:80], y[:80])
    np.testing.assert_allclose(two.coef_, plain.coef_, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="ovr"):
        OneVsRestLogisticRegression(multi_class="multinomial").fit(x, y)


def test_celltypist_predicts_separable_labels(training):
    pytest.importorskip("celltypist")
    from instructcell.evaluation.optional_baselines import celltypist_predictions

    counts, labels = training
    test_labels = ["C", "A", "B"] * 4
    test = _cells(test_labels, seed=1)
    genes = [f"GENE{i}" for i in range(N_GENES)]
    predictions = celltypist_predictions(counts, labels, test, genes)
    assert predictions == test_labels
    with pytest.raises(ValueError, match="same genes"):
        celltypist_predictions(counts, labels, test[:, :-1], genes)


def test_scvi_samples_requested_labels_from_its_prior(training):
    pytest.importorskip("scvi")
    from instructcell.evaluation.optional_baselines import train_scvi

    counts, labels = training
    counts = sp.csr_matrix(counts.toarray() * (np.arange(N_GENES) < N_GENES - 1))  # last gene: no counts
    # 400 steps: enough for the decoder to carry the label through its covariate (z is drawn from N(0, I))
    generator = train_scvi(counts, labels, max_epochs=400, seed=0)
    assert generator.labels == ["A", "B", "C"] and generator.epochs == 400
    # a gene without counts is left out of the model and never generated
    assert N_GENES - 1 not in generator.genes and generator.final_elbo is not None
    cells, cell_labels = generator.sample({"C": 30, "A": 30, "unknown": 2}, seed=0)
    assert cell_labels == ["A"] * 30 + ["C"] * 30 and cells.shape == (60, N_GENES)
    dense = cells.toarray()
    assert np.all(dense >= 0) and np.all(dense == np.round(dense)) and not dense[:, N_GENES - 1].any()
    # conditioned on the label: A is high on genes 0-3, C on genes 8-10
    assert dense[:30, 0:4].mean() > 2 * dense[:30, 8:11].mean()
    assert dense[30:, 8:11].mean() > 2 * dense[30:, 0:4].mean()
    again, _ = generator.sample({"C": 30, "A": 30}, seed=0)
    assert (again != cells).nnz == 0


def test_logistic_regression_labels_separable_cells(training):
    counts, labels = training
    test_labels = ["C", "A", "B"] * 4
    assert logistic_regression_predictions(counts, labels, _cells(test_labels, seed=1)) == test_labels
    cells = ClassificationCells(
        counts, labels, _cells(test_labels, seed=1), [f"GENE{i}" for i in range(N_GENES)]
    )
    predictions, details = BASELINES["logistic_regression"].run(cells, seed=0)
    assert predictions == test_labels and details == {}


def test_every_task_names_registered_baselines_of_its_family():
    for task in TASKS.values():
        assert task.baselines, task.name
        for name in task.baselines:
            assert BASELINES[name].family == task.metric_family, (task.name, name)


def test_choose_baselines_cheap_all_names_and_missing_installs(monkeypatch):
    generation = next(task for task in TASKS.values() if "scvi" in task.baselines)
    skipped = {}
    cheap = [b.name for b in choose_baselines(generation, "cheap", skipped)]
    assert cheap == [n for n in generation.baselines if BASELINES[n].cheap] and "scvi" not in cheap
    assert [b.name for b in choose_baselines(generation, ("reference",), skipped)] == ["reference"]
    assert choose_baselines(generation, "none", skipped) == [] and skipped == {}
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # no optional install
    everything = [b.name for b in choose_baselines(generation, "all", skipped)]
    assert "scvi" not in everything and "reference" in everything
    assert skipped == {"scvi": 'scvi-tools is not installed (pip install -e ".[bench]")'}
    assert parse_baseline_choice("reference, label_mean") == ("reference", "label_mean")
    with pytest.raises(ValueError, match="Unknown baseline"):
        parse_baseline_choice("forest")
