"""Builder rows (as ``examples/build_dataset.py`` writes them) of synthetic cells, for the suite tests."""

import numpy as np

from datasets_builder import AnnDataSource, CellRecord, TemplateBank, example_key, make_example


def builder_rows(
    task: str,
    split: str,
    n: int,
    rng: np.random.Generator,
    bank: TemplateBank,
    labels: list[str],
    n_genes: int,
    dataset: str = "toy",
    variants: tuple[str, ...] = ("instruct",),
    marker_genes: int = 10,
    marker_mean: float = 12.0,
    id_prefix: str = "",
) -> list[dict]:
    """Rows of ``n`` Poisson cells, cell ``i`` labelled ``labels[i % 2]`` with ``marker_genes`` marker genes.

    Label 0 is high (``marker_mean``) on genes ``0..marker_genes-1``, label 1 on genes
    ``10..10+marker_genes-1``, every other gene has mean 1; each cell gets one row per variant, with a
    template of ``split``.
    """
    source = AnnDataSource("toy.h5ad", task=task, name=dataset, drug="erlotinib" if task == "dsp" else "")
    rows = []
    for i in range(n):
        label = labels[i % 2]
        means = np.ones(n_genes)
        means[10 * (i % 2) : 10 * (i % 2) + marker_genes] = marker_mean
        counts = rng.poisson(means)
        counts[0] += 1
        nonzero = np.flatnonzero(counts)
        metadata = {"species": "human", "tissue": "blood", "sequencing_method": "10x Genomics"}
        if task == "dsp":
            metadata["drug"] = "erlotinib"
        cell = CellRecord(
            f"{id_prefix}{i}", label, metadata, nonzero.astype(np.int32), counts[nonzero].astype(np.float32)
        )
        for variant in variants:
            key = example_key(task, variant, source.name, cell.obs_name)
            template = bank.choose(task, variant, split, key)
            rows.append(make_example(source, variant, cell, split, template, list(labels), key))
    return rows
