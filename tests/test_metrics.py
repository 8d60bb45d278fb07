"""Metrics against hand-computed cases; the evaluate modules load offline and agree with the functions."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the evaluate modules import `instructcell.evaluation.metrics`
    sys.path.insert(0, str(ROOT))

from instructcell.evaluation.metrics import (  # noqa: E402
    ReferenceEmbedding,
    cell_classification_metrics,
    cell_generation_metrics,
    embedding_metrics,
    gaussian_mmd,
    knn_bandwidth,
    mmd_gammas,
    normalize_log1p,
    pknn,
    sknn,
)

S1 = math.exp(-2) + math.exp(-1) + math.exp(-0.5)  # sum_i exp(-gamma_i * d^2) for d^2 = 1, w = 1


# ----------------------------------------------------------------------------- classification
def test_classification_by_hand():
    # answered: (A,A) (A,A) (B,A) (B,B); unanswered: None for a B.
    # class A: TP 2, FP 0, FN 1 -> F1 0.8 ; class B: TP 1, FP 1, FN 0 -> F1 2/3
    out = cell_classification_metrics(["A", "A", "B", "B", None], ["A", "A", "A", "B", "B"])
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["answered_rate"] == pytest.approx(4 / 5)
    assert out["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert out["weighted_f1"] == pytest.approx((3 * 0.8 + 1 * 2 / 3) / 4)


def test_classification_blank_and_out_of_label_set():
    preds, refs = ["A", "  ", "C", "B"], ["A", "A", "B", "B"]
    free = cell_classification_metrics(preds, refs)  # "C" is an answer (a wrong one)
    assert free["answered_rate"] == pytest.approx(3 / 4)
    assert free["accuracy"] == pytest.approx(2 / 4)
    # answered y_true [A, B, B], y_pred [A, C, B]: F1 A = 1, B = 2/3, C = 0
    assert free["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    strict = cell_classification_metrics(preds, refs, labels=["A", "B"])  # "C" is not a valid answer
    assert strict == {"accuracy": 0.5, "macro_f1": 1.0, "weighted_f1": 1.0, "answered_rate": 0.5}


def test_classification_nothing_answered_and_errors():
    assert cell_classification_metrics([None, ""], ["A", "B"]) == {
        "accuracy": 0.0,
        "macro_f1": 0.0,
        "weighted_f1": 0.0,
        "answered_rate": 0.0,
    }
    with pytest.raises(ValueError, match="one prediction per"):
        cell_classification_metrics(["A"], ["A", "B"])
    with pytest.raises(ValueError, match="not in `labels`"):
        cell_classification_metrics(["A"], ["Z"], labels=["A"])


# ----------------------------------------------------------------------------- MMD and bandwidth
def test_mmd_gammas():
    assert mmd_gammas(2.0) == pytest.approx((0.5, 0.25, 0.125))  # 1 / (2^(i-2) w^2), i = 1, 2, 3


def test_mmd_two_points_by_hand():
    # k(x,x) = 3 for every kernel sum; k(0,1) = S1 -> MMD = 3 + 3 - 2 S1
    assert gaussian_mmd(np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]), width=1.0) == pytest.approx(
        6 - 2 * S1
    )


def test_mmd_unequal_sets_by_hand():
    # G = {0, 1}, R = {0}: mean K_GG = (2*3 + 2*S1)/4, K_RR = 3, mean K_GR = (3 + S1)/2
    expected = (6 + 2 * S1) / 4 + 3 - (3 + S1)
    assert gaussian_mmd(np.array([[0.0], [1.0]]), np.array([[0.0]]), width=1.0) == pytest.approx(expected)


def test_mmd_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(20, 2))
    assert gaussian_mmd(x, x.copy(), width=0.7) == pytest.approx(0.0, abs=1e-12)


def test_bandwidth_is_median_of_per_cell_mean_neighbour_distance():
    # 2 neighbours: 0 -> (1, 3) mean 2; 1 -> (1, 2) 1.5; 3 -> (2, 3) 2.5; 7 -> (4, 6) 5 -> median 2.25
    # (the median of all 8 distances would be 2.5)
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert knn_bandwidth(points, n_neighbors=2) == pytest.approx(2.25)
    assert knn_bandwidth(points, n_neighbors=1) == pytest.approx(1.5)  # means 1, 1, 2, 4


# ----------------------------------------------------------------------------- sKNN / pKNN
LINE = np.array([[0.0], [1.0], [3.0], [7.0]])
LINE_LABELS = ["a", "a", "b", "b"]


def test_sknn_by_hand():
    # k=1: 0->1 ok, 1->0 ok, 3->1 wrong, 7->3 ok: 3/4
    assert sknn(LINE, LINE_LABELS, k=1) == pytest.approx(0.75)
    # k=2: 0->{1,3} 1/2, 1->{0,3} 1/2, 3->{1,0} 0, 7->{3,1} 1/2: 1.5/4
    assert sknn(LINE, LINE_LABELS, k=2) == pytest.approx(0.375)
    # k larger than the set is clipped to n - 1 = 3: 0->{1,3,7} 1/3, 1->1/3, 3->1/3, 7->1/3
    assert sknn(LINE, LINE_LABELS, k=50) == pytest.approx(1 / 3)


def test_pknn_by_hand():
    real = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0]])
    real_labels = ["a", "a", "b", "b"]
    generated = np.array([[0.5, 0.0], [10.5, 0.0], [9.0, 0.0]])
    # nearest real neighbours: a, b, b; the second generated cell was meant to be an "a"
    assert pknn(generated, ["a", "a", "b"], real, real_labels, k=1) == pytest.approx(2 / 3)
    assert pknn(generated, ["a", "a", "b"], real, real_labels, k=2) == pytest.approx(2 / 3)


def _two_clusters(n=30, seed=0, dims=2):
    rng = np.random.default_rng(seed)
    x = np.vstack([rng.normal(0, 1, (n, dims)), rng.normal(20, 1, (n, dims))])
    return x, np.array(["a"] * n + ["b"] * n)


def test_embedding_metrics_generated_equals_real():
    x, labels = _two_clusters()
    out = embedding_metrics(x, labels, x.copy(), labels, ks=(5, 10, 25))
    assert out["mmd"] == pytest.approx(0.0, abs=1e-12)
    for k in (5, 10, 25):
        assert out[f"delta_sknn_k{k}"] == 0.0
        assert out[f"sknn_generated_k{k}"] == out[f"sknn_real_k{k}"] == 1.0
        assert out[f"pknn_k{k}"] == 1.0
    assert out["delta_sknn"] == 0.0 and out["pknn"] == 1.0
    assert out["bandwidth"] == pytest.approx(knn_bandwidth(x, 25))


def test_embedding_metrics_averages_per_k_and_detects_swapped_labels():
    x, labels = _two_clusters()
    gen, gen_labels = _two_clusters(seed=1)
    swapped = np.where(gen_labels == "a", "b", "a")
    out = embedding_metrics(gen, swapped, x, labels, ks=(5, 50), bandwidth=1.0)
    assert out["pknn_k5"] == 0.0 and out["pknn"] == 0.0  # every generated cell lands in the other cluster
    assert out["sknn_generated"] == pytest.approx(
        np.mean([out["sknn_generated_k5"], out["sknn_generated_k50"]])
    )
    assert out["delta_sknn"] == pytest.approx(np.mean([out["delta_sknn_k5"], out["delta_sknn_k50"]]))
    # k=50 > cluster size 30: 29 own-cluster neighbours out of 50 for every cell, in both sets
    assert out["sknn_real_k50"] == pytest.approx(29 / 50)
    assert out["bandwidth"] == 1.0


# ----------------------------------------------------------------------------- preprocessing
def test_normalize_log1p_dense_sparse_and_zero_cells():
    counts = np.array([[1.0, 3.0], [0.0, 0.0], [5.0, 5.0]])
    expected = np.log1p(np.array([[2500.0, 7500.0], [0.0, 0.0], [5000.0, 5000.0]]))
    np.testing.assert_allclose(normalize_log1p(counts), expected)
    np.testing.assert_allclose(normalize_log1p(sp.csr_matrix(counts)).toarray(), expected)
    np.testing.assert_allclose(normalize_log1p(counts, log_base=10), expected / np.log(10))
    with pytest.raises(ValueError, match="negative"):
        normalize_log1p(-counts)


# ----------------------------------------------------------------------------- full protocol (UMAP)
def _counts(n_per_label=80, seed=0):
    """Two cell types with 15 marker genes each (mean 40 vs 0.5) and 30 shared genes (mean 10)."""
    rng = np.random.default_rng(seed)
    alpha = np.r_[np.full(15, 40.0), np.full(15, 0.5), np.full(30, 10.0)]
    beta = np.r_[np.full(15, 0.5), np.full(15, 40.0), np.full(30, 10.0)]
    counts = np.vstack([rng.poisson(alpha, (n_per_label, 60)), rng.poisson(beta, (n_per_label, 60))])
    return counts, np.array(["alpha"] * n_per_label + ["beta"] * n_per_label)


@pytest.fixture(scope="module")
def protocol():
    real, real_labels = _counts(seed=0)
    gen, gen_labels = _counts(seed=1)
    kwargs = dict(ks=(5, 10), random_state=0)
    good = cell_generation_metrics(gen, gen_labels, real, real_labels, **kwargs)
    return real, real_labels, gen, gen_labels, kwargs, good


def test_protocol_good_generator(protocol):
    *_, good = protocol
    assert good["pknn"] == 1.0
    assert good["delta_sknn"] < 0.02
    assert set(good) >= {"mmd", "delta_sknn", "pknn", "pknn_k5", "pknn_k10", "sknn_real_k10", "bandwidth"}


def test_protocol_deterministic_sparse_and_wrong_labels(protocol):
    real, real_labels, gen, gen_labels, kwargs, good = protocol
    again = cell_generation_metrics(
        sp.csr_matrix(gen), gen_labels, sp.csr_matrix(real), real_labels, **kwargs
    )
    assert again == good  # same seed, sparse input: identical numbers
    wrong = cell_generation_metrics(gen, gen_labels[::-1], real, real_labels, **kwargs)
    assert wrong["pknn"] == 0.0
    assert wrong["mmd"] == pytest.approx(good["mmd"])  # MMD ignores labels
    collapsed = np.vstack([gen[:80], gen[:80]])  # every generated cell looks like an "alpha" cell
    bad = cell_generation_metrics(collapsed, gen_labels, real, real_labels, **kwargs)
    assert bad["mmd"] > 1.3 * good["mmd"]
    assert bad["pknn"] == pytest.approx(0.5)


def test_reference_embedding_shares_one_fit(protocol):
    real, real_labels, gen, gen_labels, kwargs, good = protocol
    embedding = ReferenceEmbedding(random_state=0).fit(real)
    assert embedding.real_embedding_.shape == (len(real), 2)
    out = embedding_metrics(
        embedding.transform(gen), gen_labels, embedding.real_embedding_, real_labels, ks=(5, 10)
    )
    assert out == good
    with pytest.raises(ValueError, match="same columns"):
        embedding.transform(gen[:, :10])


def test_evaluate_modules_match_functions(protocol):
    evaluate = pytest.importorskip("evaluate")
    real, real_labels, gen, gen_labels, kwargs, good = protocol
    generation = evaluate.load(str(ROOT / "metrics" / "cell_generation"))
    generation.add_batch(predictions=sp.csr_matrix(gen[:50]), references=gen_labels[:50])
    result = generation.compute(
        predictions=gen[50:],
        references=gen_labels[50:],
        real_counts=sp.csr_matrix(real),
        real_labels=real_labels,
        **kwargs,
    )
    assert result == pytest.approx(good)
    classification = evaluate.load(str(ROOT / "metrics" / "cell_classification"))
    preds, refs = ["A", "A", "B", "B", None], ["A", "A", "A", "B", "B"]
    assert classification.compute(predictions=preds, references=refs) == cell_classification_metrics(
        preds, refs
    )


def test_evaluate_modules_load_offline(tmp_path):
    pytest.importorskip("evaluate")
    code = (
        "import evaluate, sys; root = sys.argv[1]\n"
        "m = evaluate.load(root + '/metrics/cell_classification')\n"
        "print(m.compute(predictions=['A', None], references=['A', 'B'], labels=['A', 'B']))\n"
        "g = evaluate.load(root + '/metrics/cell_generation'); print(type(g).__name__)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "'accuracy': 0.5" in done.stdout and "'answered_rate': 0.5" in done.stdout
    assert "CellGeneration" in done.stdout
