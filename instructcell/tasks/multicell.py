"""What the multi-cell and follow-up tasks share: several cells per prompt, earlier turns, structured answers.

A multi-cell task asks about a *group* of cells of one dataset and split: cells in one prompt (group
composition, odd one out, match, joint annotation), or a question that depends on earlier turns of a
conversation whose cells stay in the prompt (follow-up turns). Each task is a :class:`MultiCellTask`: a
:class:`~instructcell.tasks.base.Task` plus a :class:`GroupQuestion` that draws the task's cells and
writes, reads and derives its answers:

* :meth:`GroupQuestion.draw` picks the cells of one example (and its earlier turns) from the split's labels;
* :meth:`GroupQuestion.truth` is the right answer for those cells, :meth:`GroupQuestion.render` its text;
  questions about a group's own cells walk through them first (:func:`cell_by_cell`: each cell's label in
  prompt order), then conclude (the counts, the position), so that the model answers from its own labels;
* :meth:`GroupQuestion.parse` reads a model's answer back (``None`` when it cannot);
* cells are numbered through the whole conversation: a question after earlier turns that showed two cells
  lists its own as ``cell 3: <CELL>, cell 4: <CELL>`` and its answer names them ``3``, ``4``
  (:func:`first_question_cell`), the numbers the model's cell slots carry;
* :meth:`GroupQuestion.from_cell_probabilities` answers the same question from per-cell label probabilities
  (the evaluation's baselines: the model's own single-cell calls, or logistic regression's);
* :meth:`GroupQuestion.cell_accuracy` gives partial credit (the share of cells an answer gets right).

The prompt lists a group's cells with :func:`cell_list`; earlier turns are written by :func:`conversation`,
the one format that the builder trains on and ``instructcell chat`` sends.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modeling_instructcell.answer_extraction import extract_label

from .base import Task

#: The most cells one prompt holds (group size of the multi-cell tasks, cells of a conversation).
MAX_CELLS_PER_PROMPT = 16
#: Greedy answer length that holds the longest answer: 16 cells labelled one by one, then their counts.
ANSWER_TOKENS = 192
#: Ends a composition's cell-by-cell walk-through; the counts follow.
TALLY_MARK = "in total"
#: Ends the walk-through of a question answered by a position; the position follows.
CONCLUSION_MARK = "so"
#: A composition: ``((label, count), ...)`` sorted by label.
Composition = tuple[tuple[str, int], ...]

_ITEM_NUMBER = re.compile(r"(?<![\w.])(\d+)(?=\s*:\s)")
_CELL_NUMBER = re.compile(r"\b(cell\s*#?\s*)(\d+)\b", re.IGNORECASE)
_POSITION = re.compile(r"\bcell\s*#?\s*(\d+)\b|^\s*#?(\d+)\s*[.!]?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class EarlierTurn:
    """One earlier turn of a conversation, before the question.

    Parameters
    ----------
    task : str
        The task whose question it was (``"cta"``, ``"group_composition"``): its template bank writes it.
    n_cells : int
        How many of the group's cells it showed (they come first in the group, in turn order).
    answer : str
        What the assistant answered (the ``{output}`` of that task).
    """

    task: str
    n_cells: int
    answer: str


@dataclass(frozen=True)
class CellGroup:
    """The cells of one multi-cell example.

    Parameters
    ----------
    cells : tuple of int
        Positions in the split's cell list, in prompt order: the earlier turns' cells first, then the
        question's.
    earlier : tuple of EarlierTurn
        The conversation before the question (empty for single-turn tasks).
    query : str
        The task's parameter: the asked label (match), the answer being questioned (confidence), or "".
    choices : tuple of str
        Label options the prompt lists (joint annotation: the group's labels, shuffled), or empty.
    """

    cells: tuple[int, ...]
    earlier: tuple[EarlierTurn, ...] = ()
    query: str = ""
    choices: tuple[str, ...] = ()

    @property
    def n_question_cells(self) -> int:
        """Cells shown by the question itself (after the earlier turns')."""
        return len(self.cells) - sum(turn.n_cells for turn in self.earlier)


class GroupQuestion(Protocol):
    """How a multi-cell task draws its cells and writes, reads and derives its answers (see the module).

    Every method sees all the cells of the prompt (earlier turns' cells first) and ``n_question_cells``, the
    cells the question itself shows (the last ones): a question about its own group reads those, a
    follow-up question reads the earlier ones.
    """

    def draw(self, labels: Sequence[str], anchor: int, rng: np.random.Generator) -> CellGroup | None:
        """Draw one example around the split's cell ``anchor`` (None when the split cannot give one)."""

    def truth(self, cell_labels: Sequence[str], n_question_cells: int, query: str) -> Hashable:
        """Return the right answer for cells with these labels (prompt order) and the example's query."""

    def render(self, answer: Hashable, cell_labels: Sequence[str], first: int = 1) -> str:
        """Write the answer as text: the ``{output}`` of the task's templates.

        ``cell_labels`` are the question's cells' labels in prompt order, for answers that walk through
        them; ``first`` is the number of the question's first cell in the conversation
        (:func:`first_question_cell`).
        """

    def parse(
        self, text: str, labels: Sequence[str], n_question_cells: int, first: int = 1
    ) -> Hashable | None:
        """Read an answer of the dataset's label set back from text; None when it names no valid answer.

        Positions in the text are conversation-wide numbers (``first`` is the question's first cell); a
        position answer comes back relative to the question's cells (1 to ``n_question_cells``).
        """

    def from_cell_probabilities(
        self, probabilities: np.ndarray, labels: Sequence[str], n_question_cells: int, query: str
    ) -> Hashable | None:
        """Answer from ``(n_cells, n_labels)`` per-cell probabilities over ``labels`` (prompt order)."""

    def cell_accuracy(self, answer: Hashable | None, truth: Hashable) -> float:
        """Return the share of the cells that ``answer`` gets right (0 for None)."""


@dataclass(frozen=True, kw_only=True)
class MultiCellTask(Task):
    """A :class:`~instructcell.tasks.base.Task` about several cells, or with earlier turns.

    Every multi-cell task asks about cell types (``label_key="cell_type"``), with the annotation datasets'
    metadata, scored by the ``multicell`` metric family against per-cell logistic regression; those fields
    default accordingly, and a question shows no cell of its own and writes none unless it says so.

    Parameters
    ----------
    question : GroupQuestion
        Draws the cells of an example and writes, reads and derives its answer.
    anchor_share : float
        Share of a training split's cells that anchor an example (each example holds several cells, so the
        training rows stay near ``anchor_share`` x cells x mean group size); validation and test cells all
        anchor one, to evaluate on as many groups as the held-out cells give.
    """

    input_cell: bool = False
    output_cell: bool = False
    label_key: str = "cell_type"
    label_placeholder: str | None = None
    metadata_keys: tuple[str, ...] = ("species", "tissue", "sequencing_method")
    metric_family: str = "multicell"
    baselines: tuple[str, ...] = ("logistic_regression_cells",)
    drop_rare_labels: bool = True
    default_labels: tuple[str, ...] | None = None
    question: GroupQuestion | None = None
    anchor_share: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.question is None:
            raise ValueError(f"Task {self.name!r}: a multi-cell task needs its `question`.")
        if not 0 < self.anchor_share <= 1:
            raise ValueError(f"Task {self.name!r}: anchor_share must be in (0, 1].")


class PositionAnswer:
    """Answers that name one of the question's cells by its position, after labelling each cell.

    ``"1: B cells; 2: T cells; 3: B cells; so cell 2"``; the answer itself (``truth``) is the position among
    the question's cells (1-based), written with the cell's number in the conversation.
    """

    def render(self, answer: int, cell_labels: Sequence[str], first: int = 1) -> str:
        """Label the cells one by one, then name the position: ``"1: B cells; ...; so cell 2"``."""
        return f"{cell_by_cell(cell_labels, first)}; {CONCLUSION_MARK} cell {answer + first - 1}"

    def parse(self, text: str, labels: Sequence[str], n_question_cells: int, first: int = 1) -> int | None:
        """Return the one position the answer names (after its walk-through's ``so``, if it has one)."""
        position = parse_position(conclusion(text, CONCLUSION_MARK), first + n_question_cells - 1)
        return position - first + 1 if position is not None and position >= first else None

    def cell_accuracy(self, answer: int | None, truth: int) -> float:
        """Return 1 for the right position, else 0."""
        return float(answer == truth)


class LabelAnswer:
    """Answers that are one label of the dataset's label set."""

    def render(self, answer: str, cell_labels: Sequence[str], first: int = 1) -> str:
        """Return the label."""
        return answer

    def parse(self, text: str, labels: Sequence[str], n_question_cells: int, first: int = 1) -> str | None:
        """Return the one label the answer names."""
        return extract_label(text, labels)

    def cell_accuracy(self, answer: str | None, truth: str) -> float:
        """Return 1 for the right label, else 0."""
        return float(answer == truth)


def is_multicell(task: Task) -> bool:
    """Whether a task asks about a group of cells or earlier turns (a :class:`MultiCellTask`)."""
    return isinstance(task, MultiCellTask)


def cell_list(n_cells: int, cell_token: str, first: int = 1) -> str:
    """Numbered cell slots of one prompt: ``"cell 1: <CELL>, cell 2: <CELL>"``.

    Parameters
    ----------
    n_cells : int
        Cells in the group, 1 to :data:`MAX_CELLS_PER_PROMPT`.
    cell_token : str
        The processor's cell slot (``<CELL>``).
    first : int
        Number of the first cell: cells are numbered through the conversation (:func:`first_question_cell`),
        and a question that names its cells in several places goes on counting.
    """
    last = first + n_cells - 1
    if n_cells < 1 or last > MAX_CELLS_PER_PROMPT:
        raise ValueError(
            f"A prompt holds 1 to {MAX_CELLS_PER_PROMPT} cells, got {last}: ask about fewer cells at once."
        )
    return ", ".join(f"cell {i}: {cell_token}" for i in range(first, last + 1))


def first_question_cell(n_cells: int, n_question_cells: int) -> int:
    """Return the number of a question's first cell (the cells of earlier turns come first).

    A prompt's cells are numbered in prompt order through the whole conversation, the numbers that the
    model's cell slots carry, so that ``cell 3`` in a question and ``3:`` in its answer are the cell whose
    slot says 3.
    """
    return n_cells - n_question_cells + 1


def shift_cell_numbers(text: str, shift: int) -> str:
    """Renumber the cells an answer names (``"3: B cells"``, ``"cell 3"``) by ``shift``.

    For an answer kept in a conversation whose older turns were dropped: its cells move up in the prompt.
    Counts (``"B cells: 2"``) are left as they are.
    """
    if shift == 0:
        return text
    text = _ITEM_NUMBER.sub(lambda m: str(int(m.group(1)) + shift), text)
    return _CELL_NUMBER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + shift}", text)


def conversation(earlier: Sequence[tuple[str, str]], question: str) -> str:
    r"""Write a prompt after its earlier turns: ``"User: q1\nAssistant: a1\n...<question>"``.

    Parameters
    ----------
    earlier : sequence of (str, str)
        (user message, assistant answer) of the earlier turns, oldest first; their cell slots stay in place.
    question : str
        The message being asked now.
    """
    return "".join(f"User: {user}\nAssistant: {reply}\n" for user, reply in earlier) + question


# --- what the questions share ------------------------------------------------------------------------


def label_pools(labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Return the positions of each label's cells, labels sorted (so that seeded draws are reproducible)."""
    labels = np.asarray(labels, dtype=object)
    return {label: np.flatnonzero(labels == label) for label in sorted(set(labels.tolist()))}


def other_cells(
    pool: np.ndarray, n: int, exclude: Sequence[int], rng: np.random.Generator
) -> list[int] | None:
    """``n`` distinct cells of ``pool`` outside ``exclude`` (None when the pool has fewer)."""
    left = np.setdiff1d(pool, np.asarray(exclude, dtype=np.int64))
    if len(left) < n:
        return None
    return [int(i) for i in rng.choice(left, size=n, replace=False)]


def conclusion(text: str | None, mark: str) -> str:
    """Return what follows the last ``mark`` (a whole word or phrase, any case), or all of ``text``."""
    return re.split(rf"\b{re.escape(mark)}\b", text or "", flags=re.IGNORECASE)[-1]


def parse_position(text: str, n_cells: int) -> int | None:
    """Return the cell an answer names (``"cell 3"``, ``"3"``), 1-based; None for none or an impossible."""
    found = {int(a or b) for a, b in _POSITION.findall(text or "")}
    if len(found) != 1:
        return None
    position = found.pop()
    return position if 1 <= position <= n_cells else None


def argmax_labels(probabilities: np.ndarray, labels: Sequence[str]) -> list[str]:
    """Each cell's most probable label: ``(n_cells, n_labels)`` -> ``n_cells`` labels."""
    return [labels[i] for i in np.asarray(probabilities).argmax(axis=1)]


def composition_of(labels: Sequence[str]) -> Composition:
    """Count the labels: ``["B", "T", "B"]`` -> ``(("B", 2), ("T", 1))``."""
    return tuple(sorted(Counter(labels).items()))


def cell_by_cell(cell_labels: Sequence[str], first: int = 1) -> str:
    """``"1: B cells; 2: T cells"``: each cell's label, in prompt order, numbered from ``first``."""
    return "; ".join(f"{i}: {label}" for i, label in enumerate(cell_labels, first))


def composition_text(cell_labels: Sequence[str], first: int = 1) -> str:
    """Write the answer of a group composition question: each cell's label, then the counts of each label.

    ``["B cells", "T cells", "B cells"]`` -> ``"1: B cells; 2: T cells; 3: B cells; in total B cells: 2;
    T cells: 1"``. Labelling the cells one by one before counting them is what lets the model count: the
    counts are then read off its own answer, not estimated from all the cells at once.
    """
    counts = "; ".join(f"{label}: {count}" for label, count in composition_of(cell_labels))
    return f"{cell_by_cell(cell_labels, first)}; {TALLY_MARK} {counts}"


def question_part(values: Sequence, n_question_cells: int) -> Sequence:
    """Return the entries of the cells the question shows: the last ``n_question_cells``."""
    return values[len(values) - n_question_cells :]
