"""Cells and builder rows of the multi-cell tasks from synthetic cells, for the multi-cell tests."""

from __future__ import annotations

import numpy as np

from datasets_builder import AnnDataSource, CellRecord, TemplateBank
from datasets_builder.multicell import multicell_examples
from datasets_builder.splits import split_of

#: Three labels, each with its own block of marker genes.
LABELS = ("B cell", "NK cell", "T cell")


def synthetic_cells(n: int, n_genes: int, seed: int = 0, marker_mean: float = 15.0) -> list[CellRecord]:
    """``n`` Poisson cells, cell ``i`` labelled ``LABELS[k]``, ``k = i % 3``, high on genes ``8k..8k+7``."""
    rng = np.random.default_rng(seed)
    cells = []
    for i in range(n):
        k = i % len(LABELS)
        means = np.ones(n_genes)
        means[8 * k : 8 * k + 8] = marker_mean
        counts = rng.poisson(means)
        counts[-1] += 1
        nonzero = np.flatnonzero(counts)
        metadata = {"species": "human", "tissue": "blood", "sequencing_method": "10x Genomics"}
        cells.append(
            CellRecord(
                f"c{i}", LABELS[k], metadata, nonzero.astype(np.int32), counts[nonzero].astype(np.float32)
            )
        )
    return cells


def multicell_rows(
    task: str, split: str, cells: list[CellRecord], bank: TemplateBank, variant: str = "instruct"
) -> list[dict]:
    """The builder's rows of ``task`` for the cells of ``split`` (dataset ``"toy"``)."""
    source = AnnDataSource("toy.h5ad", task=task, name="toy")
    chosen = [cell for cell in cells if split_of("toy", cell.obs_name) == split]
    return [row for _, row in multicell_examples(source, variant, chosen, split, bank, sorted(LABELS))]
