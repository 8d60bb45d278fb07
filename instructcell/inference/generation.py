"""Generate cells per condition (cell type, species, tissue...) into one AnnData of integer counts."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from instructcell.outputs import check_destination
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.processing_instructcell import is_present

from .arguments import check_whole_number
from .files import write_anndata
from .loading import ModelSource, load_pipeline

__all__ = ["generate_cells", "generation_template"]

#: Sampled count values (cells x genes) per model call; larger requests are drawn in several calls.
MAX_VALUES_PER_CALL = 1 << 22


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
    """One dict per condition with its present values only (a missing value never becomes "nan")."""
    if isinstance(conditions, pd.DataFrame):
        rows = conditions.to_dict("records")
    elif isinstance(conditions, Mapping):
        values = list(conditions.values())
        if values and all(isinstance(v, (list, tuple)) for v in values):
            rows = pd.DataFrame(conditions).to_dict("records")
        else:
            rows = [dict(conditions)]
    elif isinstance(conditions, str) or not isinstance(conditions, Iterable):
        raise ValueError("conditions must be a list of dicts, a dict (of lists) or a DataFrame.")
    else:
        rows = []
        for row in conditions:
            if not isinstance(row, Mapping):
                raise ValueError(
                    f"Each condition must be a dict such as {{'cell_type': 'B cell'}}, got {row!r}."
                )
            rows.append(dict(row))
    if not rows:
        raise ValueError("Pass at least one condition.")
    rows = [{str(k): v for k, v in row.items() if is_present(v)} for row in rows]
    for index, row in enumerate(rows):
        if "cell_type" not in row:
            raise ValueError(f"Condition {index} has no cell_type (e.g. {{'cell_type': 'naive B cell'}}).")
    return rows


def _exact_totals(counts: np.ndarray, total: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Redraw each cell of a condition with exactly ``total`` counts from its gene proportions (multinomial).

    A sampled cell without any counts (all genes dropped out) has no proportions of its own: it is drawn
    from the pooled proportions of the condition's other cells.

    Parameters
    ----------
    counts : numpy.ndarray
        ``(n_cells, n_genes)`` sampled integer counts of one condition.
    total : int
        Counts per cell.
    rng : numpy.random.Generator

    Returns
    -------
    numpy.ndarray, int
        ``(n_cells, n_genes)`` int64 counts, and the number of cells left at zero (when every cell of the
        condition came out empty).
    """
    counts = counts.astype(np.float64)
    sums = counts.sum(axis=1, keepdims=True)
    pooled = counts.sum(axis=0)
    if pooled.sum() == 0:
        return np.zeros(counts.shape, dtype=np.int64), counts.shape[0]
    proportions = np.where(sums > 0, counts / np.where(sums > 0, sums, 1.0), pooled / pooled.sum())
    return rng.multinomial(total, proportions), 0


def _check_library_size(library_size: Any) -> int | None:
    if library_size is None:
        return None
    if isinstance(library_size, bool) or not isinstance(library_size, (int, float, np.integer, np.floating)):
        raise ValueError(f"library_size must be a whole number of counts, got {library_size!r}.")
    if not np.isfinite(library_size) or library_size < 1 or library_size != int(library_size):
        raise ValueError(
            f"library_size must be a whole number of counts of at least 1, got {library_size!r}."
        )
    return int(library_size)


def generate_cells(
    pipe: InstructCellPipeline | ModelSource | str | os.PathLike,
    conditions: Sequence[Mapping[str, Any]] | Mapping[str, Any] | pd.DataFrame,
    n_cells: int = 100,
    template: str | None = None,
    output: str | os.PathLike | None = None,
    batch_size: int = 16,
    seed: int | None = 0,
    library_size: int | None = None,
    force_signal: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    **call_kwargs,
) -> anndata.AnnData:
    """Generate ``n_cells`` cells per condition into one AnnData.

    Parameters
    ----------
    pipe : InstructCellPipeline, ModelSource, or a model folder / Hub id
        A folder or :class:`ModelSource` is loaded after the conditions and the output were checked.
    conditions : list of dict, dict (of lists) or DataFrame
        One request per row: ``cell_type`` plus optional ``species``, ``tissue``, ``sequencing_method``,
        ``drug``. Missing values (None, NaN, empty) are left out of that row's request.
    n_cells : int
        Cells per condition.
    template : str, optional
        One instruction for every condition. Default: each condition's own :func:`generation_template`, built
        from the fields that condition has.
    output : path, optional
        Write the result (``.h5ad``, or a ``.zarr`` store), atomically; checked before the model is loaded.
    batch_size : int
        Requests per model call.
    seed : int, optional
        Seed of the cell sampler: the same call gives the same cells. None draws fresh cells every call.
    library_size : int, optional
        Total counts of every generated cell: the cell decoder is conditioned on it and each sampled cell is
        then redrawn with exactly this many counts from its own gene proportions (multinomial; a sampled cell
        without counts uses the pooled proportions of its condition's cells). Without it, the decoder draws
        the library size from its learned prior and totals vary from cell to cell.
    force_signal : bool
        Condition the VAE on every request even when the model's answer lacks ``<SIGNAL>`` (it is appended).
        With False such requests yield no cells.
    progress : bool
        Show a tqdm bar.
    overwrite : bool
        Replace an existing ``output``.
    **call_kwargs
        Passed to the pipeline (``max_new_tokens``, ``generate_kwargs``...).

    Returns
    -------
    AnnData
        ``X`` integer counts (CSR int32), ``var_names`` = the model's gene vocabulary, ``obs`` = the
        condition of each cell plus ``condition_index`` and the model's ``answer``; cells are ordered by
        condition.
    """
    n_cells = check_whole_number("n_cells", n_cells)
    batch_size = check_whole_number("batch_size", batch_size)
    seed = None if seed is None else check_whole_number("seed", seed, minimum=0)
    if template is not None and (not isinstance(template, str) or not template.strip()):
        raise ValueError("template must be a non-empty instruction string.")
    library_size = _check_library_size(library_size)
    rows = _condition_rows(conditions)
    if output is not None:
        output = check_destination(output, overwrite)
    pipe = load_pipeline(pipe)
    genes = list(pipe.processor.feature_extractor.gene_names)
    cells_per_call = max(1, min(n_cells, MAX_VALUES_PER_CALL // max(len(genes), 1)))
    requests_per_call = max(1, min(batch_size, MAX_VALUES_PER_CALL // (cells_per_call * max(len(genes), 1))))
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(template or generation_template(row), []).append(index)
    pieces: dict[int, list[anndata.AnnData]] = {index: [] for index in range(len(rows))}
    n_empty = 0
    call = 0
    bar = tqdm(total=len(rows) * n_cells, unit="cell", disable=not progress, desc="instructcell generate")
    for instruction, members in groups.items():
        for start in range(0, len(members), requests_per_call):
            batch = members[start : start + requests_per_call]
            for drawn in range(0, n_cells, cells_per_call):
                count = min(cells_per_call, n_cells - drawn)
                results = pipe(
                    instruction,
                    metadata=[rows[i] for i in batch],
                    num_cells=count,
                    force_signal=force_signal,
                    seed=None if seed is None else seed + call,
                    library_size=library_size,
                    batch_size=len(batch),
                    **call_kwargs,
                )
                for index, result in zip(batch, results, strict=True):
                    cells = result.get("cells")
                    if cells is None:
                        continue
                    if library_size is not None:
                        rng = np.random.default_rng(None if seed is None else [seed, call, index])
                        counts, empty = _exact_totals(cells.X.toarray(), library_size, rng)
                        cells.X = sp.csr_matrix(counts.astype(np.int32))
                        n_empty += empty
                    cells.obs["condition_index"] = index
                    pieces[index].append(cells)
                call += 1
                bar.update(len(batch) * count)
    bar.close()
    if n_empty:
        warnings.warn(
            f"{n_empty} generated cells are all zero: every cell sampled for their conditions was empty, so "
            f"there were no gene proportions to draw library_size={library_size} counts from.",
            stacklevel=2,
        )
    ordered = [piece for index in range(len(rows)) for piece in pieces[index]]
    if ordered:
        result = anndata.concat(ordered, join="outer", index_unique="_")
        result.var_names = genes
    else:
        result = anndata.AnnData(
            X=sp.csr_matrix((0, len(genes)), dtype=np.int32), var=pd.DataFrame(index=genes)
        )
    result.obs_names = [f"generated_{i}" for i in range(result.n_obs)]
    result.X = sp.csr_matrix(result.X, dtype=np.int32)
    if output is not None:
        write_anndata(result, Path(output))
    return result
