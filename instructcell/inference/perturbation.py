"""Predict how the cells of an AnnData or .h5ad file respond to a perturbation: integer-count cells out.

Each control cell is asked the perturbation response instruction (``{input}`` the cell, ``{perturbation}`` the
perturbation in words); the model answers ``<SIGNAL>`` and its VAE decodes the cell under that condition into
``n_per_cell`` predicted perturbed cells. Only perturbations the model was trained on are accepted
(``config.perturbation_names``). With a condition column, only its control cells are read, and every cell type
of the file must have some. When the file also holds real perturbed cells (``compare_value``), a figure shows
the predicted vs real mean expression of their top DEGs per cell type, and another the library sizes and
sparsity of predicted, real perturbed and control cells.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from instructcell.outputs import check_destination, same_path
from instructcell.tasks import PERTURBATION_RESPONSE
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.processing_instructcell import metadata_from_obs

from .files import read_anndata, write_anndata
from .loading import load_pipeline

__all__ = ["check_perturbation", "control_cells", "predict_perturbation"]


def _normalized(text: str) -> str:
    return " ".join(str(text).lower().split())


def check_perturbation(perturbation: str, known: Sequence[str] | None) -> str:
    """Return the model's own spelling of ``perturbation``; a ``ValueError`` for one it was not trained on.

    Parameters
    ----------
    perturbation : str
        The perturbation in words, compared case- and whitespace-insensitively.
    known : sequence of str, optional
        ``config.perturbation_names`` of the model.
    """
    if not known:
        raise ValueError(
            "This model was not trained to predict perturbation responses (its config has no "
            "perturbation_names): train it on prp data (datasets_builder.PerturbationSource)."
        )
    by_text = {_normalized(name): name for name in known}
    if _normalized(perturbation) not in by_text:
        raise ValueError(
            f"Unknown perturbation {perturbation!r}: this model was trained on {sorted(known)}; a prediction "
            "for another perturbation would be made up. Use one of those words."
        )
    return by_text[_normalized(perturbation)]


def _column(obs: pd.DataFrame, key: str, what: str) -> np.ndarray:
    if key not in obs.columns:
        raise ValueError(f"obs has no column {key!r} ({what}); columns: {list(obs.columns)}.")
    missing = obs[key].isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} cells have no {key!r} value (e.g. {obs.index[missing][0]!r}): fill in "
            f"their {what} or drop them."
        )
    return obs[key].astype(str).to_numpy()


def control_cells(
    obs: pd.DataFrame,
    condition_key: str | None = None,
    control_value: str = "control",
    cell_type_key: str | None = None,
) -> np.ndarray:
    """Rows of the cells to predict from: the control cells, or every cell without a condition column.

    Parameters
    ----------
    obs : pandas.DataFrame
        The file's ``obs``.
    condition_key : str, optional
        Column saying each cell's condition; None treats every cell as unperturbed.
    control_value : str
        Its value for control cells.
    cell_type_key : str, optional
        Column of cell types: each type of the file must have control cells.

    Returns
    -------
    numpy.ndarray
        ``(n_controls,)`` row indices.
    """
    if condition_key is None:
        return np.arange(len(obs))
    conditions = _column(obs, condition_key, "condition")
    is_control = conditions == control_value
    if not is_control.any():
        raise ValueError(
            f"No cell has {condition_key} == {control_value!r} (values: {sorted(set(conditions))}): pass the "
            "control condition's value (--control-value)."
        )
    if cell_type_key is not None:
        types = _column(obs, cell_type_key, "cell type")
        orphans = sorted(set(types[~is_control]) - set(types[is_control]))
        if orphans:
            raise ValueError(
                f"No control cells of cell type(s) {orphans}: their response cannot be predicted from this "
                "file. Add control cells of those types or drop their cells."
            )
    return np.flatnonzero(is_control)


def predict_perturbation(
    pipe: InstructCellPipeline | str | os.PathLike,
    data: anndata.AnnData | str | os.PathLike,
    perturbation: str,
    output: str | os.PathLike | None = None,
    n_per_cell: int = 1,
    condition_key: str | None = None,
    control_value: str = "control",
    cell_type_key: str | None = None,
    compare_value: str | None = None,
    figure: str | os.PathLike | None = None,
    template: str | None = None,
    overwrite: bool = False,
    chunk_size: int = 1024,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> anndata.AnnData:
    """Predict ``n_per_cell`` perturbed cells for every control cell.

    Parameters
    ----------
    pipe : InstructCellPipeline, or a model folder / Hub id
    data : AnnData or path to an .h5ad file
        Raw counts; a file is read in backed mode, ``chunk_size`` rows at a time.
    perturbation : str
        The perturbation in words; one of the model's ``config.perturbation_names``.
    output : path, optional
        Destination .h5ad (written atomically); it must differ from the input and not exist unless
        ``overwrite``.
    n_per_cell : int
        Predicted cells per input cell.
    condition_key, control_value, cell_type_key
        Which cells are controls (:func:`control_cells`).
    compare_value : str, optional
        The condition value of real perturbed cells in the file, compared with the prediction in ``figure``.
    figure : path, optional
        PNG of predicted vs real mean expression of the top DEGs per cell type (needs ``compare_value``), and
        ``<figure stem>_counts.png`` with library sizes and detected genes.
    template : str, optional
        Instruction with ``{input}`` and ``{perturbation}``; default the task's.
    overwrite : bool
        Replace an existing ``output``.
    chunk_size, batch_size : int
        Rows read at once; prompts per model call.
    seed : int
        Seed of the cell sampler (chunk ``k`` uses ``seed + k``).
    progress : bool
        Show a progress bar.

    Returns
    -------
    AnnData
        ``X`` integer counts (CSR int32) over the model's genes; ``obs``: ``source_cell`` (the input cell),
        ``perturbation`` and the input cell's ``obs`` columns.
    """
    if n_per_cell < 1:
        raise ValueError(f"n_per_cell must be at least 1, got {n_per_cell}.")
    if figure is not None and (compare_value is None or condition_key is None):
        raise ValueError("A figure compares with real perturbed cells: pass condition_key and compare_value.")
    in_memory = isinstance(data, anndata.AnnData)
    if output is not None:
        if not in_memory and same_path(output, data):
            raise ValueError(f"{output} is the input file: write the predicted cells to another file.")
        output = check_destination(output, overwrite)
    pipe = load_pipeline(pipe)
    perturbation = check_perturbation(perturbation, getattr(pipe.model.config, "perturbation_names", None))
    adata = data if in_memory else read_anndata(data)
    obs = adata.obs
    rows = control_cells(obs, condition_key, control_value, cell_type_key)
    real_rows = None
    if compare_value is not None:
        real_rows = np.flatnonzero(_column(obs, condition_key, "condition") == compare_value)
        if real_rows.size == 0:
            raise ValueError(f"No cell has {condition_key} == {compare_value!r} to compare with.")
    template = template or PERTURBATION_RESPONSE.default_instruction
    obs_rows = metadata_from_obs(obs, len(obs))
    pieces, sources = [], []
    bar = tqdm(total=rows.size * n_per_cell, unit="cell", disable=not progress, desc="instructcell perturb")
    for k, start in enumerate(range(0, rows.size, chunk_size)):
        chunk = rows[start : start + chunk_size]
        results = pipe(
            template,
            cells=adata[chunk],
            metadata=[{**obs_rows[i], "perturbation": perturbation} for i in chunk],
            num_cells=n_per_cell,
            force_signal=True,
            seed=seed + k,
            batch_size=batch_size,
        )
        for i, result in zip(chunk, results, strict=True):
            pieces.append(sp.csr_matrix(result["cells"].X))
            sources += [i] * result["cells"].n_obs
        bar.update(chunk.size * n_per_cell)
    bar.close()
    genes = [str(g) for g in pipe.processor.feature_extractor.gene_names]
    result = _predicted_anndata(pieces, sources, obs, genes, perturbation)
    if figure is not None:
        real = pipe.processor.feature_extractor(adata[real_rows], return_tensors="np")["cell_values"]
        controls = pipe.processor.feature_extractor(adata[rows], return_tensors="np")["cell_values"]
        _figures(
            Path(figure),
            result,
            sp.csr_matrix(real),
            sp.csr_matrix(controls),
            None if cell_type_key is None else obs[cell_type_key].astype(str).to_numpy()[real_rows],
            None if cell_type_key is None else obs[cell_type_key].astype(str).to_numpy()[rows],
            cell_type_key,
            perturbation,
        )
    if not in_memory and adata.isbacked:
        adata.file.close()
    if output is not None:
        write_anndata(result, output)
    return result


def _predicted_anndata(
    pieces: list[sp.csr_matrix], sources: list[int], obs: pd.DataFrame, genes: list[str], perturbation: str
) -> anndata.AnnData:
    """Predicted counts with their input cell's ``obs`` row, ``source_cell`` and ``perturbation``."""
    counts = (
        sp.vstack(pieces).tocsr().astype(np.int32)
        if pieces
        else sp.csr_matrix((0, len(genes)), dtype=np.int32)
    )
    cell_obs = obs.iloc[sources].copy()
    cell_obs.insert(0, "source_cell", cell_obs.index.astype(str))
    cell_obs.insert(1, "perturbation", perturbation)
    numbers = pd.Series(sources).groupby(sources).cumcount().to_numpy()
    cell_obs.index = [
        f"{name}_predicted_{n}" for name, n in zip(cell_obs["source_cell"], numbers, strict=True)
    ]
    return anndata.AnnData(X=counts, obs=cell_obs, var=pd.DataFrame(index=genes))


def _rows_of(types: np.ndarray | None, group: str, n: int) -> np.ndarray:
    """Rows of cell type ``group`` (all ``n`` rows without cell types)."""
    return np.arange(n) if types is None else np.flatnonzero(types == group)


def _gene_means(values: sp.csr_matrix, genes: np.ndarray) -> np.ndarray:
    return np.asarray(values[:, genes].mean(axis=0)).ravel()


def _figures(
    path: Path,
    predicted: anndata.AnnData,
    real: sp.csr_matrix,
    controls: sp.csr_matrix,
    real_types: np.ndarray | None,
    control_types: np.ndarray | None,
    cell_type_key: str | None,
    perturbation: str,
) -> None:
    """Draw the top-DEG mean-expression figure per cell type and the count-distribution figure."""
    from instructcell.evaluation.metrics.generation import normalize_log1p
    from instructcell.evaluation.metrics.perturbation import count_statistics, mean_r2, top_degs
    from instructcell.evaluation.plotting import plot_count_distributions, plot_perturbation_means

    predicted_types = None if cell_type_key is None else predicted.obs[cell_type_key].astype(str).to_numpy()
    groups = ["all cells"] if real_types is None else sorted(set(real_types) & set(control_types))
    panels = {}
    for group in groups:
        real_group = normalize_log1p(real[_rows_of(real_types, group, real.shape[0])])
        control_group = normalize_log1p(controls[_rows_of(control_types, group, controls.shape[0])])
        predicted_group = normalize_log1p(predicted.X[_rows_of(predicted_types, group, predicted.n_obs)])
        if min(real_group.shape[0], control_group.shape[0], predicted_group.shape[0]) < 2:
            continue
        degs = top_degs(real_group, control_group)
        r2 = mean_r2(predicted_group, real_group, degs)
        panels[f"{group}: top {degs.size} DEGs"] = {
            "real": _gene_means(real_group, degs),
            f"predicted (R² {'n/a' if r2 is None else f'{r2:.2f}'})": _gene_means(predicted_group, degs),
            "control (no change)": _gene_means(control_group, degs),
        }
    if not panels:
        raise ValueError("Too few real perturbed or control cells per cell type to draw the figure.")
    plot_perturbation_means(path, f"Response to {perturbation}: predicted vs real", panels)
    plot_count_distributions(
        path.with_name(f"{path.stem}_counts.png"),
        f"Predicted ({perturbation}) and real cells: integer counts",
        {
            "real perturbed": count_statistics(real),
            "control": count_statistics(controls),
            "predicted": count_statistics(predicted.X),
        },
    )
