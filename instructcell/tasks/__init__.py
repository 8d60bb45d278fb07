"""The task registry: one definition per task, read by the builder, training, evaluation, inference and CLI.

Adding a task is one new module here with its :class:`Task`, an entry in :data:`TASKS`, its template bank
(``datasets_builder/template_bank/<name>.jsonl``) and tests; docs/contributing.md walks through it.

>>> from instructcell.tasks import get_task
>>> get_task("cta").title
'cell type annotation'
"""

from __future__ import annotations

from .base import METRIC_FAMILIES, Task, TaskGrammar
from .cell_match import CELL_MATCH
from .cell_type_annotation import CELL_TYPE_ANNOTATION
from .drug_sensitivity_prediction import DRUG_SENSITIVITY_PREDICTION
from .follow_up_annotation import FOLLOW_UP_ANNOTATION
from .follow_up_confidence import FOLLOW_UP_CONFIDENCE
from .follow_up_generation import FOLLOW_UP_GENERATION
from .group_composition import GROUP_COMPOSITION
from .joint_annotation import JOINT_ANNOTATION
from .multicell import MultiCellTask, is_multicell
from .odd_one_out import ODD_ONE_OUT
from .perturbation_response import CONTROL_PERTURBATION, PERTURBATION_RESPONSE
from .pseudo_cell_generation import PSEUDO_CELL_GENERATION

#: Every task by name, in the order data, reports and tables list them. New tasks go at the end: the order
#: seeds template synthesis, so the existing banks stay byte-identical.
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        CELL_TYPE_ANNOTATION,
        DRUG_SENSITIVITY_PREDICTION,
        PSEUDO_CELL_GENERATION,
        PERTURBATION_RESPONSE,
        GROUP_COMPOSITION,
        ODD_ONE_OUT,
        CELL_MATCH,
        JOINT_ANNOTATION,
        FOLLOW_UP_ANNOTATION,
        FOLLOW_UP_CONFIDENCE,
        FOLLOW_UP_GENERATION,
    )
}


def task_names() -> tuple[str, ...]:
    """Names of all tasks, in registry order."""
    return tuple(TASKS)


def get_task(name: str) -> Task:
    """Return the task called ``name``; a ``ValueError`` listing the known tasks otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown task {name!r}: choose one of {', '.join(TASKS)}.") from None


def parse_task_list(text: str | None) -> tuple[str, ...]:
    """``"cta,cpcg"`` -> ``("cta", "cpcg")`` in registry order, every name checked; None or "" = all tasks."""
    if not text:
        return task_names()
    names = {name.strip() for name in text.split(",") if name.strip()}
    for name in names:
        get_task(name)
    return tuple(name for name in TASKS if name in names)


def tasks_of_family(family: str) -> tuple[str, ...]:
    """Names of the tasks scored by one metric family (``"classification"``, ``"generation"``...)."""
    if family not in METRIC_FAMILIES:
        raise ValueError(f"Unknown metric family {family!r}: choose one of {METRIC_FAMILIES}.")
    return tuple(name for name, task in TASKS.items() if task.metric_family == family)


__all__ = [
    "CELL_MATCH",
    "CELL_TYPE_ANNOTATION",
    "CONTROL_PERTURBATION",
    "DRUG_SENSITIVITY_PREDICTION",
    "FOLLOW_UP_ANNOTATION",
    "FOLLOW_UP_CONFIDENCE",
    "FOLLOW_UP_GENERATION",
    "GROUP_COMPOSITION",
    "JOINT_ANNOTATION",
    "METRIC_FAMILIES",
    "ODD_ONE_OUT",
    "PERTURBATION_RESPONSE",
    "PSEUDO_CELL_GENERATION",
    "TASKS",
    "MultiCellTask",
    "Task",
    "TaskGrammar",
    "get_task",
    "is_multicell",
    "parse_task_list",
    "task_names",
    "tasks_of_family",
]
