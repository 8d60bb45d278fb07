"""The multicell family: questions about several cells, or with earlier turns, against per-cell answers.

For one task and dataset: a seeded subset of the test rows (held-out cells, held-out templates). Each model
answers every row's whole prompt (greedy; the answer read back by the task's
:meth:`~instructcell.tasks.multicell.GroupQuestion.parse`). Beside it, the same questions are answered from
per-cell label probabilities (:meth:`~instructcell.tasks.multicell.GroupQuestion.from_cell_probabilities`):

* ``<model>_cells``: the model's own single-cell calls, each cell asked with its own cell type annotation
  test row (for a follow-up question: the question asked without its earlier turns);
* the task's baselines (``logistic_regression_cells``), fitted on the training cells.

Scores per method: ``accuracy`` (the whole answer right; unanswered = wrong), ``cell_accuracy`` (the task's
partial credit, e.g. the share of cells labelled right) and ``answered_rate``; ``by_size`` breaks accuracy
down by the cells a prompt shows (group tasks) or by its earlier turns (follow-up tasks), and ``by_turns``
breaks a group question's accuracy down by the earlier turns it was asked after.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from datasets_builder.collator import DataCollatorForInstructCell
from datasets_builder.dataset_folder import cap_rows
from instructcell.tasks import Task
from instructcell.tasks.multicell import ANSWER_TOKENS, GroupQuestion, first_question_cell

from .baselines import ClassificationCells
from .candidates import Candidate, label_probabilities
from .context import Evaluation, timed

__all__ = ["evaluate_multicell", "group_answers", "multicell_entry", "size_of"]

logger = logging.getLogger(__name__)

#: The per-cell annotation rows the single-cell calls are asked with.
CELL_TASK = "cta"


def size_of(row: Mapping[str, Any]) -> int:
    """Return the cells a group question shows (2 or more), or a follow-up question's earlier turns."""
    return int(row["n_question_cells"]) if row["n_question_cells"] > 1 else int(row["n_earlier_turns"])


@torch.inference_mode()
def group_answers(
    candidate: Candidate,
    rows: Sequence[Mapping[str, Any]],
    task: Task,
    batch_size: int,
    max_new_tokens: int = ANSWER_TOKENS,
    progress: bool = False,
) -> list[Hashable | None]:
    """Answer multi-cell rows greedily and read the answers back with the task's parser (None: unreadable).

    An answer to a task that generates cells must also hold ``<SIGNAL>``.
    """
    collator = DataCollatorForInstructCell(candidate.processor)
    answers: list[Hashable | None] = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=f"{task.name} {candidate.name}", disable=not progress, leave=False):
        chunk = rows[start : start + batch_size]
        batch = collator(chunk)
        inputs = {
            k: batch[k].to(candidate.model.device) for k in ("input_ids", "attention_mask", "cell_values")
        }
        sequences = candidate.model.generate(**inputs, max_new_tokens=max_new_tokens)
        for row, decoded in zip(chunk, candidate.processor.post_process_generation(sequences), strict=True):
            readable = decoded["has_signal"] or not task.output_cell
            first = first_question_cell(len(row["cell_labels"]), row["n_question_cells"])
            parsed = task.question.parse(decoded["text"], row["choices"], row["n_question_cells"], first)
            answers.append(parsed if readable else None)
    return answers


def answers_from_cells(
    question: GroupQuestion, rows: Sequence[Mapping[str, Any]], probabilities: Mapping[str, np.ndarray]
) -> list[Hashable | None]:
    """Answer every row from its cells' label probabilities (``cell_id -> (n_labels,)`` over its choices)."""
    return [
        question.from_cell_probabilities(
            np.stack([probabilities[cell] for cell in row["cell_ids"]]),
            row["choices"],
            row["n_question_cells"],
            row["query"],
        )
        for row in rows
    ]


def multicell_entry(
    question: GroupQuestion,
    rows: Sequence[Mapping[str, Any]],
    answers: Mapping[str, Sequence[Hashable | None]],
    extras: Mapping[str, Mapping[str, Any]],
    n_train: int,
) -> dict[str, Any]:
    """Build the ``scores`` entry of one multicell dataset.

    Parameters
    ----------
    question : GroupQuestion
        The task's question (truth and partial credit).
    rows : sequence of mapping
        The ``n_test`` rows (``cell_labels``, ``query``, ``cell_ids``, ``n_earlier_turns``,
        ``n_question_cells``).
    answers : mapping of str to sequence
        Method -> ``(n_test,)`` answers (None = unanswered), models first.
    extras : mapping of str to mapping
        Method -> values stored beside its scores (``seconds``, ``details``).
    n_train : int
        Training cells the baselines were fitted on.

    Returns
    -------
    dict
        ``n_test``, ``n_train``, ``labels``, ``methods`` (method -> ``accuracy``, ``cell_accuracy``,
        ``answered_rate`` and its extras), ``by_size`` (``variable``; ``groups``: size -> ``n`` and
        method -> accuracy) and, for group questions, ``by_turns`` (earlier turns -> ``n`` and method ->
        accuracy: the same question asked first, or after unrelated turns of a conversation).
    """
    truths = [question.truth(row["cell_labels"], row["n_question_cells"], row["query"]) for row in rows]
    methods, exact = {}, {}
    for name, given in answers.items():
        exact[name] = np.array(
            [a is not None and a == t for a, t in zip(given, truths, strict=True)], dtype=float
        )
        methods[name] = {
            "accuracy": float(exact[name].mean()),
            "cell_accuracy": float(
                np.mean([question.cell_accuracy(a, t) for a, t in zip(given, truths, strict=True)])
            ),
            "answered_rate": float(np.mean([a is not None for a in given])),
            **extras.get(name, {}),
        }
    follow_up = any(row["n_question_cells"] < 2 for row in rows)
    entry = {
        "n_test": len(rows),
        "n_train": n_train,
        "labels": sorted(rows[0]["choices"]) if rows else [],
        "methods": methods,
        "by_size": {
            "variable": "earlier turns" if follow_up else "cells",
            "groups": _accuracy_by([size_of(row) for row in rows], exact),
        },
    }
    if not follow_up:  # a follow-up's sizes are its earlier turns already
        entry["by_turns"] = _accuracy_by([int(row["n_earlier_turns"]) for row in rows], exact)
    return entry


def _accuracy_by(keys: Sequence[int], exact: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Group rows by an integer key: ``str(key) -> {"n": rows, "methods": {method: accuracy}}``.

    ``exact`` maps each method to its ``(n_rows,)`` 0/1 whole-answer scores, in the order of ``keys``.
    """
    groups = {}
    for key in sorted(set(keys)):
        chosen = [i for i, k in enumerate(keys) if k == key]
        groups[str(key)] = {
            "n": len(chosen),
            "methods": {name: float(scores[chosen].mean()) for name, scores in exact.items()},
        }
    return groups


def evaluate_multicell(ev: Evaluation, task: Task, dataset: str) -> tuple[dict[str, Any], datasets.Dataset]:
    """Score every model, its single-cell calls and every selected baseline on one multicell dataset.

    Parameters
    ----------
    ev : Evaluation
        Its test split must hold the cell type annotation rows of the same cells (built together).
    task : Task
        A task of the ``multicell`` family.
    dataset : str

    Returns
    -------
    entry : dict
        :func:`multicell_entry`.
    rows : Dataset
        The test rows scored (in the evaluation's variant).
    """
    settings = ev.settings
    rows = cap_rows(ev.test.get(task.name, dataset, ev.variant), settings.max_test_cells, settings.seed)
    listed = list(rows)
    cell_ids = list(dict.fromkeys(cell for row in listed for cell in row["cell_ids"]))
    answers: dict[str, list[Hashable | None]] = {}
    extras: dict[str, dict[str, Any]] = {}
    for candidate in ev.models:
        model_rows = list(ev.model_rows(candidate, task, dataset, rows))
        torch.manual_seed(settings.seed)
        answers[candidate.name], seconds = timed(
            group_answers, candidate, model_rows, task, settings.batch_size, progress=settings.progress
        )
        extras[candidate.name] = {"seconds": round(seconds, 2)}
        cell_rows = ev.test.matching(CELL_TASK, dataset, candidate.variant, cell_ids)
        if cell_rows[0]["choices"] != listed[0]["choices"]:
            raise ValueError(
                f"The {CELL_TASK} and {task.name} rows of {dataset} list different label sets: build them "
                "from the same file in one build."
            )
        probabilities, seconds = timed(
            label_probabilities,
            candidate.model,
            candidate.processor,
            cell_rows,
            batch_size=settings.batch_size,
            answers=ev.answers(candidate, "score", cell_rows),
        )
        key = f"{candidate.name}_cells"
        ev.methods[key] = {
            "kind": "model",
            "title": f"{candidate.title}, single-cell calls",
            "description": "the same model asked about each cell on its own (its cell type annotation test "
            "row, most likely label); the question answered from those calls.",
            "path": candidate.path,
            "variant": candidate.variant,
        }
        answers[key] = answers_from_cells(
            task.question, listed, dict(zip(cell_ids, probabilities, strict=True))
        )
        extras[key] = {"seconds": round(seconds, 2)}
    train_rows = ev.train.get(CELL_TASK, dataset, ev.variant)
    baselines = ev.baselines(task)
    if baselines:
        test_cells = ev.test.matching(CELL_TASK, dataset, ev.variant, cell_ids)
        cells = ClassificationCells.from_rows(train_rows, test_cells, ev.genes)
        for baseline in baselines:
            frame, extras[baseline.name] = ev.run_baseline(baseline, cells)
            aligned = frame.reindex(columns=listed[0]["choices"], fill_value=0.0).to_numpy()
            answers[baseline.name] = answers_from_cells(
                task.question, listed, dict(zip(cell_ids, aligned, strict=True))
            )
    entry = multicell_entry(task.question, listed, answers, extras, len(train_rows))
    logger.info(
        "%s %s (%d test rows): %s",
        task.name,
        dataset,
        len(rows),
        ", ".join(f"{name} accuracy {v['accuracy']:.3f}" for name, v in entry["methods"].items()),
    )
    return entry, rows
