"""Annotate every cell of an AnnData or .h5ad file (cell type, drug response): labels and probabilities in obs.

Files are opened in backed mode and read ``chunk_size`` rows at a time, genes are aligned once, and the
result is written atomically as a copy of the input whose ``obs`` gains the new columns.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from instructcell.tasks import CELL_TYPE_ANNOTATION, DRUG_SENSITIVITY_PREDICTION
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.pipeline_instructcell import resolve_label_set
from modeling_instructcell.processing_instructcell import metadata_from_obs

from .files import atomic_output, open_h5ad, write_obs_columns
from .loading import load_pipeline


def _row_totals(chunk) -> np.ndarray:
    return np.asarray(chunk.sum(axis=1)).ravel()


def _predict(
    pipe: InstructCellPipeline,
    adata: anndata.AnnData,
    template: str,
    labels: Sequence[str] | None,
    metadata: Mapping[str, Any] | None,
    method: str,
    layer: str | None,
    chunk_size: int,
    batch_size: int,
    progress: bool,
    call_kwargs: dict,
) -> tuple[list, np.ndarray, list[str] | None]:
    """Labels (or answers) and probabilities for every row, reading ``chunk_size`` rows at a time."""
    extractor = pipe.processor.feature_extractor
    parsed = extractor._parse_input(adata, None, None, layer)
    if parsed.n_cells == 0:
        raise ValueError("The AnnData has 0 cells; nothing to annotate.")
    if parsed.gene_names is None and parsed.gene_ids is None:
        raise ValueError("The AnnData has no gene names (var_names); they are needed to align genes.")
    alignment = extractor.align_genes(parsed.gene_names, parsed.gene_ids)  # raises on low overlap
    obs_rows = metadata_from_obs(adata.obs, parsed.n_cells)
    if metadata:
        obs_rows = [{**row, **metadata} for row in obs_rows]
    label_set = resolve_label_set(template, labels, obs_rows[:1], pipe.model.config)
    if method not in ("score", "generate"):
        raise ValueError(f"method must be 'score' or 'generate', got {method!r}.")
    if method == "score" and label_set is None:
        raise ValueError(
            "method='score' needs a label set: pass labels=[...], a template with {choices}, or a model "
            "whose config has label_names; or use method='generate' for free-text answers."
        )
    predictions: list = [None] * parsed.n_cells
    probabilities = np.full(parsed.n_cells, np.nan, dtype=np.float32)
    n_empty = 0
    bar = tqdm(total=parsed.n_cells, unit="cell", disable=not progress, desc="instructcell")
    for start in range(0, parsed.n_cells, chunk_size):
        stop = min(start + chunk_size, parsed.n_cells)
        chunk = parsed.matrix[start:stop]
        if not sp.issparse(chunk):
            chunk = np.asarray(chunk)
        kept = _row_totals(chunk[:, alignment.input_index]) > 0
        n_empty += int((~kept).sum())
        rows = np.flatnonzero(kept)
        if rows.size:
            results = pipe(
                template,
                cells=chunk[rows],
                alignment=alignment,
                metadata=[obs_rows[start + i] for i in rows],
                labels=label_set,
                generate=method == "generate",
                batch_size=batch_size,
                **call_kwargs,
            )
            for i, result in zip(rows, results, strict=True):
                if label_set is None:
                    predictions[start + i] = result["answer"]
                else:
                    predictions[start + i] = result["label"]
                    if result["probability"] is not None:
                        probabilities[start + i] = result["probability"]
        bar.update(stop - start)
    bar.close()
    if n_empty:
        import warnings

        warnings.warn(
            f"{n_empty} cells have no counts in the model's genes; they were left unannotated (NaN).",
            stacklevel=3,
        )
    return predictions, probabilities, label_set


def annotate(
    pipe: InstructCellPipeline | str | os.PathLike,
    data: anndata.AnnData | str | os.PathLike,
    labels: Sequence[str] | None = None,
    template: str | None = None,
    output: str | os.PathLike | None = None,
    label_key: str = "instructcell_label",
    probability_key: str = "instructcell_probability",
    method: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    layer: str | None = None,
    chunk_size: int = 1024,
    batch_size: int = 64,
    progress: bool = True,
    **call_kwargs,
) -> anndata.AnnData | Path:
    """Annotate every cell; write the label and its probability into ``obs``.

    Parameters
    ----------
    pipe : InstructCellPipeline, or a model folder / Hub id
    data : AnnData or path to an .h5ad file
        An in-memory AnnData is updated in place. A file is read in backed mode, ``chunk_size`` rows at a
        time, and written to ``output`` (required; may equal ``data``) as a copy whose ``obs`` gains the
        two columns. Nothing else in the file changes.
    labels : list of str, optional
        The label set. Default: ``{choices}`` metadata or ``model.config.label_names``.
    template : str, optional
        Instruction with ``{input}``; other placeholders are filled from ``obs`` columns / ``metadata``.
        Default: the cell type annotation task's instruction.
    output : path, optional
        Destination .h5ad for file input (written atomically).
    label_key, probability_key : str
        ``obs`` columns to write. Cells the model does not name a label for (``method="generate"``) or with
        no counts in the model's genes get NaN.
    method : {"score", "generate"}, optional
        ``"score"`` (default with a label set): label = arg-max of the label distribution (one encoder and
        one decoder pass per batch, no generation). ``"generate"``: greedy answer parsed with
        ``extract_label``, probability = that label's probability; without a label set the raw answers
        are written and no probability.
    metadata : dict, optional
        Placeholder values for all cells (override ``obs``).
    layer : str, optional
        AnnData layer with raw counts (default X).
    chunk_size, batch_size : int
        Rows read per chunk; prompts per model call.
    progress : bool
        Show a tqdm bar.
    **call_kwargs
        Passed to the pipeline (``answer_template``, ``max_new_tokens``, ``max_rows_per_pass``...).

    Returns
    -------
    AnnData (in-memory input) or Path (file input)
    """
    pipe = load_pipeline(pipe)
    template = template or CELL_TYPE_ANNOTATION.default_instruction
    adata, path = open_h5ad(data)
    if path is not None and output is None:
        raise ValueError("Annotating a file needs output=<path>.h5ad (it may be the input path itself).")
    try:
        if method is None:
            known = resolve_label_set(template, labels, [dict(metadata or {})], pipe.model.config) is not None
            method = "score" if known or "choices" in (metadata or {}) else "generate"
        predictions, probabilities, label_set = _predict(
            pipe,
            adata,
            template,
            labels,
            metadata,
            method,
            layer,
            chunk_size,
            batch_size,
            progress,
            call_kwargs,
        )
    finally:
        if path is not None:
            adata.file.close()
    if label_set is not None:
        label_column = pd.Categorical(predictions, categories=list(label_set))
    else:
        label_column = pd.array(predictions, dtype="string")
    columns = {label_key: label_column}
    if label_set is not None:
        columns[probability_key] = probabilities
    if path is None:
        for name, values in columns.items():
            adata.obs[name] = values
        if output is not None:
            with atomic_output(output) as tmp:
                adata.write_h5ad(tmp)
        return adata
    write_obs_columns(path, Path(output), columns)
    return Path(output)


def predict_drug(
    pipe: InstructCellPipeline | str | os.PathLike,
    data: anndata.AnnData | str | os.PathLike,
    drug: str | None = None,
    labels: Sequence[str] | None = None,
    template: str | None = None,
    label_key: str = "instructcell_drug_response",
    probability_key: str = "instructcell_drug_response_probability",
    **kwargs,
) -> anndata.AnnData | Path:
    """Predict drug response for every cell (:func:`annotate` with the DSP instruction and labels).

    ``drug`` fills ``{drug}`` for all cells; without it an ``obs["drug"]`` column is used. ``labels`` and
    ``template`` default to the drug sensitivity task's (sensitive / resistant).
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    if drug is not None:
        metadata["drug"] = drug
    return annotate(
        pipe,
        data,
        labels=labels or list(DRUG_SENSITIVITY_PREDICTION.default_labels),
        template=template or DRUG_SENSITIVITY_PREDICTION.default_instruction,
        label_key=label_key,
        probability_key=probability_key,
        metadata=metadata or None,
        **kwargs,
    )


def argmax_agreement(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """How often the label distribution's arg-max equals the label parsed from the greedy answer.

    Parameters
    ----------
    results : list of dict
        Pipeline outputs made with ``generate=True`` and a label set.

    Returns
    -------
    dict
        ``agreement`` (over all cells; an unparseable greedy answer counts as disagreement),
        ``agreement_answered`` (over cells whose greedy answer names a label), ``answered`` (fraction of such
        cells) and ``n``.
    """
    scored = [r for r in results if r.get("argmax_label") is not None and r.get("answer") is not None]
    if not scored:
        raise ValueError(
            "No results with both a greedy answer and a label distribution (generate=True, labels=...)."
        )
    answered = [r for r in scored if r["label"] is not None]
    agree = sum(r["label"] == r["argmax_label"] for r in answered)
    return {
        "agreement": agree / len(scored),
        "agreement_answered": agree / len(answered) if answered else float("nan"),
        "answered": len(answered) / len(scored),
        "n": float(len(scored)),
    }
