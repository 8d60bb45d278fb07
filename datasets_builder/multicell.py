"""Rows with several cells: the multi-cell and follow-up tasks in the builder's schema, and their batching.

A multi-cell row (:func:`multicell_examples`) holds every cell its prompt shows, in prompt order, as sparse
rows in ``cells_gene_indices`` / ``cells_gene_counts`` with their ``cell_ids`` and ``cell_labels``; its
single-cell ``input_*`` columns stay empty. Its ``instruction`` is the whole conversation
(:func:`instructcell.tasks.multicell.conversation`): earlier turns (their task's short default question,
answered in the row's variant), then the question, from the task's template bank, with one ``<CELL>`` per
cell. Cells are numbered through the conversation (``cell 3: <CELL>`` after turns that showed two cells, and
``3:`` in the answers), the numbers of the model's cell slots. ``label`` is the right answer's text,
``query`` the task's parameter (the asked label, the answer being questioned, the listed options),
``n_earlier_turns`` the number of earlier turns and ``n_question_cells`` the cells the question itself shows
(the last ones). A follow-up generation row also has its first cell as the
target cell. Single-cell rows carry these columns empty (:func:`single_cell_columns`).

Every cell of a validation or test split anchors one example per task; a training cell anchors one with the
task's ``anchor_share`` (by hash), so training rows stay a few times the number of cells. The cells of an
example all come from the anchor's dataset and split; the draw is seeded by the anchor (the same cells in
both variants), the templates by the example key as for single-cell rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import Any

import datasets
import numpy as np

from instructcell.tasks import get_task
from instructcell.tasks.multicell import (
    CellGroup,
    EarlierTurn,
    MultiCellTask,
    cell_list,
    conversation,
    first_question_cell,
    question_part,
)

from .anndata_source import AnnDataSource, CellRecord, densify
from .splits import hash_bucket
from .templates import CELL_TOKEN, SIGNAL_TOKEN, Template, TemplateBank, render

__all__ = [
    "MULTICELL_FEATURES",
    "check_cells_kept",
    "multicell_examples",
    "prompt_cell_labels",
    "prompt_cells",
    "single_cell_columns",
]

#: The columns of several-cell rows, beside the builder's single-cell ones.
MULTICELL_FEATURES: dict[str, Any] = {
    "cell_ids": datasets.List(datasets.Value("string")),
    "cell_labels": datasets.List(datasets.Value("string")),
    "cells_gene_indices": datasets.List(datasets.List(datasets.Value("int32"))),
    "cells_gene_counts": datasets.List(datasets.List(datasets.Value("float32"))),
    "query": datasets.Value("string"),
    "n_earlier_turns": datasets.Value("int32"),
    "n_question_cells": datasets.Value("int32"),
}
#: ``{count}`` of a follow-up generation request ("generate 20 more"): drawn uniformly in this range.
COUNT_RANGE = (2, 100)


def single_cell_columns() -> dict[str, Any]:
    """Return the several-cell columns of a row with at most one input cell: all empty."""
    return {
        "cell_ids": [],
        "cell_labels": [],
        "cells_gene_indices": [],
        "cells_gene_counts": [],
        "query": "",
        "n_earlier_turns": 0,
        "n_question_cells": 0,
    }


def _seed(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 2**63


def _count(key: str) -> str:
    """Draw the ``{count}`` of a request for more cells from the example key."""
    return str(int(np.random.default_rng(_seed(f"{key}/count")).integers(*COUNT_RANGE)))


def _anchors(task: MultiCellTask, dataset: str, split: str, cells: Sequence[CellRecord]) -> Iterator[int]:
    """Positions of the cells that anchor an example (all of them outside the training split)."""
    for i, cell in enumerate(cells):
        if split != "train" or hash_bucket(f"{task.name}/{dataset}/{cell.obs_name}/anchor", 1000) < (
            task.anchor_share * 1000
        ):
            yield i


def _turn(
    bank: TemplateBank,
    task_name: str,
    variant: str,
    split: str,
    key: str,
    metadata: dict[str, str],
    n_cells: int,
    first: int,
    output: str,
    choices: Sequence[str],
) -> tuple[str, str, Template]:
    """(instruction, response, template) of one turn about ``n_cells`` cells (``{input}`` or ``{cells}``).

    ``first`` is the number of its first cell in the conversation; ``choices`` are the options in prompt
    order, listed when the template offers them.
    """
    template = bank.choose(task_name, variant, split, key)
    options = choices if template.has_choices else []
    values = {**metadata, "cells": cell_list(n_cells, CELL_TOKEN, first)} if n_cells else metadata
    instruction, response = render(template, values, output, options)
    return instruction, response, template


def _earlier_turn(
    bank: TemplateBank,
    turn: EarlierTurn,
    first: int,
    variant: str,
    split: str,
    key: str,
    metadata: dict[str, str],
) -> tuple[str, str]:
    """(user message, answer) of an earlier turn: its task's default instruction, answered in the variant.

    Earlier turns are short questions, as a user types them in a conversation (and as the prompt can afford:
    the whole conversation is read again at every turn); their answers are a template's response. ``first``
    is the number of the turn's first cell in the conversation.
    """
    task = get_task(turn.task)
    template = bank.choose(task.name, variant, split, key)
    short = Template(template.id, task.name, variant, task.default_instruction, template.response)
    values = {**metadata, "count": _count(key)}
    if turn.n_cells:
        values["cells"] = cell_list(turn.n_cells, CELL_TOKEN, first)
    return render(short, values, turn.answer)


def multicell_example(
    source: AnnDataSource,
    variant: str,
    cells: Sequence[CellRecord],
    anchor: int,
    group: CellGroup,
    split: str,
    bank: TemplateBank,
    choices: Sequence[str],
    key: str,
) -> dict[str, Any]:
    """One row of a multi-cell task from the cells of its group (see the module docstring).

    Parameters
    ----------
    source : AnnDataSource
        The file and its task (a :class:`~instructcell.tasks.multicell.MultiCellTask`).
    variant : {"instruct", "chat"}
    cells : sequence of CellRecord
        The split's cells; ``anchor`` and ``group.cells`` index into them.
    anchor : int
        The cell the example is keyed by (its ``cell_id``).
    group : CellGroup
        The example's cells and earlier turns.
    split : str
    bank : TemplateBank
    choices : sequence of str
        The dataset's label set (earlier turns list it in an order drawn from their key when their template
        offers options; the question lists ``group.choices`` when the task draws its own).
    key : str
        The example key (seeds the templates and the options' order).
    """
    from .builder import option_order  # the builder imports this module

    task = get_task(source.task)
    members = [cells[i] for i in group.cells]
    labels = [cell.label for cell in members]
    metadata = {
        "species": "",
        "tissue": "",
        "sequencing_method": "",
        "drug": "",
        "perturbation": "",
        **cells[anchor].metadata,
    }
    starts = list(accumulate((turn.n_cells for turn in group.earlier), initial=1))
    earlier = [
        _earlier_turn(bank, turn, starts[j], variant, split, f"{key}/turn{j}", metadata)
        for j, turn in enumerate(group.earlier)
    ]
    values = {**metadata, "cell_type": group.query, "count": _count(key)}
    first = first_question_cell(len(labels), group.n_question_cells)
    truth = task.question.truth(labels, group.n_question_cells, group.query)
    answer = task.question.render(truth, question_part(labels, group.n_question_cells), first)
    output = f"{answer} {SIGNAL_TOKEN}" if task.output_cell else answer
    options = list(group.choices) or option_order(choices, key)
    question, response, template = _turn(
        bank, task.name, variant, split, key, values, group.n_question_cells, first, output, options
    )
    empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
    target = (members[0].gene_indices, members[0].gene_counts) if task.output_cell else empty
    return {
        "task": task.name,
        "variant": variant,
        "dataset": source.name,
        "cell_id": cells[anchor].obs_name,
        "split": split,
        "template_id": template.id,
        "instruction": conversation(earlier, question),
        "response": response,
        "label": answer,
        "choices": list(choices),
        "options_in_prompt": template.has_choices,
        "species": metadata["species"],
        "tissue": metadata["tissue"],
        "sequencing_method": metadata["sequencing_method"],
        "drug": metadata["drug"],
        "perturbation": metadata["perturbation"],
        "input_gene_indices": empty[0],
        "input_gene_counts": empty[1],
        "target_gene_indices": target[0],
        "target_gene_counts": target[1],
        "cell_ids": [cell.obs_name for cell in members],
        "cell_labels": labels,
        "cells_gene_indices": [cell.gene_indices for cell in members],
        "cells_gene_counts": [cell.gene_counts for cell in members],
        "query": group.query,
        "n_earlier_turns": len(group.earlier),
        "n_question_cells": group.n_question_cells,
    }


def multicell_examples(
    source: AnnDataSource,
    variant: str,
    cells: Sequence[CellRecord],
    split: str,
    bank: TemplateBank,
    choices: Sequence[str],
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(key, row)`` for the examples anchored by the cells of one split of one source.

    Parameters
    ----------
    source : AnnDataSource
        Its task is a multi-cell task.
    variant : {"instruct", "chat"}
    cells : sequence of CellRecord
        Every cell of the split, in file order.
    split : str
    bank : TemplateBank
    choices : sequence of str
        The dataset's label set.
    """
    from .builder import example_key  # the builder imports this module

    task = get_task(source.task)
    labels = [cell.label for cell in cells]
    for anchor in _anchors(task, source.name, split, cells):
        rng = np.random.default_rng(_seed(f"{task.name}/{source.name}/{cells[anchor].obs_name}"))
        group = task.question.draw(labels, anchor, rng)
        if group is None:
            continue
        key = example_key(task.name, variant, source.name, cells[anchor].obs_name)
        yield key, multicell_example(source, variant, cells, anchor, group, split, bank, choices, key)


# --- batching ----------------------------------------------------------------------------------------


def _row_cells(row: dict[str, Any]) -> list[tuple[Sequence[int], Sequence[float]]]:
    """Return the sparse cells a row's prompt shows, in order (its several cells, or its input cell)."""
    if len(row.get("cells_gene_indices") or []) > 0:
        return list(zip(row["cells_gene_indices"], row["cells_gene_counts"], strict=True))
    if len(row["input_gene_indices"]) > 0:
        return [(row["input_gene_indices"], row["input_gene_counts"])]
    return []


def prompt_cells(rows: Sequence[dict[str, Any]], n_genes: int) -> np.ndarray | None:
    """Return dense ``(n_cells, n_genes)`` counts of the cells the rows' prompts show, in prompt order."""
    cells = [densify(indices, counts, n_genes) for row in rows for indices, counts in _row_cells(row)]
    return np.stack(cells) if cells else None


def prompt_cell_labels(rows: Sequence[dict[str, Any]]) -> list[str] | None:
    """Return the label of every cell the rows' prompts show, as :func:`prompt_cells` orders them."""
    labels = [
        label
        for row in rows
        for label in (row.get("cell_labels") or ([row["label"]] if len(row["input_gene_indices"]) else []))
    ]
    return labels or None


def check_cells_kept(input_ids: Any, n_cells: int, cell_token_id: int, num_query_tokens: int) -> None:
    """Refuse a batch whose truncated prompts lost cell slots (a prompt longer than ``max_length``).

    Parameters
    ----------
    input_ids : torch.Tensor or numpy.ndarray
        ``(batch, seq_len)`` tokenized prompts.
    n_cells : int
        Cells the prompts show.
    cell_token_id : int
        Id of the processor's ``<cell_query>`` placeholder.
    num_query_tokens : int
        Placeholders per cell.
    """
    kept = int((np.asarray(input_ids) == cell_token_id).sum())
    if kept != n_cells * num_query_tokens:
        raise ValueError(
            f"Prompts longer than max_length were cut: {n_cells * num_query_tokens - kept} cell placeholder "
            "tokens are gone. Raise max_length, or show fewer cells or earlier turns per prompt."
        )
