"""Generate cells per condition (cell type, species, tissue...) into one AnnData of integer counts."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from modeling_instructcell import InstructCellPipeline

from .files import atomic_output
from .loading import load_pipeline


def generation_template(fields: Iterable[str]) -> str:
    """Write a cell-generation instruction with the given condition fields (``cell_type`` required)."""
    fields = set(fields)
    if "cell_type" not in fields:
        raise ValueError("Conditions need a 'cell_type' (e.g. {'cell_type': 'naive B cell'}).")
    text = "Generate a {cell_type} cell"
    if "species" in fields:
        text += " from {species}"
    if "tissue" in fields:
        text += " {tissue}" if "species" in fields else " from {tissue}"
    if "drug" in fields:
        text += " treated with {drug}"
    if "sequencing_method" in fields:
        text += ", sequenced with {sequencing_method}"
    return text + "."


def _condition_rows(conditions) -> list[dict[str, Any]]:
    if isinstance(conditions, pd.DataFrame):
        return conditions.to_dict("records")
    if isinstance(conditions, Mapping):
        values = list(conditions.values())
        if values and all(isinstance(v, (list, tuple)) for v in values):
            return pd.DataFrame(conditions).to_dict("records")
        return [dict(conditions)]
    rows = [dict(row) for row in conditions]
    if not rows:
        raise ValueError("Pass at least one condition.")
    return rows


def generate_cells(
    pipe: InstructCellPipeline | str | os.PathLike,
    conditions: Sequence[Mapping[str, Any]] | Mapping[str, Any] | pd.DataFrame,
    n_cells: int = 100,
    template: str | None = None,
    output: str | os.PathLike | None = None,
    batch_size: int = 16,
    seed: int | None = 0,
    library_size: float | None = None,
    force_signal: bool = True,
    progress: bool = True,
    **call_kwargs,
) -> anndata.AnnData:
    """Generate ``n_cells`` cells per condition into one AnnData.

    Parameters
    ----------
    pipe : InstructCellPipeline, or a model folder / Hub id
    conditions : list of dict, dict (of lists) or DataFrame
        One request per row: ``cell_type`` plus optional ``species``, ``tissue``, ``sequencing_method``,
        ``drug``.
    n_cells : int
        Cells per condition.
    template : str, optional
        Instruction; default :func:`generation_template` of the condition fields.
    output : path, optional
        Write the result as .h5ad (atomically).
    batch_size : int
        Requests per model call.
    seed : int, optional
        Seed of the cell sampler (request chunk ``k`` uses ``seed + k``).
    library_size : float, optional
        Total counts of every generated cell; drawn from the learned prior otherwise.
    force_signal : bool
        Condition the VAE on every request even when the model's answer lacks ``<SIGNAL>`` (it is appended).
        With False such requests yield no cells.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    AnnData
        ``X`` integer counts (CSR int32), ``var_names`` = the model's gene vocabulary, ``obs`` = the
        condition of each cell plus ``condition_index`` and the model's ``answer``.
    """
    if n_cells < 1:
        raise ValueError(f"n_cells must be at least 1, got {n_cells}.")
    pipe = load_pipeline(pipe)
    rows = _condition_rows(conditions)
    template = template or generation_template(rows[0])
    pieces = []
    bar = tqdm(total=len(rows) * n_cells, unit="cell", disable=not progress, desc="instructcell generate")
    for k, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        results = pipe(
            template,
            metadata=chunk,
            num_cells=n_cells,
            force_signal=force_signal,
            seed=None if seed is None else seed + k,
            library_size=library_size,
            batch_size=batch_size,
            **call_kwargs,
        )
        for offset, result in enumerate(results):
            cells = result.get("cells")
            if cells is not None:
                cells.obs["condition_index"] = start + offset
                pieces.append(cells)
        bar.update(len(chunk) * n_cells)
    bar.close()
    genes = list(pipe.processor.feature_extractor.gene_names)
    if pieces:
        result = anndata.concat(pieces, join="outer", index_unique="_")
        result.var_names = genes
    else:
        result = anndata.AnnData(
            X=sp.csr_matrix((0, len(genes)), dtype=np.int32), var=pd.DataFrame(index=genes)
        )
    result.obs_names = [f"generated_{i}" for i in range(result.n_obs)]
    result.X = sp.csr_matrix(result.X, dtype=np.int32)
    if output is not None:
        with atomic_output(output) as tmp:
            result.write_h5ad(tmp)
    return result
