"""Chunked reading of ``.h5ad`` files into sparse cells aligned to a global gene vocabulary.

Files are opened in backed mode (``anndata.read_h5ad(path, backed="r")``) and read ``chunk_size`` rows at
a time, so that large files never have to fit in memory. ``X`` must hold raw counts; counts kept in a
layer are read with ``anndata.io.sparse_dataset`` because backed AnnData loads layers fully (STYLE c11).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from instructcell.tasks import get_task


@dataclass(frozen=True)
class AnnDataSource:
    """One ``.h5ad`` file used for one task.

    Parameters
    ----------
    path
        Path to the ``.h5ad`` file (cells x genes, raw integer counts, ``var_names`` = gene symbols).
    task
        A task name of :mod:`instructcell.tasks`: ``"cta"`` (cell type annotation), ``"dsp"`` (drug
        sensitivity prediction), ``"cpcg"`` (conditional pseudo-cell generation)...
    name
        Dataset name used in the split hash and the ``dataset`` column; defaults to the file stem.
    label_key
        ``obs`` column with the label; defaults to the task's ``label_key`` (``"cell_type"``, or
        ``"drug_response"`` for DSP).
    species, tissue, sequencing_method, drug
        Metadata. A non-empty value here wins; otherwise the ``obs`` column of the same name is used.
        Only the task's ``metadata_keys`` are read (``drug`` only for DSP).
    layer
        Read counts from ``layers[layer]`` instead of ``X``.
    """

    path: str
    task: str
    name: str = ""
    label_key: str = ""
    species: str = ""
    tissue: str = ""
    sequencing_method: str = ""
    drug: str = ""
    layer: str = ""

    def __post_init__(self) -> None:
        get_task(self.task)  # a clear error for an unknown task
        object.__setattr__(self, "path", os.fspath(self.path))
        if not self.name:
            object.__setattr__(self, "name", os.path.splitext(os.path.basename(self.path))[0])
        if not self.label_key:
            object.__setattr__(self, "label_key", get_task(self.task).label_key)

    def metadata_keys(self) -> tuple[str, ...]:
        """Metadata fields this task needs (its ``metadata_keys``)."""
        return get_task(self.task).metadata_keys


@dataclass
class CellRecord:
    """One cell: its id, label, metadata and counts as a sparse row in the gene vocabulary.

    ``gene_indices`` (int32, strictly increasing) index into the vocabulary; ``gene_counts`` (float32)
    are the matching raw counts; genes absent from the vocabulary are dropped.
    """

    obs_name: str
    label: str
    metadata: dict[str, str]
    gene_indices: np.ndarray = field(repr=False)
    gene_counts: np.ndarray = field(repr=False)


def check_raw_counts(values: np.ndarray, where: str) -> None:
    """Raise a ``ValueError`` unless ``values`` are finite, non-negative integers.

    Parameters
    ----------
    values
        Stored values of a count matrix (e.g. the ``.data`` of a CSR chunk).
    where
        Description of the matrix for the error message.
    """
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where} has NaN or infinite values: store raw UMI/read counts in X.")
    if values.min() < 0:
        raise ValueError(
            f"{where} has negative values (min {values.min()}): it looks scaled or centred; store raw "
            "integer counts in X or name the layer that holds them (--layer counts / layer='counts')."
        )
    if not np.all(np.mod(values, 1) == 0):
        raise ValueError(
            f"{where} has non-integer values (e.g. {values[np.mod(values, 1) != 0][0]}): it looks normalized "
            "or log-transformed; store raw integer counts in X or name the layer that holds them "
            "(--layer counts / layer='counts')."
        )


def check_gene_names(var_names: pd.Index, where: str) -> None:
    """Raise a ``ValueError`` when ``var_names`` are missing, numeric placeholders, blank or duplicated."""
    names = pd.Index(var_names).astype(str)
    if len(names) == 0:
        raise ValueError(f"{where} has no genes.")
    if names.str.fullmatch(r"\d+").all():
        raise ValueError(
            f"{where} has no gene names (var_names are 0, 1, 2, ...): set `adata.var_names` to gene symbols, "
            "e.g. `adata.var_names = adata.var['gene_symbols']`."
        )
    if (names.str.strip() == "").any():
        raise ValueError(f"{where} has blank gene names: drop or rename those genes.")
    if names.has_duplicates:
        dups = names[names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"{where} has duplicated gene names {dups}: call `adata.var_names_make_unique()`.")


def metadata_values(source: AnnDataSource, obs: pd.DataFrame, key: str, where: str) -> np.ndarray:
    """One metadata field per cell: the source's value when given, else the ``obs`` column of that name."""
    value = getattr(source, key)
    if value:
        return np.full(len(obs), value, dtype=object)
    if key in obs.columns and not obs[key].isna().any():
        return obs[key].astype(str).to_numpy()
    flag = key.replace("_", "-")
    raise ValueError(
        f"{where} has no {key!r}: add an obs column {key!r} or give the value (--{flag} / {key}=...)."
    )


def read_obs_fields(source: AnnDataSource, obs: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Check a file's ``obs`` for what the source's task needs; return its labels and metadata per cell.

    Parameters
    ----------
    source
        The file, its task, label column and metadata values.
    obs
        The file's ``obs`` (``n_cells`` rows).

    Returns
    -------
    labels : numpy.ndarray of shape (n_cells,)
        The labels as strings.
    metadata : dict of str to numpy.ndarray of shape (n_cells,)
        The task's metadata fields (:meth:`AnnDataSource.metadata_keys`).

    Raises
    ------
    ValueError
        No label column, cells without a label, duplicated ``obs_names`` or a missing metadata value; each
        message says what to pass or change.
    """
    where = f"{source.name} ({source.path})"
    if source.label_key not in obs.columns:
        raise ValueError(
            f"{where} has no obs column {source.label_key!r} for the {source.task} labels (columns: "
            f"{list(obs.columns)}): name the label column (--label-key COLUMN / label_key=...)."
        )
    labels = obs[source.label_key]
    if labels.isna().any():
        raise ValueError(
            f"{where}: {int(labels.isna().sum())} cells have no {source.label_key!r} label: "
            "drop them before building."
        )
    if pd.Index(obs.index).astype(str).has_duplicates:
        raise ValueError(f"{where} has duplicated obs_names: call `adata.obs_names_make_unique()`.")
    metadata = {key: metadata_values(source, obs, key, where) for key in source.metadata_keys()}
    return labels.astype(str).to_numpy(), metadata


class AnnDataReader:
    """Iterate over the cells of an :class:`AnnDataSource`, aligned to a gene vocabulary.

    Parameters
    ----------
    source
        The file and its task/metadata.
    gene_vocab
        Ordered gene symbols; output indices point into this list. Genes of the file that are not in it
        are dropped; at least one gene must be shared.
    chunk_size
        Number of rows read at once.
    progress
        Show a tqdm progress bar.

    Raises
    ------
    ValueError
        If the label column or a metadata value is missing, gene names are absent/duplicated, no gene is
        shared with the vocabulary, or counts are not raw integers (checked chunk by chunk while reading).
    """

    def __init__(
        self, source: AnnDataSource, gene_vocab: Sequence[str], chunk_size: int = 2048, progress: bool = True
    ) -> None:
        if not os.path.exists(source.path):
            raise ValueError(f"{source.path} does not exist: check the path of dataset {source.name!r}.")
        self.source = source
        self.chunk_size = chunk_size
        self.progress = progress
        where = f"{source.name} ({source.path})"
        adata = anndata.read_h5ad(source.path, backed="r")
        try:
            obs = adata.obs.copy()
            var_names = pd.Index(adata.var_names).astype(str)
            self.n_obs = adata.n_obs
        finally:
            adata.file.close()
        check_gene_names(var_names, where)
        self.labels, self.metadata = read_obs_fields(source, obs)
        self.obs_names = pd.Index(obs.index).astype(str)
        vocab_index = {g: i for i, g in enumerate(gene_vocab)}
        target = np.array([vocab_index.get(g, -1) for g in var_names], dtype=np.int64)
        shared = np.flatnonzero(target >= 0)
        if shared.size == 0:
            raise ValueError(
                f"{where} shares no gene with the vocabulary (file genes e.g. {var_names[:3].tolist()}, "
                f"vocabulary e.g. {list(gene_vocab[:3])}): map the genes to the vocabulary's symbols first "
                "(see datasets_builder.preprocessing)."
            )
        order = shared[np.argsort(target[shared], kind="stable")]
        self._columns = order
        self._vocab_indices = target[order].astype(np.int32)
        self.n_shared_genes = int(shared.size)

    def __len__(self) -> int:
        return self.n_obs

    def label_set(self) -> list[str]:
        """Sorted distinct labels of the file."""
        return sorted(set(self.labels.tolist()))

    def _chunks(self) -> Iterator[tuple[int, sp.csr_matrix]]:
        source = self.source
        if source.layer:
            with h5py.File(source.path, "r") as f:
                if f"layers/{source.layer}" not in f:
                    raise ValueError(f"{source.path} has no layer {source.layer!r}: check `layer=`.")
                matrix = anndata.io.sparse_dataset(f[f"layers/{source.layer}"])
                for start in range(0, self.n_obs, self.chunk_size):
                    yield start, sp.csr_matrix(matrix[start : start + self.chunk_size])
            return
        adata = anndata.read_h5ad(source.path, backed="r")
        try:
            for start in range(0, self.n_obs, self.chunk_size):
                yield start, sp.csr_matrix(adata.X[start : start + self.chunk_size])
        finally:
            adata.file.close()

    def __iter__(self) -> Iterator[CellRecord]:
        where = f"{self.source.name} ({self.source.path})"
        bar = tqdm(
            total=self.n_obs, desc=f"reading {self.source.name}", unit="cell", disable=not self.progress
        )
        for start, chunk in self._chunks():
            check_raw_counts(chunk.data, f"X of {where} (rows {start}-{start + chunk.shape[0]})")
            aligned = chunk[:, self._columns].tocsr()
            aligned.sort_indices()
            for row in range(aligned.shape[0]):
                lo, hi = aligned.indptr[row], aligned.indptr[row + 1]
                cell = start + row
                yield CellRecord(
                    obs_name=self.obs_names[cell],
                    label=self.labels[cell],
                    metadata={key: str(values[cell]) for key, values in self.metadata.items()},
                    gene_indices=self._vocab_indices[aligned.indices[lo:hi]],
                    gene_counts=aligned.data[lo:hi].astype(np.float32),
                )
            bar.update(chunk.shape[0])
        bar.close()


def densify(gene_indices: Sequence[int], gene_counts: Sequence[float], n_genes: int) -> np.ndarray:
    """Sparse row -> dense float32 vector of length ``n_genes`` (the inverse of the reader's output)."""
    dense = np.zeros(n_genes, dtype=np.float32)
    dense[np.asarray(gene_indices, dtype=np.int64)] = np.asarray(gene_counts, dtype=np.float32)
    return dense
