"""Whole-dataset inference: annotate / predict drug response for every cell, generate cells per condition.

All helpers take an :class:`~modeling_instructcell.InstructCellPipeline` (or a model folder / Hub id, see
:func:`load_pipeline`). ``.h5ad`` inputs are opened in backed mode and read ``chunk_size`` rows at a time,
genes are aligned once, and outputs are written atomically (temporary file in the destination folder, then
``os.replace``), so a failure never leaves a partial file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.pipeline_instructcell import TASK, metadata_from_obs, resolve_label_set

#: Default instructions. Only ``{input}`` (and ``{drug}``) are required, so any AnnData works; pass your own
#: template (e.g. from the template bank the model was trained on) with ``template=``.
CTA_TEMPLATE = "What is the cell type of this cell? {input}"
DSP_TEMPLATE = "Is this cell sensitive or resistant to {drug}? {input}"
DRUG_RESPONSE_LABELS = ("sensitive", "resistant")

__all__ = [
    "CTA_TEMPLATE",
    "DSP_TEMPLATE",
    "annotate",
    "argmax_agreement",
    "atomic_output",
    "gene_saliency",
    "generate_cells",
    "generation_template",
    "load_pipeline",
    "predict_drug",
]


def load_pipeline(
    model: str | os.PathLike | InstructCellPipeline,
    dtype: torch.dtype | str | None = None,
    device: str | int | None = None,
    trust_remote_code: bool = False,
) -> InstructCellPipeline:
    """Build an :class:`InstructCellPipeline` for a model folder or Hub id (a pipeline is returned as is).

    Parameters
    ----------
    model : str, PathLike or InstructCellPipeline
    dtype : torch.dtype or {"bf16", "bfloat16", "fp32"}, optional
        ``bf16`` runs the language model in bfloat16 (cell encoder and VAE stay float32).
    device : str or int, optional
        ``"cpu"``, ``"cuda"``, ``0``...; default: the first GPU when there is one, else CPU.
    trust_remote_code : bool
        Load the folder's own code rather than this package's classes.
    """
    if isinstance(model, InstructCellPipeline):
        return model
    from transformers import AutoModel, AutoProcessor

    if isinstance(dtype, str):
        dtype = {
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp32": torch.float32,
            "float32": torch.float32,
        }[dtype.lower()]
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    loaded = AutoModel.from_pretrained(str(model), **kwargs).eval()
    processor = AutoProcessor.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    if device is None:
        device = 0 if torch.cuda.is_available() else -1
    return InstructCellPipeline(model=loaded, processor=processor, task=TASK, device=device)


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


def _open(data: anndata.AnnData | str | os.PathLike) -> tuple[anndata.AnnData, Path | None]:
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


def _write_obs_columns(source: Path, destination: Path, columns: dict[str, Any]) -> None:
    """Copy ``source`` to ``destination`` atomically with ``columns`` added to ``obs``; X etc. untouched."""
    with atomic_output(destination) as tmp:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "r+") as f:
            obs = anndata.io.read_elem(f["obs"])
            for name, values in columns.items():
                obs[name] = values
            del f["obs"]
            anndata.io.write_elem(f, "obs", obs)


def annotate(
    pipe: InstructCellPipeline | str | os.PathLike,
    data: anndata.AnnData | str | os.PathLike,
    labels: Sequence[str] | None = None,
    template: str = CTA_TEMPLATE,
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
    template : str
        Instruction with ``{input}``; other placeholders are filled from ``obs`` columns / ``metadata``.
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
    adata, path = _open(data)
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
    _write_obs_columns(path, Path(output), columns)
    return Path(output)


def predict_drug(
    pipe: InstructCellPipeline | str | os.PathLike,
    data: anndata.AnnData | str | os.PathLike,
    drug: str | None = None,
    labels: Sequence[str] = DRUG_RESPONSE_LABELS,
    template: str = DSP_TEMPLATE,
    label_key: str = "instructcell_drug_response",
    probability_key: str = "instructcell_drug_response_probability",
    **kwargs,
) -> anndata.AnnData | Path:
    """Predict drug response for every cell (:func:`annotate` with the DSP instruction and labels).

    ``drug`` fills ``{drug}`` for all cells; without it an ``obs["drug"]`` column is used.
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    if drug is not None:
        metadata["drug"] = drug
    return annotate(
        pipe,
        data,
        labels=labels,
        template=template,
        label_key=label_key,
        probability_key=probability_key,
        metadata=metadata or None,
        **kwargs,
    )


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


def gene_saliency(
    pipe: InstructCellPipeline,
    cells,
    label: str,
    labels: Sequence[str] | None = None,
    template: str = CTA_TEMPLATE,
    metadata: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    top_k: int = 20,
    batch_size: int = 32,
    answer_template: str = "{output}",
    method: str = "mean_abs_gradient",
) -> pd.DataFrame:
    """Genes that drive a call: vanilla gradient of the label's log-probability w.r.t. the input counts.

    Parameters
    ----------
    pipe : InstructCellPipeline
    cells : AnnData, array or matrix
        ``(n_cells, n_input_genes)`` raw counts, aligned to the model's genes by the feature extractor.
    label : str
        The answer whose probability is differentiated.
    labels : sequence of str, optional
        The label set (``label`` must be in it).
    template, metadata, answer_template
        The instruction, its placeholder values, and how an answer is written (``"{output}"``).
    top_k : int
        Genes returned.
    batch_size : int
        Cells per forward/backward pass.
    method : {"mean_abs_gradient", "masked"}
        ``"mean_abs_gradient"``: the objective per cell is ``log p(label | label set)`` (the log of the
        :meth:`score_labels` distribution), or the answer's log-likelihood when no label set is given; its
        gradient with respect to the raw counts (before the model's normalization) is averaged over the
        cells and genes are ranked by the mean absolute gradient. ``"masked"``: the InstructCell paper's
        protocol (:func:`instructcell.evaluation.saliency.masked_saliency`): the loss is the answer's negative
        log-likelihood; a gene counts in a cell when it was measured in the input, more of it lowers the
        loss and its count is positive; per-cell min-max normalized, then averaged over the cells.

    Returns
    -------
    DataFrame
        ``top_k`` rows indexed by gene: ``saliency`` (mean |gradient|, or the mean normalized masked
        saliency), ``mean_gradient`` (signed gradient of the objective: positive = more counts make the
        label more likely) and ``mean_count``.
    """
    from ..evaluation.saliency import masked_saliency, objective_gradients

    if method not in ("mean_abs_gradient", "masked"):
        raise ValueError(f"method must be 'mean_abs_gradient' or 'masked', got {method!r}.")
    model, processor = pipe.model, pipe.processor
    candidates = list(labels) if labels is not None else [label]
    if label not in candidates:
        raise ValueError(f"{label!r} is not in the label set {candidates}.")
    texts = [answer_template.replace("{output}", c) for c in candidates]
    encoded = processor.tokenizer(texts, padding=True, return_tensors="pt")
    features, alignment = processor.feature_extractor(cells, return_tensors="np", return_alignment=True)
    values = features["cell_values"]
    in_vocabulary = np.zeros(values.shape[1], dtype=bool)
    in_vocabulary[alignment.vocab_index] = True
    obs_rows = metadata_from_obs(getattr(cells, "obs", None), values.shape[0])
    if isinstance(metadata, Mapping):
        obs_rows = [{**row, **metadata} for row in obs_rows]
    elif metadata is not None:
        obs_rows = [{**row, **m} for row, m in zip(obs_rows, metadata, strict=True)]
    index = candidates.index(label)
    normalize = method == "mean_abs_gradient" and len(candidates) > 1
    gradients = []
    for start in range(0, values.shape[0], batch_size):
        chunk = values[start : start + batch_size]
        batch = processor(
            text=[template] * len(chunk), cells=chunk, metadata=obs_rows[start : start + len(chunk)]
        )
        gradients.append(
            objective_gradients(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["cell_values"],
                encoded["input_ids"],
                encoded["attention_mask"],
                target_index=[index] * len(chunk),
                normalize=normalize,
            )
        )
    grad = np.concatenate(gradients)
    if method == "masked":
        saliency = masked_saliency(-grad, values, in_vocabulary).mean(0)
    else:
        saliency = np.abs(grad).mean(0)
    genes = list(processor.feature_extractor.gene_names)
    frame = pd.DataFrame(
        {"saliency": saliency, "mean_gradient": grad.mean(0), "mean_count": values.mean(0)}, index=genes
    )
    frame.index.name = "gene"
    return frame.sort_values("saliency", ascending=False, kind="stable").head(top_k)


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
