"""Which genes drive a call: gradient saliency of a label's probability with respect to the input counts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from instructcell.evaluation.saliency import masked_saliency, objective_gradients
from instructcell.tasks import CELL_TYPE_ANNOTATION
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.processing_instructcell import metadata_from_obs


def gene_saliency(
    pipe: InstructCellPipeline,
    cells,
    label: str,
    labels: Sequence[str] | None = None,
    template: str | None = None,
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
    if method not in ("mean_abs_gradient", "masked"):
        raise ValueError(f"method must be 'mean_abs_gradient' or 'masked', got {method!r}.")
    template = template or CELL_TYPE_ANNOTATION.default_instruction
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
