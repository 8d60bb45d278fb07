"""Builder rows as count matrices: the cells every evaluator and baseline reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import scipy.sparse as sp

__all__ = ["sparse_cells"]


def sparse_cells(
    rows: datasets.Dataset | Sequence[dict[str, Any]], prefix: str, n_genes: int
) -> sp.csr_matrix:
    """Return the rows' ``input`` or ``target`` cells as a CSR matrix of counts.

    Parameters
    ----------
    rows : Dataset or sequence of dict
        ``n_rows`` builder rows (``<prefix>_gene_indices``, ``<prefix>_gene_counts``).
    prefix : {"input", "target"}
        The cell a task reads (input) or generates (target); a row without it gives an empty row.
    n_genes : int
        Size of the gene vocabulary the indices point into.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_rows, n_genes)`` float32 counts.
    """
    if prefix not in ("input", "target"):
        raise ValueError(f"prefix must be 'input' or 'target', got {prefix!r}.")
    if isinstance(rows, datasets.Dataset):
        indices, counts = rows[f"{prefix}_gene_indices"], rows[f"{prefix}_gene_counts"]
    else:
        indices = [row[f"{prefix}_gene_indices"] for row in rows]
        counts = [row[f"{prefix}_gene_counts"] for row in rows]
    indptr = np.cumsum([0] + [len(i) for i in indices])
    return sp.csr_matrix(
        (
            np.concatenate([np.asarray(c, np.float32) for c in counts] or [np.zeros(0, np.float32)]),
            np.concatenate([np.asarray(i, np.int64) for i in indices] or [np.zeros(0, np.int64)]),
            indptr,
        ),
        shape=(len(indices), n_genes),
    )
