"""Conditional pseudo-cell generation metrics: MMD, sKNN / ΔsKNN and pKNN (InstructCell protocol).

The protocol (paper arXiv 2501.08187 and the original evaluation script):

1. normalize every cell to ``target_sum`` counts, then ``log1p``;
2. PCA with 50 components **fitted on the real cells**; generated cells are projected with it;
3. UMAP to 2 dimensions **fitted on the real cells**; generated cells are mapped into it with
   ``umap.UMAP.transform``;
4. in that 2-D space: MMD with a sum of three Gaussian kernels, sKNN of each set, ΔsKNN and pKNN,
   the KNN metrics averaged over ``K in (5, 10, 25, 50)``.

Everything here takes plain arrays; :class:`ReferenceEmbedding` holds the fitted PCA + UMAP so that
several generators can be compared in the *same* embedding of the real cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

__all__ = [
    "DEFAULT_KS",
    "ReferenceEmbedding",
    "cell_generation_metrics",
    "compare_generators",
    "embedding_metrics",
    "gaussian_mmd",
    "knn_bandwidth",
    "mmd_gammas",
    "normalize_log1p",
    "pknn",
    "sknn",
]

DEFAULT_KS: tuple[int, ...] = (5, 10, 25, 50)

ArrayLike = Any  # numpy array, scipy sparse matrix, or anything np.asarray accepts


def _check_counts(counts: ArrayLike, name: str) -> np.ndarray | sp.csr_matrix:
    """Return ``counts`` as float64 dense array or CSR matrix after validating it."""
    if sp.issparse(counts):
        matrix = sp.csr_matrix(counts, dtype=np.float64)
        values = matrix.data
    else:
        matrix = np.asarray(counts, dtype=np.float64)
        values = matrix
    if matrix.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D (cells x genes) matrix, got shape {matrix.shape}.")
    if matrix.shape[0] == 0:
        raise ValueError(f"`{name}` has no cells; pass at least one row.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"`{name}` contains NaN or inf; replace them (e.g. by 0) before evaluating.")
    if np.any(values < 0):
        raise ValueError(f"`{name}` contains negative values; pass raw (non-negative) counts, not log data.")
    return matrix


def _check_labels(labels: Sequence[Any], n_cells: int, name: str) -> np.ndarray:
    labels = np.asarray(labels).astype(str)
    if labels.ndim != 1 or labels.shape[0] != n_cells:
        raise ValueError(
            f"`{name}` must hold one label per cell: got {labels.shape} labels for {n_cells} cells."
        )
    return labels


def normalize_log1p(
    counts: ArrayLike, target_sum: float = 1e4, log_base: float | None = None
) -> np.ndarray | sp.csr_matrix:
    """Scale each cell to ``target_sum`` total counts, then apply ``log1p``.

    Same as ``scanpy.pp.normalize_total(target_sum=...)`` followed by ``scanpy.pp.log1p(base=...)``.
    Cells with zero total counts (e.g. failed generations filled with zeros) stay all-zero.

    Parameters
    ----------
    counts : array-like or scipy.sparse matrix, shape (n_cells, n_genes)
        Non-negative counts.
    target_sum : float, default 1e4
        Total count of every cell after scaling.
    log_base : float, optional
        Base of the logarithm; ``None`` is the natural log (scanpy's default). The original
        InstructCell evaluation script used base 10.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix, shape (n_cells, n_genes)
        Float64 log-normalized values, sparse when the input is sparse.
    """
    matrix = _check_counts(counts, "counts")
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(matrix):
        out = sp.csr_matrix(sp.diags(scale) @ matrix)
        out.data = np.log1p(out.data)
        if log_base is not None:
            out.data /= np.log(log_base)
        return out
    out = np.log1p(matrix * scale[:, None])
    if log_base is not None:
        out /= np.log(log_base)
    return out


class ReferenceEmbedding:
    """PCA + UMAP fitted on real cells; maps any cell set (e.g. generated cells) into that space.

    Parameters
    ----------
    n_pcs : int, default 50
        PCA components (clipped to ``min(n_cells, n_genes) - 1``).
    umap_n_neighbors : int, default 40
        UMAP ``n_neighbors`` (40 as in the original evaluation script; clipped to ``n_cells - 1``).
    umap_min_dist : float, default 0.1
        UMAP ``min_dist`` (umap-learn default).
    center : bool, default True
        Centered PCA (``sklearn.decomposition.PCA``). ``False`` uses an uncentered
        ``TruncatedSVD`` as the original script did.
    target_sum, log_base
        See :func:`normalize_log1p`.
    random_state : int, default 0
        Seed for PCA (ARPACK start vector) and UMAP (fit and ``transform``). With a fixed seed umap-learn
        runs single-threaded, so the embedding is deterministic.

    Attributes
    ----------
    real_embedding_ : numpy.ndarray, shape (n_real, 2)
        UMAP coordinates of the real cells after :meth:`fit`.
    """

    def __init__(
        self,
        n_pcs: int = 50,
        umap_n_neighbors: int = 40,
        umap_min_dist: float = 0.1,
        center: bool = True,
        target_sum: float = 1e4,
        log_base: float | None = None,
        random_state: int = 0,
    ) -> None:
        self.n_pcs = n_pcs
        self.umap_n_neighbors = umap_n_neighbors
        self.umap_min_dist = umap_min_dist
        self.center = center
        self.target_sum = target_sum
        self.log_base = log_base
        self.random_state = random_state

    def fit(self, real_counts: ArrayLike) -> ReferenceEmbedding:
        """Fit PCA and UMAP on the real cells.

        Parameters
        ----------
        real_counts : array-like or scipy.sparse matrix, shape (n_real, n_genes)
            Raw counts of the real cells.

        Returns
        -------
        ReferenceEmbedding
            ``self``, with ``real_embedding_`` set.
        """
        import umap  # imported here: numba JIT start-up is slow
        from sklearn.decomposition import PCA, TruncatedSVD

        x = normalize_log1p(real_counts, self.target_sum, self.log_base)
        n_cells, n_genes = x.shape
        if n_cells < 4:
            raise ValueError(f"Need at least 4 real cells to fit PCA + UMAP, got {n_cells}.")
        n_components = max(1, min(self.n_pcs, min(n_cells, n_genes) - 1))
        if self.center:
            self.pca_ = PCA(n_components=n_components, svd_solver="arpack", random_state=self.random_state)
        else:
            self.pca_ = TruncatedSVD(
                n_components=n_components, algorithm="arpack", random_state=self.random_state
            )
        self.n_genes_ = n_genes
        pcs = self.pca_.fit_transform(x)
        self.umap_ = umap.UMAP(
            n_components=2,
            n_neighbors=max(2, min(self.umap_n_neighbors, n_cells - 1)),
            min_dist=self.umap_min_dist,
            random_state=self.random_state,
            transform_seed=self.random_state,
            n_jobs=1,
        )
        self.real_embedding_ = np.asarray(self.umap_.fit_transform(pcs), dtype=np.float64)
        return self

    def transform(self, counts: ArrayLike) -> np.ndarray:
        """Map cells (raw counts, same genes as the real cells) into the real cells' UMAP.

        Parameters
        ----------
        counts : array-like or scipy.sparse matrix, shape (n_cells, n_genes)
            Raw counts, genes in the same order as in :meth:`fit`.

        Returns
        -------
        numpy.ndarray, shape (n_cells, 2)
            UMAP coordinates.
        """
        if not hasattr(self, "umap_"):
            raise ValueError("ReferenceEmbedding is not fitted; call `.fit(real_counts)` first.")
        x = normalize_log1p(counts, self.target_sum, self.log_base)
        if x.shape[1] != self.n_genes_:
            raise ValueError(
                f"Cells have {x.shape[1]} genes but the real cells had {self.n_genes_}; "
                "align the generated matrix to the real cells' genes (same columns, same order)."
            )
        return np.asarray(self.umap_.transform(self.pca_.transform(x)), dtype=np.float64)


def knn_bandwidth(real: np.ndarray, n_neighbors: int = 25) -> float:
    """Kernel width ``w``: median over real cells of the mean distance to their nearest real neighbours.

    Parameters
    ----------
    real : numpy.ndarray, shape (n_real, n_dims)
        Real cells (in the UMAP space).
    n_neighbors : int, default 25
        Neighbours per cell, the cell itself excluded; clipped to ``n_real - 1``.

    Returns
    -------
    float
        The width ``w`` (Shaham et al. 2017, as cited by the paper).
    """
    real = np.asarray(real, dtype=np.float64)
    if real.shape[0] < 2:
        raise ValueError("The kernel width needs at least 2 real cells; pass more cells or `bandwidth=`.")
    k = min(n_neighbors, real.shape[0] - 1)
    # kneighbors() without X excludes each point from its own neighbours (robust to duplicates).
    distances, _ = NearestNeighbors(n_neighbors=k).fit(real).kneighbors()
    width = float(np.median(distances.mean(axis=1)))
    if width <= 0:
        raise ValueError("All real cells coincide (kernel width 0); pass an explicit `bandwidth=`.")
    return width


def mmd_gammas(width: float) -> tuple[float, float, float]:
    """Return ``gamma_i = 1 / (2**(i - 2) * w**2)`` for ``i = 1, 2, 3``, i.e. ``(2, 1, 0.5) / w**2``."""
    return tuple(1.0 / (2.0 ** (i - 2) * width**2) for i in (1, 2, 3))  # type: ignore[return-value]


def gaussian_mmd(generated: np.ndarray, real: np.ndarray, width: float) -> float:
    """Biased (V-statistic) squared MMD with the sum of three Gaussian kernels.

    ``k(x, y) = sum_i exp(-gamma_i * ||x - y||^2)`` with :func:`mmd_gammas`, and
    ``MMD = mean k(G, G) + mean k(R, R) - 2 mean k(G, R)`` (diagonals included), as in the original code.

    Parameters
    ----------
    generated : numpy.ndarray, shape (n_gen, n_dims)
    real : numpy.ndarray, shape (n_real, n_dims)
    width : float
        Kernel width ``w`` (see :func:`knn_bandwidth`).

    Returns
    -------
    float
        The statistic (>= 0 up to rounding; 0 when both sets are identical).
    """
    gen = np.asarray(generated, dtype=np.float64)
    ref = np.asarray(real, dtype=np.float64)
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
        raise ValueError(f"Point sets must be 2-D with equal dimensions, got {gen.shape} and {ref.shape}.")
    if width <= 0:
        raise ValueError(f"Kernel width must be positive, got {width}.")
    d_gg, d_rr, d_gr = (cdist(a, b, "sqeuclidean") for a, b in ((gen, gen), (ref, ref), (gen, ref)))
    total = 0.0
    for gamma in mmd_gammas(width):
        total += (
            np.exp(-gamma * d_gg).mean() + np.exp(-gamma * d_rr).mean() - 2 * np.exp(-gamma * d_gr).mean()
        )
    return float(total)


def sknn(points: np.ndarray, labels: Sequence[Any], k: int) -> float:
    """Label self-consistency of one cell set (InstructCell's ``measure_bio_preservation``).

    For every cell, the fraction of its ``k`` nearest neighbours **within the same set** (itself excluded)
    that share its label; averaged over cells. This is a neighbourhood-purity score, not a majority-vote
    classifier accuracy.

    Parameters
    ----------
    points : numpy.ndarray, shape (n_cells, n_dims)
    labels : sequence, length n_cells
    k : int
        Neighbours per cell; clipped to ``n_cells - 1``.

    Returns
    -------
    float
        In [0, 1].
    """
    points = np.asarray(points, dtype=np.float64)
    labels = _check_labels(labels, points.shape[0], "labels")
    if points.shape[0] < 2:
        raise ValueError("sKNN needs at least 2 cells in the set.")
    k = min(k, points.shape[0] - 1)
    _, idx = NearestNeighbors(n_neighbors=k).fit(points).kneighbors()
    return float((labels[idx] == labels[:, None]).mean())


def pknn(
    generated: np.ndarray,
    generated_labels: Sequence[Any],
    real: np.ndarray,
    real_labels: Sequence[Any],
    k: int,
) -> float:
    """Accuracy of a ``k``-NN classifier fitted on the real cells, evaluated on the generated cells.

    Parameters
    ----------
    generated : numpy.ndarray, shape (n_gen, n_dims)
    generated_labels : sequence, length n_gen
        The label each generated cell was conditioned on.
    real : numpy.ndarray, shape (n_real, n_dims)
    real_labels : sequence, length n_real
    k : int
        Neighbours; clipped to ``n_real``. Vote ties go to the label that sorts first (scikit-learn).

    Returns
    -------
    float
        In [0, 1].
    """
    generated = np.asarray(generated, dtype=np.float64)
    real = np.asarray(real, dtype=np.float64)
    gen_labels = _check_labels(generated_labels, generated.shape[0], "generated_labels")
    ref_labels = _check_labels(real_labels, real.shape[0], "real_labels")
    classifier = KNeighborsClassifier(n_neighbors=min(k, real.shape[0])).fit(real, ref_labels)
    return float((classifier.predict(generated) == gen_labels).mean())


def embedding_metrics(
    generated: np.ndarray,
    generated_labels: Sequence[Any],
    real: np.ndarray,
    real_labels: Sequence[Any],
    ks: Sequence[int] = DEFAULT_KS,
    bandwidth: float | None = None,
    bandwidth_neighbors: int = 25,
) -> dict[str, float]:
    """All generation metrics on already-embedded cells (e.g. the 2-D UMAP of the protocol).

    Parameters
    ----------
    generated, real : numpy.ndarray, shape (n, n_dims)
        Embedded generated and real cells.
    generated_labels, real_labels : sequence
        One label per cell.
    ks : sequence of int, default (5, 10, 25, 50)
        Neighbourhood sizes to average over.
    bandwidth : float, optional
        Fixed kernel width ``w``; by default :func:`knn_bandwidth` of the real cells.
    bandwidth_neighbors : int, default 25
        Neighbours used by :func:`knn_bandwidth`.

    Returns
    -------
    dict of str to float
        ``mmd``, ``delta_sknn`` (mean over K of ``|sknn_generated_k - sknn_real_k|``), ``pknn``,
        ``sknn_generated``, ``sknn_real`` (means over K), ``bandwidth``, and per K the keys
        ``pknn_k{K}``, ``delta_sknn_k{K}``, ``sknn_generated_k{K}``, ``sknn_real_k{K}``.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"`ks` must be a non-empty list of positive integers, got {ks}.")
    width = knn_bandwidth(real, bandwidth_neighbors) if bandwidth is None else float(bandwidth)
    out: dict[str, float] = {"mmd": gaussian_mmd(generated, real, width), "bandwidth": width}
    per_k: dict[str, list[float]] = {"pknn": [], "delta_sknn": [], "sknn_generated": [], "sknn_real": []}
    for k in ks:
        values = {
            "pknn": pknn(generated, generated_labels, real, real_labels, k),
            "sknn_generated": sknn(generated, generated_labels, k),
            "sknn_real": sknn(real, real_labels, k),
        }
        values["delta_sknn"] = abs(values["sknn_generated"] - values["sknn_real"])
        for name, value in values.items():
            out[f"{name}_k{k}"] = value
            per_k[name].append(value)
    for name, values in per_k.items():
        out[name] = float(np.mean(values))
    return out


def cell_generation_metrics(
    generated_counts: ArrayLike,
    generated_labels: Sequence[Any],
    real_counts: ArrayLike,
    real_labels: Sequence[Any],
    ks: Sequence[int] = DEFAULT_KS,
    n_pcs: int = 50,
    umap_n_neighbors: int = 40,
    center: bool = True,
    target_sum: float = 1e4,
    log_base: float | None = None,
    bandwidth: float | None = None,
    bandwidth_neighbors: int = 25,
    random_state: int = 0,
) -> dict[str, float]:
    """Run the full protocol: normalize + log1p, PCA-50 and UMAP-2 fitted on real cells, then the metrics.

    Parameters
    ----------
    generated_counts : array-like or scipy.sparse matrix, shape (n_gen, n_genes)
        Generated counts, columns aligned with ``real_counts``.
    generated_labels : sequence, length n_gen
        The label each generated cell was conditioned on.
    real_counts : array-like or scipy.sparse matrix, shape (n_real, n_genes)
        Real (test) counts.
    real_labels : sequence, length n_real
    ks, bandwidth, bandwidth_neighbors
        See :func:`embedding_metrics`.
    n_pcs, umap_n_neighbors, center, target_sum, log_base, random_state
        See :class:`ReferenceEmbedding`.

    Returns
    -------
    dict of str to float
        See :func:`embedding_metrics`.
    """
    gen = _check_counts(generated_counts, "generated_counts")
    real = _check_counts(real_counts, "real_counts")
    if gen.shape[1] != real.shape[1]:
        raise ValueError(
            f"generated_counts has {gen.shape[1]} genes and real_counts {real.shape[1]}; "
            "align both matrices to the same genes in the same order."
        )
    _check_labels(generated_labels, gen.shape[0], "generated_labels")
    _check_labels(real_labels, real.shape[0], "real_labels")
    embedding = ReferenceEmbedding(
        n_pcs=n_pcs,
        umap_n_neighbors=umap_n_neighbors,
        center=center,
        target_sum=target_sum,
        log_base=log_base,
        random_state=random_state,
    ).fit(real)
    return embedding_metrics(
        embedding.transform(gen),
        generated_labels,
        embedding.real_embedding_,
        real_labels,
        ks=ks,
        bandwidth=bandwidth,
        bandwidth_neighbors=bandwidth_neighbors,
    )


def compare_generators(
    real_counts: ArrayLike,
    real_labels: Sequence[Any],
    generated: dict[str, tuple[ArrayLike | None, Sequence[Any]]],
    embedding: Any | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    bandwidth_neighbors: int = 25,
) -> tuple[dict[str, dict[str, float] | None], dict[str, np.ndarray]]:
    """Score several generators against the same real cells, in one embedding and with one kernel width.

    The embedding (PCA + UMAP by default) is fitted once on the real cells and the MMD kernel width is
    computed from the real cells only, so every generator (a model, a baseline, real training cells as a
    reference) is measured with the same yardstick.

    Parameters
    ----------
    real_counts : array-like or scipy.sparse matrix, shape (n_real, n_genes)
        Real (test) counts.
    real_labels : sequence, length n_real
    generated : dict of str to (counts, labels)
        Per generator, its counts ``(n, n_genes)`` (or ``None`` when it produced nothing) and the label
        each cell was conditioned on.
    embedding : object, optional
        An unfitted :class:`ReferenceEmbedding` (default) or any object with ``fit(counts)``,
        ``transform(counts)`` and ``real_embedding_``.
    ks, bandwidth_neighbors
        See :func:`embedding_metrics`.

    Returns
    -------
    metrics : dict of str to dict or None
        Per generator, :func:`embedding_metrics`; ``None`` for a generator with fewer than 2 cells.
    coords : dict of str to numpy.ndarray
        ``real`` and every generator's 2-D coordinates (``(0, 2)`` for one without metrics).
    """
    embedding = ReferenceEmbedding() if embedding is None else embedding
    embedding.fit(real_counts)
    real_xy = np.asarray(embedding.real_embedding_, dtype=np.float64)
    labels = _check_labels(real_labels, real_xy.shape[0], "real_labels")
    width = knn_bandwidth(real_xy, bandwidth_neighbors)
    metrics: dict[str, dict[str, float] | None] = {}
    coords = {"real": real_xy}
    for name, (counts, counts_labels) in generated.items():
        if counts is None or counts.shape[0] < 2:
            metrics[name], coords[name] = None, np.zeros((0, 2))
            continue
        xy = np.asarray(embedding.transform(counts), dtype=np.float64)
        gen_labels = _check_labels(counts_labels, xy.shape[0], f"labels of {name!r}")
        metrics[name] = embedding_metrics(xy, gen_labels, real_xy, labels, ks=ks, bandwidth=width)
        coords[name] = xy
    return metrics, coords
