"""Test-split evaluation of classification tasks (CTA, DSP) and the logistic-regression baseline.

Both read the builder's Parquet rows, so the model and the baseline see exactly the same cells and split.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression

from datasets_builder.collator import DataCollatorForInstructCell
from instructcell_eval.classification_metrics import cell_classification_metrics
from modeling_instructcell import InstructCellForConditionalGeneration, InstructCellProcessor
from modeling_instructcell.answer_extraction import extract_label


def load_rows(dataset_dir: str | Path, split: str, task: str, dataset: str, variant: str = "instruct") -> datasets.Dataset:
    """Rows of one task, dataset, split and variant from ``<dataset_dir>/<split>.parquet``."""
    table = datasets.load_dataset("parquet", data_files={split: str(Path(dataset_dir) / f"{split}.parquet")})[split]
    rows = table.filter(lambda r: r["task"] == task and r["dataset"] == dataset and r["variant"] == variant)
    if len(rows) == 0:
        raise ValueError(f"No {split} rows for task={task!r}, dataset={dataset!r}, variant={variant!r}.")
    return rows


def sparse_input_cells(rows: datasets.Dataset, n_genes: int) -> sp.csr_matrix:
    """The rows' input cells as a CSR matrix ``(n_rows, n_genes)``."""
    indices = rows["input_gene_indices"]
    counts = rows["input_gene_counts"]
    indptr = np.cumsum([0] + [len(i) for i in indices])
    return sp.csr_matrix(
        (np.concatenate(counts).astype(np.float32), np.concatenate(indices).astype(np.int64), indptr),
        shape=(len(rows), n_genes),
    )


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
) -> list[str | None]:
    """Predicted labels of classification rows.

    Parameters
    ----------
    method : {"score", "generate"}
        ``score``: the most probable of the row's ``choices`` under the model (``score_labels``);
        ``generate``: greedy decoding, then the answer mapped to a label (``extract_label``), ``None``
        when it names none or several.
    """
    if method not in {"score", "generate"}:
        raise ValueError(f"method must be 'score' or 'generate', got {method!r}.")
    rows = list(rows)
    collator = DataCollatorForInstructCell(processor)
    predictions: list[str | None] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collator(chunk)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "cell_values") if k in batch}
        if method == "generate":
            sequences = model.generate(**inputs, max_new_tokens=max_new_tokens)
            answers = processor.post_process_generation(sequences)
            predictions.extend(extract_label(a["text"], row["choices"]) for a, row in zip(answers, chunk, strict=True))
            continue
        choices = chunk[0]["choices"]
        if any(row["choices"] != choices for row in chunk):
            raise ValueError("Rows of one batch must share their label set; evaluate one dataset at a time.")
        candidates = processor.tokenizer(list(choices), padding=True, return_tensors="pt")
        scores = model.score_labels(
            **inputs, candidate_ids=candidates["input_ids"], candidate_attention_mask=candidates["attention_mask"]
        )
        predictions.extend(choices[i] for i in scores.probabilities.argmax(-1).tolist())
    return predictions


def classification_metrics(predictions: Sequence[str | None], rows: datasets.Dataset) -> dict[str, float]:
    """Accuracy (unanswered = wrong), macro/weighted F1 over answered rows and the answered rate."""
    labels = sorted(set(rows["choices"][0]))
    return cell_classification_metrics(list(predictions), list(rows["label"]), labels=labels)
