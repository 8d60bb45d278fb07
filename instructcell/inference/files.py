"""Reading users' .h5ad files in backed mode and writing results atomically (never a partial file)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anndata
import h5py


@contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def open_h5ad(data: anndata.AnnData | str | os.PathLike) -> tuple[anndata.AnnData, Path | None]:
    """The AnnData itself, or a backed view of the file and its path (clear errors for unreadable files)."""
    if isinstance(data, anndata.AnnData):
        return data, None
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"No such .h5ad file: {path}")
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as err:  # h5py / anndata raise many types for a broken or empty file
        raise ValueError(f"Cannot read {path} as an .h5ad file ({type(err).__name__}: {err}).") from err
    return adata, path


def write_obs_columns(source: Path, destination: Path, columns: dict[str, Any]) -> None:
    """Copy ``source`` to ``destination`` atomically with ``columns`` added to ``obs``; X etc. untouched."""
    with atomic_output(destination) as tmp:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "r+") as f:
            obs = anndata.io.read_elem(f["obs"])
            for name, values in columns.items():
                obs[name] = values
            del f["obs"]
            anndata.io.write_elem(f, "obs", obs)
