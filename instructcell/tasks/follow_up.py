"""Earlier turns of a conversation: the questions a multi-cell or follow-up question comes after.

A follow-up question ("and this one?", "how sure are you?", "generate 20 more like the first") depends on what
was asked before; any other question may come after earlier turns too, and is then answered on its own
cells. The earlier turns drawn here are what a conversation in ``instructcell chat`` holds: a cell type
annotation of one cell, a group composition of a few cells, or a request for more cells like the first one
(no cell of its own), each answered correctly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .multicell import MAX_CELLS_PER_PROMPT, CellGroup, EarlierTurn, composition_text

#: Cells of an earlier group-composition turn.
MIN_GROUP, MAX_GROUP = 2, 4
#: Share of single-turn questions (group composition, odd one out...) asked after unrelated earlier turns.
UNRELATED_HISTORY_SHARE = 0.3


def random_cells(n_cells: int, n: int, exclude: Sequence[int], rng: np.random.Generator) -> list[int]:
    """Up to ``n`` distinct cells of a split of ``n_cells`` outside ``exclude``."""
    pool = np.setdiff1d(np.arange(n_cells), np.asarray(exclude, dtype=np.int64))
    return [int(i) for i in rng.choice(pool, size=min(n, len(pool)), replace=False)]


def annotation_turn(
    labels: Sequence[str], first: int, rng: np.random.Generator, exclude: Sequence[int], number: int = 1
) -> tuple[EarlierTurn, list[int]]:
    """Draw an earlier question about cell ``first``: its type, or the composition of it and 1-3 more.

    ``number`` is the number its first cell has in the conversation (the cells of turns before it come
    first). Returns the turn and its cells, ``first`` first.
    """
    if rng.random() < 0.5:
        return EarlierTurn("cta", 1, labels[first]), [first]
    more = random_cells(len(labels), int(rng.integers(MIN_GROUP, MAX_GROUP + 1)) - 1, [first, *exclude], rng)
    cells = [first, *more]
    answer = composition_text([labels[i] for i in cells], first=number)
    return EarlierTurn("group_composition", len(cells), answer), cells


def earlier_turns(
    labels: Sequence[str],
    rng: np.random.Generator,
    exclude: Sequence[int],
    n_turns: int,
    first: int | None = None,
) -> tuple[list[EarlierTurn], list[int]]:
    """``n_turns`` earlier turns (1 or 2) about cells outside ``exclude``.

    The first turn is an annotation (:func:`annotation_turn`) that shows ``first`` (default: a random cell)
    first; a second turn asks about other cells, or a third of the time for more cells like the first one.

    Returns
    -------
    turns : list of EarlierTurn
    cells : list of int
        Their cells, in prompt order.
    """
    if first is None:
        first = random_cells(len(labels), 1, exclude, rng)[0]
    turn, cells = annotation_turn(labels, first, rng, exclude)
    turns = [turn]
    if n_turns > 1:
        if rng.random() < 1 / 3:
            turns.append(EarlierTurn("follow_up_generation", 0, labels[cells[0]]))
        else:
            second = random_cells(len(labels), 1, [*exclude, *cells], rng)[0]
            turn, shown = annotation_turn(labels, second, rng, [*exclude, *cells], number=len(cells) + 1)
            turns.append(turn)
            cells += shown
    return turns, cells


def after_unrelated_turns(group: CellGroup, labels: Sequence[str], rng: np.random.Generator) -> CellGroup:
    """``group`` asked, some of the time (:data:`UNRELATED_HISTORY_SHARE`), after 1-2 turns about other cells.

    The conversation stays within :data:`~instructcell.tasks.multicell.MAX_CELLS_PER_PROMPT` cells: a group
    without room for them is asked on its own.
    """
    if rng.random() >= UNRELATED_HISTORY_SHARE:
        return group
    turns, cells = earlier_turns(labels, rng, group.cells, int(rng.integers(1, 3)))
    if len(cells) + len(group.cells) > MAX_CELLS_PER_PROMPT:
        return group
    return CellGroup((*cells, *group.cells), tuple(turns), group.query, group.choices)
