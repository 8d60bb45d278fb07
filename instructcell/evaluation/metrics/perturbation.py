"""Perturbation response metrics (scGen's protocol): predicted vs real perturbed cells of one cell type.

Every function takes **log-normalized** expression (:func:`~.generation.normalize_log1p`: 1e4 counts per cell,
``log1p``), dense or sparse, cells x genes, of three sets of one cell type and one perturbation: the
*predicted* perturbed cells, the *real* perturbed cells and the real *control* cells they were predicted from.

- **DEGs**: the real perturbed vs control cells ranked by ``scanpy.tl.rank_genes_groups`` (Wilcoxon), by
  absolute score, so strongly down-regulated genes count as much as induced ones.
- **R²**: squared Pearson correlation of the per-gene mean expression, predicted vs real (scGen's R², from
  ``scipy.stats.linregress``), over all genes and over the top DEGs.
- **Change correlation**: Pearson correlation of the predicted and the real change of the mean
  (``mean - control mean``) over the same genes; undefined (None) for a prediction without change.
- **Distribution distances** in a PCA of the real perturbed + control cells (50 components): squared MMD with
  the three Gaussian kernels of the generation metrics (width from the real perturbed cells' neighbours) and
  the energy distance ``2 E||x - y||² - E||x - x'||² - E||y - y'||²`` (pertpy's ``edistance``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.spatial.distance import cdist

from .generation import gaussian_mmd, knn_bandwidth

__all__ = [
    "PERTURBATION_KEYS",
    "change_pearson",
    "count_statistics",
    "energy_distance",
    "mean_r2",
    "pca_distances",
    "perturbation_metrics",
    "top_degs",
]

#: The metrics of :func:`perturbation_metrics`, in table order (higher is better for the first four).
PERTURBATION_KEYS: tuple[str, ...] = (
    "r2_all",
    "r2_top_degs",
    "change_pearson_all",
    "change_pearson_top_degs",
    "mmd",
    "e_distance",
)


def _dense(values: Any) -> np.ndarray:
    return np.asarray(values.toarray() if sp.issparse(values) else values, dtype=np.float64)


def _means(values: Any) -> np.ndarray:
    return np.asarray(values.mean(axis=0), dtype=np.float64).ravel()


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation; None when either side is constant (no correlation is defined)."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def count_statistics(counts: Any) -> dict[str, list[float]]:
    """Library size (total counts) and detected genes (counts > 0) of every cell of raw counts.

    Parameters
    ----------
    counts : array or scipy.sparse matrix
        ``(n_cells, n_genes)`` raw counts.

    Returns
    -------
    dict
        ``{"library_size": (n_cells,), "detected_genes": (n_cells,)}`` as lists (JSON-ready).
    """
    counts = sp.csr_matrix(counts)
    counts.eliminate_zeros()
    return {
        "library_size": np.asarray(counts.sum(axis=1)).ravel().tolist(),
        "detected_genes": np.diff(counts.indptr).tolist(),
    }


def top_degs(perturbed: Any, control: Any, n: int = 100) -> np.ndarray:
    """Rank the genes most changed between real perturbed and control cells; return the top ``n``.

    Parameters
    ----------
    perturbed, control : array or scipy.sparse matrix
        ``(n_perturbed, n_genes)`` and ``(n_control, n_genes)`` log-normalized expression.
    n : int
        Genes to return (all genes when there are fewer).

    Returns
    -------
    numpy.ndarray
        ``(min(n, n_genes),)`` gene indices, largest absolute Wilcoxon score first.
    """
    import anndata
    import scanpy as sc

    if perturbed.shape[0] < 2 or control.shape[0] < 2:
        raise ValueError(
            f"Ranking DEGs needs at least 2 perturbed and 2 control cells, got {perturbed.shape[0]} and "
            f"{control.shape[0]}."
        )
    values = sp.vstack([sp.csr_matrix(perturbed), sp.csr_matrix(control)]).tocsr()
    groups = np.array(["perturbed"] * perturbed.shape[0] + ["control"] * control.shape[0])
    adata = anndata.AnnData(X=values, obs={"group": groups})
    adata.obs_names = [str(i) for i in range(adata.n_obs)]
    sc.tl.rank_genes_groups(
        adata, "group", groups=["perturbed"], reference="control", method="wilcoxon", use_raw=False
    )
    result = adata.uns["rank_genes_groups"]
    names = np.asarray(result["names"]["perturbed"]).astype(int)
    scores = np.abs(np.asarray(result["scores"]["perturbed"], dtype=np.float64))
    order = np.argsort(-scores, kind="stable")
    return names[order][:n]


def mean_r2(predicted: Any, real: Any, genes: Sequence[int] | None = None) -> float | None:
    """Squared Pearson correlation of per-gene means, predicted vs real, over ``genes`` (default all)."""
    x, y = _means(predicted), _means(real)
    if genes is not None:
        x, y = x[np.asarray(genes)], y[np.asarray(genes)]
    r = _pearson(x, y)
    return None if r is None else r * r


def change_pearson(
    predicted: Any, real: Any, control: Any, genes: Sequence[int] | None = None
) -> float | None:
    """Pearson correlation of the predicted and the real change of the mean over ``genes`` (default all)."""
    base = _means(control)
    x, y = _means(predicted) - base, _means(real) - base
    if genes is not None:
        x, y = x[np.asarray(genes)], y[np.asarray(genes)]
    return _pearson(x, y)


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """``2 E||x - y||² - E||x - x'||² - E||y - y'||²`` between two point sets ``(n, d)`` and ``(m, d)``."""
    return float(
        2 * cdist(x, y, "sqeuclidean").mean()
        - cdist(x, x, "sqeuclidean").mean()
        - cdist(y, y, "sqeuclidean").mean()
    )


def pca_distances(
    predicted: Any, real: Any, control: Any, n_pcs: int = 50, seed: int = 0
) -> dict[str, float]:
    """MMD and energy distance of predicted vs real perturbed cells in a PCA of the real cells.

    The PCA is fitted on the real perturbed and control cells together (``n_pcs`` components, fewer when
    there are fewer cells or genes); predicted cells are projected with it.

    Returns
    -------
    dict
        ``{"mmd": float, "e_distance": float}``.
    """
    from sklearn.decomposition import PCA

    real_values, control_values = _dense(real), _dense(control)
    fit_on = np.vstack([real_values, control_values])
    n_components = max(1, min(n_pcs, min(fit_on.shape) - 1))
    pca = PCA(n_components=n_components, svd_solver="arpack", random_state=seed).fit(fit_on)
    pred_pcs, real_pcs = pca.transform(_dense(predicted)), pca.transform(real_values)
    return {
        "mmd": gaussian_mmd(pred_pcs, real_pcs, knn_bandwidth(real_pcs)),
        "e_distance": energy_distance(pred_pcs, real_pcs),
    }


def perturbation_metrics(
    predicted: Any, real: Any, control: Any, degs: Sequence[int], seed: int = 0
) -> dict[str, float | None]:
    """Every metric of :data:`PERTURBATION_KEYS` for one cell type and perturbation.

    Parameters
    ----------
    predicted, real, control : array or scipy.sparse matrix
        Log-normalized ``(n_predicted, n_genes)``, ``(n_real, n_genes)``, ``(n_control, n_genes)``.
    degs : sequence of int
        The top DEGs (:func:`top_degs` of ``real`` vs ``control``).
    seed : int
        Seed of the PCA.

    Returns
    -------
    dict
        Metric name -> value (None where undefined).
    """
    if predicted.shape[0] < 2:
        raise ValueError(f"Scoring a prediction needs at least 2 predicted cells, got {predicted.shape[0]}.")
    return {
        "r2_all": mean_r2(predicted, real),
        "r2_top_degs": mean_r2(predicted, real, degs),
        "change_pearson_all": change_pearson(predicted, real, control),
        "change_pearson_top_degs": change_pearson(predicted, real, control, degs),
        **pca_distances(predicted, real, control, seed=seed),
    }
