"""Users' AnnData files: read by rows without loading them, written with new ``obs`` columns atomically.

Both on-disk AnnData formats are read the same way: an ``.h5ad`` file through h5py, a ``.zarr`` store through
zarr, each element through anndata's own readers (``anndata.io.sparse_dataset`` for a sparse ``X`` or layer,
``anndata.io.read_elem`` for ``var`` and single ``obs`` columns). Only what is asked for is read: rows of the
count matrix a chunk at a time, the ``var`` table, and the ``obs`` columns a template names, never the whole
``obs`` (at a million cells its index alone is a hundred megabytes of Python strings).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset, write_elem

from instructcell.outputs import atomic_output, is_zarr_path
from modeling_instructcell.feature_extraction_instructcell import _validate_values as validate_counts

from .heap import release_freed_memory

logger = logging.getLogger(__name__)

__all__ = ["CellFile", "InMemoryCells", "check_counts", "read_anndata", "write_anndata", "write_obs_columns"]

# Rows per block when every count of a file is checked before annotation.
_CHECK_VALUES = 1 << 24


def _open_group(path: Path, mode: str, zarr_store: bool):
    """Open the root group of an .h5ad file (h5py) or a .zarr store (zarr)."""
    if zarr_store:
        import zarr

        # anndata refuses to edit a store through its consolidated metadata; they are rewritten after an edit
        return zarr.open_group(str(path), mode=mode, use_consolidated=False if mode != "r" else None)
    return h5py.File(path, mode)


class CellFile:
    """An ``.h5ad`` file or ``.zarr`` store opened for reading rows of counts in chunks.

    Parameters
    ----------
    path : str or PathLike
        The file (``.h5ad``) or store (``.zarr`` folder).
    layer : str, optional
        Read ``layers[layer]`` instead of ``X``.

    Raises
    ------
    ValueError
        The path does not exist, cannot be read as AnnData (truncated, corrupt, another format), has no
        count matrix, or ``layer`` is not one of its layers.
    """

    def __init__(self, path: str | os.PathLike, layer: str | None = None):
        self.path = Path(path).expanduser()
        self.layer = layer
        if not self.path.exists():
            raise ValueError(f"No such file: {self.path}")
        if is_zarr_path(self.path) != self.path.is_dir():
            kind = "a folder" if self.path.is_dir() else "a file"
            raise ValueError(
                f"{self.path} is {kind}; pass an .h5ad file or a .zarr folder written by AnnData."
            )
        try:
            self._root = _open_group(self.path, "r", zarr_store=self.path.is_dir())
            self.var = read_elem(self._root["var"])
            obs = self._root["obs"]
            self._obs = obs
            self._matrix = self._count_matrix()
            self.n_obs, self.n_vars = (int(n) for n in self._matrix.shape)
        except ValueError:
            self.close()
            raise
        except Exception as err:  # h5py, zarr and anndata raise many types for a damaged file
            self.close()
            raise ValueError(
                f"Cannot read {self.path} as AnnData ({type(err).__name__}: {err}); is it a complete .h5ad "
                "file or .zarr store?"
            ) from err
        if len(self.var) != self.n_vars:
            self.close()
            raise ValueError(
                f"{self.path} is inconsistent: {len(self.var)} genes in var, {self.n_vars} in X."
            )

    def _count_matrix(self):
        root = self._root
        if self.layer is None:
            if "X" not in root:
                raise ValueError(f"{self.path} has no X; pass layer=<the layer with raw counts>.")
            element = root["X"]
        else:
            layers = list(root["layers"].keys()) if "layers" in root else []
            if self.layer not in layers:
                raise ValueError(f"Unknown layer {self.layer!r}; {self.path} has the layers {layers}.")
            element = root["layers"][self.layer]
        encoding = element.attrs.get("encoding-type", "array")
        if encoding == "csc_matrix":
            logger.warning(
                "%s stores counts by column (CSC): loading them into memory to read rows.", self.path
            )
            return sparse_dataset(element).to_memory().tocsr()
        if encoding == "csr_matrix":
            return sparse_dataset(element)
        return element

    @property
    def format(self) -> str:
        """``"zarr"`` or ``"h5ad"``."""
        return "zarr" if is_zarr_path(self.path) else "h5ad"

    def gene_table(self) -> anndata.AnnData:
        """Return a 0-cell AnnData with this file's ``var``, which gene alignment reads (names, ids)."""
        return anndata.AnnData(X=sp.csr_matrix((0, self.n_vars), dtype=np.float32), var=self.var)

    def rows(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Read the counts of cells ``start`` to ``stop``: CSR or dense, ``(stop - start, n_vars)``."""
        block = self._matrix[start:stop]
        return block.tocsr() if sp.issparse(block) else np.asarray(block)

    def obs_columns(self, names: list[str]) -> pd.DataFrame:
        """Read the ``obs`` columns among ``names`` that exist (each whole; categorical codes are small)."""
        present = [name for name in names if name in self._obs]
        columns = {}
        for name in present:
            values = read_elem(self._obs[name])
            columns[name] = pd.Series(values) if not isinstance(values, pd.Series) else values
        return pd.DataFrame(columns, index=pd.RangeIndex(self.n_obs))

    def obs_categories(self, name: str) -> list[str]:
        """Return the label set of ``obs[name]``: its categories, or its sorted distinct present values."""
        if name not in self._obs:
            columns = [c for c in self._obs.attrs.get("column-order", [])]
            raise ValueError(f"obs has no column {name!r}; its columns are {columns}.")
        column = pd.Series(read_elem(self._obs[name]))
        if isinstance(column.dtype, pd.CategoricalDtype):
            return [str(c) for c in column.cat.categories]
        return sorted({str(v) for v in column.dropna()})

    def fingerprint(self) -> dict[str, Any]:
        """Size and modification time of the input: a resumed run refuses an input that has changed since."""
        if self.path.is_dir():
            stats = [p.stat() for p in self.path.rglob("*") if p.is_file()]
            return {
                "bytes": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
            }
        stat = self.path.stat()
        return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def close(self) -> None:
        """Close the file (a zarr store needs no closing)."""
        root = getattr(self, "_root", None)
        if isinstance(root, h5py.File):
            root.close()

    def __enter__(self) -> CellFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InMemoryCells:
    """An AnnData object (in memory, a view or backed) read by rows like a :class:`CellFile`.

    Parameters
    ----------
    adata : AnnData
    layer : str, optional
        Read ``adata.layers[layer]`` instead of ``X``.
    """

    def __init__(self, adata: anndata.AnnData, layer: str | None = None):
        self.adata = adata
        if layer is None:
            matrix = adata.X
            if matrix is None:
                raise ValueError("adata.X is None; pass layer=<the layer with raw counts>.")
        else:
            if layer not in adata.layers:
                raise ValueError(f"Unknown layer {layer!r}; the AnnData has the layers {list(adata.layers)}.")
            matrix = adata.layers[layer]
        if sp.issparse(matrix) and matrix.format != "csr":
            matrix = matrix.tocsr()
        self._matrix = matrix
        self.n_obs, self.n_vars = adata.n_obs, adata.n_vars

    def gene_table(self) -> anndata.AnnData:
        """Return the AnnData itself: gene alignment reads its ``var``."""
        return self.adata

    def rows(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Read the counts of cells ``start`` to ``stop``: CSR or dense, ``(stop - start, n_vars)``."""
        block = self._matrix[start:stop]
        return block.tocsr() if sp.issparse(block) else np.asarray(block)

    def obs_columns(self, names: list[str]) -> pd.DataFrame:
        """Return the ``obs`` columns among ``names`` that exist."""
        present = [name for name in names if name in self.adata.obs.columns]
        return self.adata.obs[present].reset_index(drop=True)


def check_counts(cells: CellFile | InMemoryCells) -> None:
    """Raise the feature extractor's ``ValueError`` if any count is negative, NaN/inf or not an integer.

    Reads the whole matrix once, in blocks of about 16 million values, before any cell is annotated: a cell
    with a NaN (e.g. a gene missing from one batch of an outer-joined dense matrix) or a negative value is
    refused with its row number, never skipped as a cell without counts.
    """
    step = max(1, _CHECK_VALUES // max(cells.n_vars, 1))
    for start in range(0, cells.n_obs, step):
        block = cells.rows(start, min(start + step, cells.n_obs))
        if sp.issparse(block):
            validate_counts(np.asarray(block.data), None, start, indptr=block.indptr)
        else:
            validate_counts(block, None, start)
        release_freed_memory()  # a large file's blocks would otherwise pile up in the allocator's heaps


def read_anndata(path: str | os.PathLike) -> anndata.AnnData:
    """Open an ``.h5ad`` file backed (counts stay on disk) or read a ``.zarr`` store, with a clear error.

    Raises
    ------
    ValueError
        No such file, or not a readable AnnData (truncated, corrupt, another format).
    """
    CellFile(path).close()  # the clear errors for a missing, truncated or foreign file
    try:
        return anndata.read_zarr(path) if is_zarr_path(path) else anndata.read_h5ad(path, backed="r")
    except Exception as err:  # h5py, zarr and anndata raise many types for a damaged file
        raise ValueError(f"Cannot read {path} as AnnData ({type(err).__name__}: {err}).") from err


def write_anndata(adata: anndata.AnnData, path: str | os.PathLike) -> Path:
    """Write ``adata`` atomically as ``.h5ad``, or as a ``.zarr`` store when ``path`` ends in ``.zarr``."""
    path = Path(path)
    with atomic_output(path) as tmp:
        if is_zarr_path(path):
            adata.write_zarr(tmp)
        else:
            adata.write_h5ad(tmp)
    return path


def write_obs_columns(source: CellFile, destination: Path, columns: Mapping[str, Any]) -> Path:
    """Write a copy of ``source`` with ``columns`` added to (or replaced in) ``obs``, atomically.

    Every other element keeps its bytes; ``obs`` gains the columns through ``anndata.io.write_elem``, without
    reading the rest of ``obs``. ``destination`` may be the source itself (in-place annotation).

    Parameters
    ----------
    source : CellFile
        The input; it is closed first (the copy is taken from the closed file).
    destination : Path
        Same format as the source (``.zarr`` for a store).
    columns : mapping of str to array-like
        One value per cell each.
    """
    source.close()
    with atomic_output(destination) as tmp:
        if source.path.is_dir():
            shutil.copytree(source.path, tmp)
        else:
            shutil.copyfile(source.path, tmp)
        root = _open_group(tmp, "r+", zarr_store=source.path.is_dir())
        try:
            obs = root["obs"]
            order = [str(name) for name in obs.attrs.get("column-order", [])]
            for name, values in columns.items():
                if name in obs:
                    del obs[name]
                write_elem(obs, name, values)
                if name not in order:
                    order.append(name)
            obs.attrs["column-order"] = order
        finally:
            if isinstance(root, h5py.File):
                root.close()
        if source.path.is_dir():
            import zarr

            zarr.consolidate_metadata(str(tmp))
    return destination
