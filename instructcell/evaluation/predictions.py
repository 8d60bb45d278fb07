"""Test-split evaluation of classification tasks (CTA, DSP) and the logistic-regression baseline.

Both read the builder's Parquet rows, so the model and the baseline see exactly the same cells and split.
"""

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from datasets_builder.collator import DataCollatorForInstructCell
from instructcell.evaluation.metrics.classification import cell_classification_metrics
from instructcell.evaluation.report import ClassificationResult, GenerationResult
from modeling_instructcell import InstructCellForConditionalGeneration, InstructCellProcessor
from modeling_instructcell.answer_extraction import extract_label


def load_rows(
    dataset_dir: str | Path, split: str, task: str, dataset: str, variant: str = "instruct"
) -> datasets.Dataset:
    """Rows of one task, dataset, split and variant from ``<dataset_dir>/<split>.parquet``."""
    table = datasets.load_dataset("parquet", data_files={split: str(Path(dataset_dir) / f"{split}.parquet")})[
        split
    ]
    rows = table.filter(lambda r: r["task"] == task and r["dataset"] == dataset and r["variant"] == variant)
    if len(rows) == 0:
        raise ValueError(f"No {split} rows for task={task!r}, dataset={dataset!r}, variant={variant!r}.")
    return rows


def sparse_cells(
    rows: datasets.Dataset | Sequence[dict[str, Any]], prefix: str, n_genes: int
) -> sp.csr_matrix:
    """Return the rows' ``input`` or ``target`` cells as a CSR matrix ``(n_rows, n_genes)`` of counts.

    A row without that cell (e.g. the input of a CPCG row) gives an empty row.
    """
    if prefix not in ("input", "target"):
        raise ValueError(f"prefix must be 'input' or 'target', got {prefix!r}.")
    if isinstance(rows, datasets.Dataset):
        indices, counts = rows[f"{prefix}_gene_indices"], rows[f"{prefix}_gene_counts"]
    else:
        indices = [row[f"{prefix}_gene_indices"] for row in rows]
        counts = [row[f"{prefix}_gene_counts"] for row in rows]
    indptr = np.cumsum([0] + [len(i) for i in indices])
    return sp.csr_matrix(
        (
            np.concatenate([np.asarray(c, np.float32) for c in counts] or [np.zeros(0, np.float32)]),
            np.concatenate([np.asarray(i, np.int64) for i in indices] or [np.zeros(0, np.int64)]),
            indptr,
        ),
        shape=(len(indices), n_genes),
    )


def sparse_input_cells(rows: datasets.Dataset, n_genes: int) -> sp.csr_matrix:
    """Return the rows' input cells as a CSR matrix ``(n_rows, n_genes)``."""
    return sparse_cells(rows, "input", n_genes)


def select_rows(table: datasets.Dataset, task: str, dataset: str) -> datasets.Dataset:
    """Rows of one task and dataset (all variants the table holds)."""
    return table.filter(lambda r: r["task"] == task and r["dataset"] == dataset)


def cap_rows(rows: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """At most ``n`` rows: a seeded random subset when there are more (all rows for ``n=None``)."""
    if n is not None and n < 1:
        raise ValueError(f"The number of rows to keep must be at least 1, got {n}.")
    return rows.shuffle(seed=seed).select(range(n)) if n is not None and len(rows) > n else rows


def log_normalize(counts: sp.csr_matrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """``log1p`` of counts scaled to ``target_sum`` per cell (scanpy's normalize_total + log1p)."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scaled = sp.diags(target_sum / np.maximum(totals, 1e-12)) @ counts
    return scaled.log1p().tocsr()


def logistic_regression_predictions(
    train: datasets.Dataset, test: datasets.Dataset, n_genes: int, seed: int = 0
) -> list[str]:
    """Fit scikit-learn's LogisticRegression on log-normalized training counts and predict the test rows."""
    model = LogisticRegression(max_iter=2000, random_state=seed)
    model.fit(log_normalize(sparse_input_cells(train, n_genes)), train["label"])
    return list(model.predict(log_normalize(sparse_input_cells(test, n_genes))))


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
        Builder rows (``instruction``, ``choices`` and the sparse input cell), ``n_rows`` of them.
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
        ``n_rows`` predicted labels.
    """
    if method not in {"score", "generate"}:
        raise ValueError(f"method must be 'score' or 'generate', got {method!r}.")
    rows = list(rows)
    if answers is not None and len(answers) != len(rows):
        raise ValueError(f"Got answers for {len(answers)} rows but {len(rows)} rows.")
    collator = DataCollatorForInstructCell(processor)
    predictions: list[str | None] = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = rows[start : start + batch_size]
        batch = collator(chunk)
        inputs = {
            k: batch[k].to(model.device) for k in ("input_ids", "attention_mask", "cell_values") if k in batch
        }
        if method == "generate":
            sequences = model.generate(**inputs, max_new_tokens=max_new_tokens)
            texts = processor.post_process_generation(sequences)
            predictions.extend(
                extract_label(a["text"], row["choices"]) for a, row in zip(texts, chunk, strict=True)
            )
            continue
        candidate_ids, candidate_mask = _candidates(
            processor, chunk, None if answers is None else answers[start : start + batch_size]
        )
        scores = model.score_labels(
            **inputs, candidate_ids=candidate_ids, candidate_attention_mask=candidate_mask
        )
        best = scores.probabilities.argmax(-1).tolist()
        predictions.extend(row["choices"][i] for row, i in zip(chunk, best, strict=True))
    return predictions


def _candidates(
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


def classification_metrics(predictions: Sequence[str | None], rows: datasets.Dataset) -> dict[str, float]:
    """Accuracy (unanswered = wrong), macro/weighted F1 over answered rows and the answered rate."""
    labels = sorted(set(rows["choices"][0]))
    return cell_classification_metrics(list(predictions), list(rows["label"]), labels=labels)


def evaluate_classification(
    model: InstructCellForConditionalGeneration,
    processor: InstructCellProcessor,
    train_rows: datasets.Dataset,
    test_rows: datasets.Dataset,
    task: str,
    dataset: str,
    methods: Sequence[str] = ("score",),
    seed: int = 0,
    batch_size: int = 64,
    answers: Sequence[Sequence[str]] | None = None,
    progress: bool = True,
) -> ClassificationResult:
    """Predict one CTA/DSP dataset's test rows with the model (each method) and the logistic regression.

    Parameters
    ----------
    model, processor
        The model under evaluation.
    train_rows : Dataset
        Training rows of the same task and dataset (the logistic regression is fitted on their cells).
    test_rows : Dataset
        The ``n`` test rows to predict.
    task, dataset : str
        Names stored in the result.
    methods : sequence of {"score", "generate"}
        Prediction methods (:func:`model_predictions`); the first is the headline one.
    seed : int
        Seed of the logistic regression.
    batch_size : int
        Rows per model call.
    answers : sequence of sequence of str, optional
        Per test row, the answer text of each choice for ``score`` (see :func:`model_predictions`).
    progress : bool
        Show progress bars.

    Returns
    -------
    ClassificationResult
        ``references`` = the ``n`` true labels, ``predictions`` = one list of ``n`` labels per method,
        ``logreg`` = the baseline's ``n`` labels.
    """
    if not methods:
        raise ValueError("Pass at least one prediction method ('score' or 'generate').")
    n_genes = processor.feature_extractor.vocab_size
    predictions = {
        method: model_predictions(
            model,
            processor,
            test_rows,
            method=method,
            batch_size=batch_size,
            answers=answers if method == "score" else None,
            progress=progress,
            desc=f"{task} {dataset} {method}",
        )
        for method in methods
    }
    logreg = logistic_regression_predictions(train_rows, test_rows, n_genes, seed=seed)
    return ClassificationResult(
        task, dataset, list(test_rows["label"]), list(test_rows[0]["choices"]), predictions, logreg
    )


def select_requests(
    test_rows: datasets.Dataset, max_generated_per_label: int = 200, generated_per_request: int = 1
) -> datasets.Dataset:
    """Keep the CPCG test rows (requests) that fit ``max_generated_per_label`` cells per label.

    Each row is one request for ``generated_per_request`` cells of its label; the first
    ``max_generated_per_label // generated_per_request`` rows of every label are kept, in their order.
    """
    if generated_per_request < 1 or max_generated_per_label < 1:
        raise ValueError("generated_per_request and max_generated_per_label must be at least 1.")
    max_requests = max(1, max_generated_per_label // generated_per_request)
    seen: Counter = Counter()
    keep = []
    for i, label in enumerate(test_rows["label"]):
        if seen[label] < max_requests:
            seen[label] += 1
            keep.append(i)
    return test_rows.select(keep)


def requested_counts(labels: Sequence[str], generated_per_request: int = 1) -> dict[str, int]:
    """Return the cells requested per label (sorted) when each request asks for ``generated_per_request``."""
    counts = Counter(labels)
    return {label: counts[label] * generated_per_request for label in sorted(counts)}


def reference_cells(
    train_rows: datasets.Dataset, requested: Mapping[str, int], n_genes: int, seed: int = 0
) -> tuple[sp.csr_matrix | None, list[str]]:
    """Draw real training cells of the requested labels, as many per label as requested.

    Cells are drawn without replacement, or with replacement when a label has fewer training cells.

    Parameters
    ----------
    train_rows : Dataset
        CPCG training rows (their ``target`` cell) of one dataset.
    requested : mapping of str to int
        Label -> number of cells.
    n_genes : int
        Vocabulary size.
    seed : int
        Seed of the draw.

    Returns
    -------
    cells : scipy.sparse.csr_matrix or None
        ``(n_drawn, n_genes)`` counts; None when no requested label has training cells.
    labels : list of str
        ``(n_drawn,)`` their labels.
    """
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(train_rows["label"]):
        by_label[label].append(i)
    picks: list[int] = []
    labels: list[str] = []
    for label, count in sorted(requested.items()):
        pool = by_label.get(label, [])
        if not pool:
            continue
        chosen = rng.choice(pool, size=count, replace=count > len(pool))
        picks += chosen.tolist()
        labels += [label] * count
    if not picks:
        return None, []
    return sparse_cells(train_rows.select(picks), "target", n_genes), labels


@torch.inference_mode()
def evaluate_generation(
    model: InstructCellForConditionalGeneration,
    processor: InstructCellProcessor,
    train_rows: datasets.Dataset,
    test_rows: datasets.Dataset,
    dataset: str,
    max_generated_per_label: int = 200,
    generated_per_request: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> tuple[GenerationResult, dict[str, Any]]:
    """Answer one dataset's CPCG test requests with cells; real test cells and a training-cell reference.

    Each test row is one request (its own instruction); at most ``max_generated_per_label`` cells are
    generated per label. The real cells are all test rows' target cells. The reference holds real training
    cells of the requested labels, as many per label as were requested: what a perfect generator would
    return (= the generated count when every request is answered with ``<SIGNAL>``).

    Parameters
    ----------
    model, processor
        The model under evaluation.
    train_rows, test_rows : Dataset
        CPCG rows of this dataset (training rows for the reference).
    dataset : str
        Name stored in the result.
    max_generated_per_label, generated_per_request : int
        Cells per label at most; cells sampled per request.
    seed : int
        Request batch ``k`` samples with seed ``seed + k``; the reference draw uses ``seed``.
    batch_size, max_new_tokens : int
        Requests per model call; answer length.
    progress : bool
        Show a progress bar.

    Returns
    -------
    result : GenerationResult
    example : dict
        The first request: ``instruction``, ``answer`` (raw text), ``label``, ``n_cells`` and
        ``mean_total_counts`` of its cells (None without cells).
    """
    n_genes = processor.feature_extractor.vocab_size
    requests = select_requests(test_rows, max_generated_per_label, generated_per_request)
    collator = DataCollatorForInstructCell(processor)
    generated, generated_labels, n_signal, example = [], [], 0, None
    starts = range(0, len(requests), batch_size)
    for k, offset in enumerate(
        tqdm(starts, desc=f"cpcg {dataset} generate", disable=not progress, leave=False)
    ):
        chunk = requests.select(range(offset, min(offset + batch_size, len(requests))))
        batch = collator(list(chunk))
        output = model.generate_cells(
            input_ids=batch["input_ids"].to(model.device),
            attention_mask=batch["attention_mask"].to(model.device),
            num_cells=generated_per_request,
            seed=seed + k,
            max_new_tokens=max_new_tokens,
        )
        n_signal += int(output.has_signal.sum())
        generated.append(sp.csr_matrix(output.cell_values.cpu().numpy().astype(np.float32)))
        generated_labels += [chunk[int(i)]["label"] for i in output.request_index.tolist()]
        if example is None:
            example = _generation_example(processor, chunk[0], output)
    cells = sp.vstack(generated).tocsr() if generated else sp.csr_matrix((0, n_genes))
    requested = requested_counts(requests["label"], generated_per_request)
    reference, reference_labels = reference_cells(train_rows, requested, n_genes, seed)
    result = GenerationResult(
        dataset,
        sparse_cells(test_rows, "target", n_genes),
        list(test_rows["label"]),
        cells,
        generated_labels,
        reference,
        reference_labels,
        n_requests=len(requests),
        n_answered_with_signal=n_signal,
    )
    return result, example or {}


def _generation_example(processor: InstructCellProcessor, row: dict[str, Any], output: Any) -> dict[str, Any]:
    """Summarize the first request of a batch: instruction, raw answer, number and size of its cells."""
    answer = processor.post_process_generation(output.sequences[:1], skip_special_tokens=False)[0]["text"]
    for token in (processor.tokenizer.pad_token, processor.tokenizer.eos_token):
        answer = answer.replace(token or "\0", "")
    mine = output.request_index == 0
    totals = output.cell_values[mine].sum(-1).float()
    return {
        "instruction": row["instruction"],
        "answer": answer.strip(),
        "label": row["label"],
        "n_cells": int(mine.sum()),
        "mean_total_counts": float(totals.mean()) if len(totals) else None,
    }
