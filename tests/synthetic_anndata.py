"""Small synthetic AnnData objects for the data tests (no files from ../shared)."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp


def make_counts(
    n_cells: int = 240,
    n_genes: int = 300,
    labels: tuple[str, ...] = ("T cell", "B cell", "monocyte"),
    species: str = "human",
    seed: int = 0,
    prefix: str = "cell",
) -> anndata.AnnData:
    """Poisson counts with label-specific marker genes, 10 mitochondrial genes, full obs metadata."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.0, 2.0, size=n_genes)
    label_of = np.array([labels[i % len(labels)] for i in range(n_cells)])
    means = np.tile(base, (n_cells, 1))
    for k, label in enumerate(labels):
        markers = slice(20 + 15 * k, 35 + 15 * k)
        means[label_of == label, markers] *= 12.0
    X = rng.poisson(means).astype(np.int32)
    mt = "mt-" if species == "mouse" else "MT-"
    genes = [
        f"{mt}G{i}" if i < 10 else (f"Gene{i}" if species == "mouse" else f"GENE{i}") for i in range(n_genes)
    ]
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(label_of),
            "species": species,
            "tissue": "blood",
            "sequencing_method": "10x",
        },
        index=[f"{prefix}_{i}" for i in range(n_cells)],
    )
    return anndata.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes))
