"""Marker genes of the real test cells, and how often real and generated cells express them (dot plots)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .metrics.generation import normalize_log1p

__all__ = ["dotplot_stats", "rank_marker_genes"]


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
