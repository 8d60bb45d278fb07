"""The models under evaluation: how each is asked for labels and for cells.

A :class:`Candidate` is one saved model and how it is questioned (the dataset variant whose instructions it
was trained on, the label prediction methods). :func:`model_predictions` turns builder rows into labels,
:func:`generate_for_requests` into cells; :func:`greedy_answer` gives the raw text of one answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from datasets_builder.collator import DataCollatorForInstructCell
from modeling_instructcell import InstructCellForConditionalGeneration, InstructCellProcessor
from modeling_instructcell.answer_extraction import extract_label

__all__ = [
    "METHODS",
    "Candidate",
    "GeneratedCells",
    "generate_for_requests",
    "greedy_answer",
    "label_probabilities",
    "model_predictions",
]

#: Label prediction methods: the most likely label, or the greedy answer mapped to a label.
METHODS: tuple[str, ...] = ("score", "generate")
_MODEL_INPUTS = ("input_ids", "attention_mask", "cell_values")


@dataclass
class Candidate:
    """One model under evaluation.

    Parameters
    ----------
    name : str
        Its key among the methods of ``metrics.json`` (``"instructcell"``; ``"instruct"``, ``"chat"``).
    model : InstructCellForConditionalGeneration
    processor : InstructCellProcessor
    variant : {"instruct", "chat"}
        The dataset variant whose instructions it answers (its training variant).
    methods : tuple of str
        Label prediction methods (:data:`METHODS`), the first reported under ``name``, the others under
        ``<name>_<method>``.
    title : str
        Its name in reports.
    path : str
        Where it was loaded from.
    """

    name: str
    model: InstructCellForConditionalGeneration
    processor: InstructCellProcessor
    variant: str = "instruct"
    methods: tuple[str, ...] = ("score",)
    title: str = "InstructCell"
    path: str = ""

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"Unknown method(s) {unknown or '(none given)'}: use 'score' or 'generate'.")

    @property
    def description(self) -> dict[str, str]:
        """Its entry in ``run["methods"]`` of ``metrics.json``."""
        return {"kind": "model", "title": self.title, "path": self.path, "variant": self.variant}

    def key(self, method: str) -> str:
        """Key of the method's scores in ``metrics.json``."""
        return self.name if method == self.methods[0] else f"{self.name}_{method}"


def _answer_texts(processor: InstructCellProcessor, sequences: torch.Tensor) -> list[str]:
    """Decode answers keeping special tokens (``<SIGNAL>``) but not padding and end-of-sequence."""
    texts = [a["text"] for a in processor.post_process_generation(sequences, skip_special_tokens=False)]
    for token in (processor.tokenizer.pad_token, processor.tokenizer.eos_token):
        texts = [text.replace(token or "\0", "") for text in texts]
    return [text.strip() for text in texts]


def _model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device) for k in _MODEL_INPUTS if batch.get(k) is not None}


@torch.inference_mode()
def greedy_answer(
    model: InstructCellForConditionalGeneration,
    processor: InstructCellProcessor,
    row: dict[str, Any],
    max_new_tokens: int = 32,
) -> str:
    """Return the model's raw greedy answer to one builder row's instruction."""
    inputs = _model_inputs(DataCollatorForInstructCell(processor)([row]), model.device)
    return _answer_texts(processor, model.generate(**inputs, max_new_tokens=max_new_tokens))[0]


@torch.inference_mode()
def model_predictions(
    model: InstructCellForConditionalGeneration,
    processor: InstructCellProcessor,
    rows: datasets.Dataset | Sequence[dict[str, Any]],
    method: str = "score",
    batch_size: int = 64,
    max_new_tokens: int = 32,
    answers: Sequence[Sequence[str]] | None = None,
    progress: bool = False,
    desc: str = "predict",
) -> list[str | None]:
    """Predicted labels of classification rows.

    Parameters
    ----------
    model : InstructCellForConditionalGeneration
    processor : InstructCellProcessor
    rows : Dataset or sequence of dict
        ``n_rows`` builder rows (``instruction``, ``choices`` and the sparse input cell).
    method : {"score", "generate"}
        ``score``: the most probable of the row's ``choices`` under the model (``score_labels``);
        ``generate``: greedy decoding, then the answer mapped to a label (``extract_label``), ``None``
        when it names none or several.
    batch_size, max_new_tokens : int
        Rows per model call; generation length.
    answers : sequence of sequence of str, optional
        ``score`` only: per row, the answer text of each of its ``choices`` (same order), e.g. the chat
        variant's response with each label filled in. Default: the labels themselves (instruct variant).
    progress : bool
        Show a tqdm bar over batches (``desc`` is its label).

    Returns
    -------
    list of str or None
        ``(n_rows,)`` predicted labels.
    """
    if method not in METHODS:
        raise ValueError(f"method must be 'score' or 'generate', got {method!r}.")
    rows = list(rows)
    if answers is not None and len(answers) != len(rows):
        raise ValueError(f"Got answers for {len(answers)} rows but {len(rows)} rows.")
    if method == "score":
        probabilities = label_probabilities(
            model, processor, rows, batch_size=batch_size, answers=answers, progress=progress, desc=desc
        )
        return [row["choices"][i] for row, i in zip(rows, probabilities.argmax(-1).tolist(), strict=True)]
    collator = DataCollatorForInstructCell(processor)
    predictions: list[str | None] = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = rows[start : start + batch_size]
        inputs = _model_inputs(collator(chunk), model.device)
        sequences = model.generate(**inputs, max_new_tokens=max_new_tokens)
        texts = processor.post_process_generation(sequences)
        predictions.extend(
            extract_label(a["text"], row["choices"]) for a, row in zip(texts, chunk, strict=True)
        )
    return predictions


@torch.inference_mode()
def label_probabilities(
    model: InstructCellForConditionalGeneration,
    processor: InstructCellProcessor,
    rows: datasets.Dataset | Sequence[dict[str, Any]],
    batch_size: int = 64,
    answers: Sequence[Sequence[str]] | None = None,
    progress: bool = False,
    desc: str = "score",
) -> np.ndarray:
    """Each row's probability of each of its ``choices`` under the model (``score_labels``).

    Parameters
    ----------
    model : InstructCellForConditionalGeneration
    processor : InstructCellProcessor
    rows : Dataset or sequence of dict
        ``n_rows`` builder rows sharing one label set of ``n_choices`` labels (one dataset).
    batch_size : int
        Rows per model call.
    answers : sequence of sequence of str, optional
        Per row, the answer text of each of its ``choices`` (see :func:`model_predictions`).
    progress : bool
        Show a tqdm bar over batches (``desc`` is its label).

    Returns
    -------
    numpy.ndarray
        ``(n_rows, n_choices)`` float32, each row summing to 1.
    """
    rows = list(rows)
    collator = DataCollatorForInstructCell(processor)
    blocks = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = rows[start : start + batch_size]
        inputs = _model_inputs(collator(chunk), model.device)
        candidate_ids, candidate_mask = _choice_tokens(
            processor, chunk, None if answers is None else answers[start : start + batch_size]
        )
        scores = model.score_labels(
            **inputs, candidate_ids=candidate_ids, candidate_attention_mask=candidate_mask
        )
        blocks.append(scores.probabilities.float().cpu().numpy())
    n_choices = len(rows[0]["choices"]) if rows else 0
    return np.concatenate(blocks) if blocks else np.zeros((0, n_choices), np.float32)


def _choice_tokens(
    processor: InstructCellProcessor, chunk: Sequence[dict[str, Any]], answers: Sequence[Sequence[str]] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenized candidate answers: ``(n_choices, len)`` shared, or ``(batch, n_choices, len)`` per row."""
    if answers is None:
        choices = chunk[0]["choices"]
        if any(row["choices"] != choices for row in chunk):
            raise ValueError("Rows of one batch must share their label set; evaluate one dataset at a time.")
        encoded = processor.tokenizer(list(choices), padding=True, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]
    n = len(chunk[0]["choices"])
    for row, texts in zip(chunk, answers, strict=True):
        if len(texts) != len(row["choices"]) or len(texts) != n:
            raise ValueError("Pass one answer text per choice, and the same number of choices for every row.")
    encoded = processor.tokenizer([t for texts in answers for t in texts], padding=True, return_tensors="pt")
    shape = (len(chunk), n, -1)
    return encoded["input_ids"].reshape(shape), encoded["attention_mask"].reshape(shape)


@dataclass
class GeneratedCells:
    """A model's answers to generation requests.

    Attributes
    ----------
    counts : scipy.sparse.csr_matrix
        ``(n_generated, n_genes)`` generated counts.
    labels : list of str
        ``(n_generated,)`` the label each cell was requested with.
    requests : list of int
        ``(n_generated,)`` the request (row) each cell answers.
    n_signal : int
        Requests answered with ``<SIGNAL>`` (those produce cells).
    example : dict
        The first request: ``instruction``, ``answer`` (raw text), ``label``, ``n_cells`` and
        ``mean_total_counts`` of its cells (None without cells).
    """

    counts: sp.csr_matrix
    labels: list[str]
    requests: list[int]
    n_signal: int
    example: dict[str, Any]


@torch.inference_mode()
def generate_for_requests(
    model: InstructCellForConditionalGeneration,
    processor: InstructCellProcessor,
    requests: datasets.Dataset,
    generated_per_request: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    progress: bool = False,
    desc: str = "generate",
) -> GeneratedCells:
    """Answer generation requests (builder rows, one instruction each) with cells.

    Parameters
    ----------
    model, processor
        The model under evaluation.
    requests : Dataset
        ``n_requests`` rows whose ``label`` is the requested one; a row's input cell (perturbation response)
        goes into its prompt.
    generated_per_request : int
        Cells sampled per request answered with ``<SIGNAL>``.
    seed : int
        Request batch ``k`` samples with seed ``seed + k``.
    batch_size, max_new_tokens : int
        Requests per model call; answer length.
    progress : bool
        Show a progress bar (``desc`` is its label).

    Returns
    -------
    GeneratedCells
    """
    n_genes = processor.feature_extractor.vocab_size
    collator = DataCollatorForInstructCell(processor)
    blocks, labels, answered, n_signal, example = [], [], [], 0, None
    starts = range(0, len(requests), batch_size)
    for k, offset in enumerate(tqdm(starts, desc=desc, disable=not progress, leave=False)):
        chunk = requests.select(range(offset, min(offset + batch_size, len(requests))))
        batch = collator(list(chunk))
        output = model.generate_cells(
            **_model_inputs(batch, model.device),
            num_cells=generated_per_request,
            seed=seed + k,
            max_new_tokens=max_new_tokens,
        )
        n_signal += int(output.has_signal.sum())
        blocks.append(sp.csr_matrix(output.cell_values.cpu().numpy().astype(np.float32)))
        labels += [chunk[int(i)]["label"] for i in output.request_index.tolist()]
        answered += [offset + int(i) for i in output.request_index.tolist()]
        if example is None:
            mine = output.request_index == 0
            totals = output.cell_values[mine].sum(-1).float()
            example = {
                "instruction": chunk[0]["instruction"],
                "answer": _answer_texts(processor, output.sequences[:1])[0],
                "label": chunk[0]["label"],
                "n_cells": int(mine.sum()),
                "mean_total_counts": float(totals.mean()) if len(totals) else None,
            }
    counts = sp.vstack(blocks).tocsr() if blocks else sp.csr_matrix((0, n_genes), dtype=np.float32)
    return GeneratedCells(counts, labels, answered, n_signal, example or {})
