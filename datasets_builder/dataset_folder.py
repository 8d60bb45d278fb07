"""A built dataset on disk, and the one way to read it.

``instructcell build-data`` (``examples/build_dataset.py``) writes a folder with ``train.parquet``,
``validation.parquet``, ``test.parquet`` (the builder's rows, :data:`~datasets_builder.builder.FEATURES`),
``gene_vocab.txt`` (the genes the sparse indices point into) and ``dataset_info.json``. Training, evaluation,
the demo and the benchmarks read it through :func:`load_split` and :class:`SplitRows`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import datasets

from .gene_vocab import GENE_VOCAB_FILENAME, read_gene_vocab
from .splits import SPLITS

__all__ = ["SplitRows", "cap_rows", "dataset_genes", "load_split"]


def _split_file(dataset_dir: str | os.PathLike, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: use one of {SPLITS}.")
    path = Path(dataset_dir) / f"{split}.parquet"
    if not path.is_file():
        raise ValueError(
            f"No {path}: pass a folder written by `instructcell build-data` (examples/build_dataset.py)."
        )
    return path


def dataset_genes(dataset_dir: str | os.PathLike) -> list[str]:
    """Read the gene vocabulary of a built dataset (``gene_vocab.txt``)."""
    path = Path(dataset_dir) / GENE_VOCAB_FILENAME
    if not path.is_file():
        raise ValueError(f"No {path}: a built dataset folder holds the gene vocabulary it was built with.")
    return read_gene_vocab(path)


def load_split(
    dataset_dir: str | os.PathLike,
    split: str,
    tasks: Sequence[str] | None = None,
    variant: str | None = None,
    datasets_names: Sequence[str] | None = None,
) -> datasets.Dataset:
    """Rows of one split of a built dataset, optionally only some tasks, one variant and some datasets.

    Parameters
    ----------
    dataset_dir : path
        The built dataset folder.
    split : {"train", "validation", "test"}
    tasks : sequence of str, optional
        Task names to keep (default: all).
    variant : {"instruct", "chat"}, optional
        Variant to keep (default: both).
    datasets_names : sequence of str, optional
        Dataset names to keep (default: all).

    Returns
    -------
    datasets.Dataset

    Raises
    ------
    ValueError
        A missing file, or no row left after the filters (the message lists what the split holds).
    """
    table = datasets.load_dataset("parquet", data_files={split: str(_split_file(dataset_dir, split))})[split]
    keep_tasks = None if tasks is None else set(tasks)
    keep_names = None if datasets_names is None else set(datasets_names)
    if keep_tasks is None and variant is None and keep_names is None:
        return table
    rows = table.filter(
        lambda task, row_variant, name: (
            (keep_tasks is None or task in keep_tasks)
            and (variant is None or row_variant == variant)
            and (keep_names is None or name in keep_names)
        ),
        input_columns=["task", "variant", "dataset"],
    )
    if len(rows) == 0:
        held = sorted(set(zip(table["task"], table["variant"], table["dataset"], strict=True)))
        raise ValueError(
            f"No {split} rows for tasks {sorted(keep_tasks or [])}, variant {variant!r}, datasets "
            f"{sorted(keep_names or [])} in {dataset_dir}; it holds (task, variant, dataset) {held}."
        )
    return rows


def cap_rows(rows: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """At most ``n`` rows: a seeded random subset when there are more (all rows for ``n=None``)."""
    if n is not None and n < 1:
        raise ValueError(f"The number of rows to keep must be at least 1, got {n}.")
    return rows.shuffle(seed=seed).select(range(n)) if n is not None and len(rows) > n else rows


class SplitRows:
    """Rows of one split, looked up by (task, dataset, variant) without re-filtering the table.

    Parameters
    ----------
    table : datasets.Dataset
        A split as :func:`load_split` returns it.
    """

    def __init__(self, table: datasets.Dataset) -> None:
        self.table = table
        keys = zip(table["task"], table["dataset"], table["variant"], strict=True)
        self.rows: dict[tuple[str, str, str], list[int]] = {}
        for i, key in enumerate(keys):
            self.rows.setdefault(key, []).append(i)

    @classmethod
    def load(cls, dataset_dir: str | os.PathLike, split: str, **filters) -> SplitRows:
        """Read a split with :func:`load_split` (same filters) and index it."""
        return cls(load_split(dataset_dir, split, **filters))

    def pairs(self, tasks: Sequence[str] | None = None) -> list[tuple[str, str]]:
        """(task, dataset) pairs of the given tasks (default: all), sorted by task then dataset."""
        return sorted({(t, d) for t, d, _ in self.rows if tasks is None or t in tasks})

    def variants(self) -> set[str]:
        """Variants present in the split."""
        return {v for _, _, v in self.rows}

    def get(self, task: str, dataset: str, variant: str) -> datasets.Dataset:
        """Rows of one task, dataset and variant (ValueError when there are none)."""
        indices = self.rows.get((task, dataset, variant))
        if not indices:
            raise ValueError(
                f"No rows for task={task!r}, dataset={dataset!r}, variant={variant!r}; build the dataset "
                f"with that task and variant (`instructcell build-data --variant {variant}`)."
            )
        return self.table.select(indices)

    def matching(self, task: str, dataset: str, variant: str, cell_ids: Sequence[str]) -> datasets.Dataset:
        """Rows of ``variant`` for the given cells, in their order (the same cells in every variant)."""
        rows = self.get(task, dataset, variant)
        position = {cell_id: i for i, cell_id in enumerate(rows["cell_id"])}
        missing = [c for c in cell_ids if c not in position]
        if missing:
            raise ValueError(
                f"{len(missing)} {task}/{dataset} cells have no {variant} row (e.g. {missing[0]!r})."
            )
        return rows.select([position[c] for c in cell_ids])
