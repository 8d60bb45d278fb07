"""Joint annotation: label 2-8 cells of one dataset together, each listed label used once."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from modeling_instructcell.answer_extraction import extract_label

from .base import TaskGrammar
from .follow_up import after_unrelated_turns
from .multicell import CellGroup, MultiCellTask, cell_by_cell, label_pools, other_cells, question_part

MIN_CELLS, MAX_CELLS = 2, 8
#: Separates the listed options in the example's ``query``.
OPTION_SEPARATOR = "; "
_ITEM = re.compile(r"^\s*(?:cell\s*)?(\d+)\s*[:=.)-]\s*(.+?)\s*$", re.IGNORECASE)


class JointAnnotation:
    """k cells of k different types and the k labels as options: each label goes to exactly one cell.

    The answer reads ``"1: B cells; 2: T cells"`` (one label per cell, in prompt order, numbered through the
    conversation); the example's query holds the options in the order the prompt lists them.
    """

    def draw(self, labels: Sequence[str], anchor: int, rng: np.random.Generator) -> CellGroup | None:
        """Draw the anchor and one cell of each of k - 1 other types; the options: their labels, shuffled."""
        pools = label_pools(labels)
        others = [label for label in pools if label != labels[anchor]]
        if not others:
            return None
        k = int(rng.integers(MIN_CELLS, min(MAX_CELLS, len(others) + 1) + 1))
        cells = [anchor]
        for i in rng.choice(len(others), size=k - 1, replace=False):
            cells += other_cells(pools[others[i]], 1, [], rng)
        cells = [int(i) for i in rng.permutation(cells)]
        options = tuple(labels[i] for i in rng.permutation(cells))
        group = CellGroup(tuple(cells), query=OPTION_SEPARATOR.join(options), choices=options)
        return after_unrelated_turns(group, labels, rng)

    def truth(self, cell_labels: Sequence[str], n_question_cells: int, query: str) -> tuple[str, ...]:
        """Return the question's cells' labels in prompt order."""
        return tuple(question_part(cell_labels, n_question_cells))

    def render(self, answer: tuple[str, ...], cell_labels: Sequence[str], first: int = 1) -> str:
        """Write ``"1: B cells; 2: T cells"`` (numbered from ``first``)."""
        return cell_by_cell(answer, first)

    def parse(
        self, text: str, labels: Sequence[str], n_question_cells: int, first: int = 1
    ) -> tuple[str, ...] | None:
        """Read ``"<position>: <label>; ..."`` with every position ``first`` to ``first + n - 1`` once.

        None otherwise.
        """
        given: dict[int, str] = {}
        for part in (text or "").split(";"):
            match = _ITEM.match(part)
            label = extract_label(match.group(2), labels) if match else None
            if label is None or int(match.group(1)) in given:
                return None
            given[int(match.group(1))] = label
        positions = range(first, first + n_question_cells)
        if sorted(given) != list(positions):
            return None
        return tuple(given[i] for i in positions)

    def from_cell_probabilities(
        self, probabilities: np.ndarray, labels: Sequence[str], n_question_cells: int, query: str
    ) -> tuple[str, ...]:
        """Each cell's most probable label among the listed options, independently of the other cells."""
        options = query.split(OPTION_SEPARATOR)
        columns = [list(labels).index(label) for label in options]
        best = np.asarray(question_part(probabilities, n_question_cells))[:, columns].argmax(axis=1)
        return tuple(options[i] for i in best)

    def cell_accuracy(self, answer: tuple[str, ...] | None, truth: tuple[str, ...]) -> float:
        """Return the share of the cells labelled right."""
        if answer is None:
            return 0.0
        return sum(a == t for a, t in zip(answer, truth, strict=True)) / len(truth)


JOINT_ANNOTATION = MultiCellTask(
    name="joint_annotation",
    title="joint annotation",
    required_placeholders=frozenset(["cells", "choices"]),
    optional_placeholders=frozenset(["sequencing_method", "species", "tissue"]),
    response_placeholders=frozenset(["sequencing_method", "species", "tissue"]),
    default_instruction="Label each of these cells with one of {choices}, using each label once. {cells}",
    question=JointAnnotation(),
    grammar=TaskGrammar(
        description="joint annotation: another person labels each cell of {cells} with one of the labels "
        "{choices}, each label used exactly once",
        cores={
            "high": [
                "Label each of these cells with one of {choices}, using each label once. {cells}",
                "Assign the cell types {choices} to the profiles {cells}; every type occurs exactly once.",
                "These cells are one each of {choices}: {cells}. Which is which?",
                "Annotate the group {cells} jointly: each of {choices} applies to exactly one cell.",
                "Match every cell in {cells} to a distinct label from {choices}.",
                "Each label in {choices} belongs to one of these transcriptomes: {cells}. Give the mapping.",
                "Perform a one-to-one annotation of {cells} with the types {choices}.",
                "Resolve which profile of {cells} is which of {choices} (no label twice).",
                "Give every barcode in {cells} its identity; the identities are {choices}, one per cell.",
                "Pair the cells {cells} with the labels {choices}, one label per cell.",
            ],
            "low": [
                "These cells are one of each: {choices}. Which is which? {cells}",
                "Can you tell me which cell is which? They are {choices}, one each. {cells}",
                "Give each cell a name from {choices}, no repeats please: {cells}.",
                "I know these are {choices}, one of each: {cells}. Sort them out for me.",
                "Match the names {choices} to my cells, one name per cell: {cells}.",
                "Which cell gets which label? Labels: {choices}, each used once. {cells}",
                "Help me label these cells ({cells}) using each of {choices} one time.",
                "Put one of {choices} on each cell, no label twice: {cells}.",
            ],
        },
        answers=[
            "Here is the assignment: {output}.",
            "Labels: {output}.",
            "I'd annotate them as {output}.",
            "Answer: {output}.",
            "Each cell, in order: {output}.",
            "The mapping is {output}.",
            "My joint call: {output}.",
            "They are {output}.",
        ],
        notes={"high": [""], "low": [""]},
        motivations=(
            "matching sorted populations to their wells",
            "resolving labels swapped in a spreadsheet",
            "checking a multiplexed experiment",
            "assigning hashtags to cell types",
            "teaching how cell types differ",
            "reconciling two annotations",
            "auditing a mislabelled sample sheet",
            "setting up a reference panel",
            "comparing annotation by hand and by model",
            "testing a joint labelling idea",
            "recovering lost sample labels",
            "designing a labelling quiz",
            "sanity-checking an atlas",
            "matching clusters to known types",
            "learning to read expression profiles",
        ),
    ),
)
