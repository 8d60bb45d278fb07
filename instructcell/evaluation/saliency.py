"""Vanilla-gradient saliency of the input genes: the one gradient loop, the paper's mask, per-label rankings.

:func:`objective_gradients` differentiates the answer log-likelihood computed by
:meth:`~modeling_instructcell.InstructCellForConditionalGeneration.score_labels` with respect to the raw input
counts (``cell_values``, before the model's normalize-total + log1p). Everything else is plain numpy:

* :func:`masked_saliency` is the marker-gene protocol of the InstructCell paper: for the loss ``L`` (negative
  log-likelihood of the cell's true answer) a gene counts when it is in the vocabulary, ``dL/dx < 0``
  (more of it lowers the loss) and its count in the cell is positive; its saliency is ``|dL/dx|``, other
  genes get 0, and each cell's saliency vector is min-max normalized.
* :func:`mean_saliency_by_label` averages over the cells of each label and :func:`top_genes` ranks genes.

:func:`instructcell.inference.gene_saliency` (AnnData input) and :func:`row_answer_saliency` (dataset rows)
both call :func:`objective_gradients`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

__all__ = [
    "masked_saliency",
    "mean_saliency_by_label",
    "objective_gradients",
    "row_answer_saliency",
    "top_genes",
]


def objective_gradients(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cell_values: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_attention_mask: torch.Tensor,
    target_index: Sequence[int] | torch.Tensor,
    normalize: bool = False,
) -> np.ndarray:
    """Gradient of each prompt's answer log-likelihood with respect to its raw input counts.

    The objective of prompt ``i`` is ``score_labels(...).log_likelihoods[i, target_index[i]]``: the summed
    token log-probabilities of candidate ``target_index[i]`` (the negative of its loss), or with
    ``normalize=True`` its log-probability under the softmax over the candidates. Prompts do not interact
    (eval mode, no batch statistics), so the gradient of the summed objective is each prompt's own gradient.

    Parameters
    ----------
    model : InstructCellForConditionalGeneration
        Switched to eval mode for the call and restored afterwards.
    input_ids, attention_mask : torch.Tensor
        ``(batch, seq_len)`` prompts, each with exactly one cell.
    cell_values : torch.Tensor
        ``(batch, n_genes)`` raw counts, one cell per prompt.
    candidate_ids, candidate_attention_mask : torch.Tensor
        Tokenized candidate answers: ``(n_candidates, len)`` shared by all prompts or
        ``(batch, n_candidates, len)`` per prompt.
    target_index : sequence of int or torch.Tensor
        ``(batch,)`` the candidate whose log-likelihood is differentiated, per prompt.
    normalize : bool
        Differentiate ``log softmax`` over the candidates instead of the raw log-likelihood.

    Returns
    -------
    numpy.ndarray
        ``(batch, n_genes)`` float64 gradients of the objective (= minus the gradient of the loss).
    """
    if cell_values.dim() != 2 or cell_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"Saliency needs exactly one cell per prompt: got cell_values {tuple(cell_values.shape)} for "
            f"{input_ids.shape[0]} prompts."
        )
    device = next(model.parameters()).device
    target = torch.as_tensor(target_index, dtype=torch.long, device=device).reshape(-1)
    if target.shape[0] != input_ids.shape[0]:
        raise ValueError(f"target_index has {target.shape[0]} entries for {input_ids.shape[0]} prompts.")
    values = cell_values.detach().to(device).float().requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            scores = model.score_labels(
                input_ids.to(device),
                attention_mask.to(device),
                values,
                candidate_ids.to(device),
                candidate_attention_mask.to(device),
            )
            log_likelihoods = scores.log_likelihoods
            if normalize:
                log_likelihoods = torch.log_softmax(log_likelihoods, dim=-1)
            objective = log_likelihoods.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(objective, values)
    finally:
        model.train(was_training)
    return grad.detach().cpu().double().numpy()


def masked_saliency(
    loss_gradients: np.ndarray, counts: np.ndarray, in_vocabulary: np.ndarray | None = None
) -> np.ndarray:
    """Compute the paper's per-cell saliency: expressed genes that lower the loss, min-max normalized.

    Parameters
    ----------
    loss_gradients : numpy.ndarray
        ``(n_cells, n_genes)`` gradient of each cell's loss (negative log-likelihood of its true answer)
        with respect to its input counts.
    counts : numpy.ndarray
        ``(n_cells, n_genes)`` the input counts.
    in_vocabulary : numpy.ndarray, optional
        ``(n_genes,)`` booleans: genes of the vocabulary actually measured in the input (genes the input
        lacked are zero-filled and must not count). Default: all genes.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_genes)`` in ``[0, 1]``. Before normalization a gene's saliency is ``-dL/dx`` where
        ``dL/dx < 0``, its count is positive and it is in the vocabulary, else 0; then each cell's row is
        min-max normalized over all genes, ``(s - min) / (max - min)``. A cell where no gene passes the mask
        (max = min) is all zeros.
    """
    loss_gradients = np.asarray(loss_gradients, dtype=np.float64)
    counts = np.asarray(counts)
    if loss_gradients.ndim != 2 or loss_gradients.shape != counts.shape:
        raise ValueError(
            f"loss_gradients {loss_gradients.shape} and counts {counts.shape} must both be "
            "(n_cells, n_genes)."
        )
    mask = (loss_gradients < 0) & (counts > 0)
    if in_vocabulary is not None:
        in_vocabulary = np.asarray(in_vocabulary, dtype=bool)
        if in_vocabulary.shape != (counts.shape[1],):
            raise ValueError(
                f"in_vocabulary must have shape ({counts.shape[1]},), got {in_vocabulary.shape}."
            )
        mask &= in_vocabulary[None, :]
    saliency = np.where(mask, -loss_gradients, 0.0)
    low = saliency.min(axis=1, keepdims=True)
    span = saliency.max(axis=1, keepdims=True) - low
    return np.divide(saliency - low, span, out=np.zeros_like(saliency), where=span > 0)


def mean_saliency_by_label(saliency: np.ndarray, labels: Sequence[str], genes: Sequence[str]) -> pd.DataFrame:
    """Average per-cell saliency over the cells of each label.

    Parameters
    ----------
    saliency : numpy.ndarray
        ``(n_cells, n_genes)`` e.g. from :func:`masked_saliency`.
    labels : sequence of str
        ``(n_cells,)`` each cell's label.
    genes : sequence of str
        ``(n_genes,)`` gene names.

    Returns
    -------
    pandas.DataFrame
        ``(n_labels, n_genes)`` mean saliency, index = sorted labels, columns = genes; ``attrs["n_cells"]``
        maps each label to its number of cells.
    """
    saliency = np.asarray(saliency, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    if saliency.ndim != 2 or saliency.shape != (len(labels), len(genes)):
        raise ValueError(
            f"saliency must be (n_cells, n_genes) = ({len(labels)}, {len(genes)}), got {saliency.shape}."
        )
    names = sorted(set(labels))
    table = pd.DataFrame(
        np.stack([saliency[labels == name].mean(axis=0) for name in names])
        if names
        else np.zeros((0, len(genes))),
        index=pd.Index(names, name="label"),
        columns=list(genes),
    )
    table.attrs["n_cells"] = {name: int((labels == name).sum()) for name in names}
    return table


def top_genes(table: pd.DataFrame, k: int = 10) -> dict[str, list[tuple[str, float]]]:
    """Return the ``k`` genes with the highest value per row (label), ties broken by column order.

    Parameters
    ----------
    table : pandas.DataFrame
        ``(n_labels, n_genes)`` e.g. from :func:`mean_saliency_by_label`.
    k : int
        Genes per label; genes with value 0 (never passed the mask) are left out.

    Returns
    -------
    dict of str to list of (str, float)
        Label -> ``[(gene, value), ...]`` in decreasing order.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    out = {}
    genes = np.asarray(table.columns)
    for label, row in zip(table.index, table.to_numpy(dtype=np.float64), strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        out[str(label)] = [(str(genes[i]), float(row[i])) for i in order if row[i] > 0]
    return out


def row_answer_saliency(
    model: Any,
    processor: Any,
    rows: Sequence[dict[str, Any]],
    answers: Sequence[str] | None = None,
    in_vocabulary: np.ndarray | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`masked_saliency` of rows with an input cell, the loss being the NLL of each row's true answer.

    Parameters
    ----------
    model : InstructCellForConditionalGeneration
    processor : InstructCellProcessor
    rows : sequence of dict
        Builder rows with ``instruction``, ``label`` and the sparse ``input_gene_*`` cell.
    answers : sequence of str, optional
        The answer text whose likelihood is scored, per row; default the row's ``label`` (instruct
        variant, response ``"{output}"``).
    in_vocabulary : numpy.ndarray, optional
        ``(n_genes,)`` see :func:`masked_saliency`.
    batch_size : int
        Rows per forward/backward pass.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    saliency : numpy.ndarray
        ``(n_rows, n_genes)`` normalized masked saliency.
    counts : numpy.ndarray
        ``(n_rows, n_genes)`` the rows' input counts.
    """
    from datasets_builder.collator import DataCollatorForInstructCell

    rows = list(rows)
    if not rows:
        raise ValueError("No rows to compute saliency for.")
    answers = [row["label"] for row in rows] if answers is None else list(answers)
    if len(answers) != len(rows):
        raise ValueError(f"Got {len(answers)} answers for {len(rows)} rows.")
    collator = DataCollatorForInstructCell(processor)
    gradients, counts = [], []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="saliency", unit="batch", disable=not progress, leave=False):
        chunk = rows[start : start + batch_size]
        batch = collator(chunk)
        if batch.get("cell_values") is None or batch["cell_values"].shape[0] != len(chunk):
            raise ValueError("Every row needs an input cell; rows of tasks that generate a cell have none.")
        encoded = processor.tokenizer(answers[start : start + batch_size], padding=True, return_tensors="pt")
        gradients.append(
            objective_gradients(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                batch["cell_values"],
                encoded["input_ids"][:, None, :],
                encoded["attention_mask"][:, None, :],
                target_index=[0] * len(chunk),
            )
        )
        counts.append(batch["cell_values"].numpy())
    counts_all = np.concatenate(counts)
    # objective = log-likelihood = -loss, so the loss gradient is its negative
    return masked_saliency(-np.concatenate(gradients), counts_all, in_vocabulary), counts_all
