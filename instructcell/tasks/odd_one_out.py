"""Odd one out: which of 3-8 cells differs from the others? The answer names its position."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from .base import TaskGrammar
from .follow_up import after_unrelated_turns
from .multicell import (
    CellGroup,
    MultiCellTask,
    PositionAnswer,
    argmax_labels,
    label_pools,
    other_cells,
    question_part,
)

MIN_CELLS, MAX_CELLS = 3, 8


class OddOneOut(PositionAnswer):
    """k - 1 cells of one type and one of another; the answer is the odd cell's position (``"cell 3"``)."""

    def draw(self, labels: Sequence[str], anchor: int, rng: np.random.Generator) -> CellGroup | None:
        """Draw the anchor's type as the majority and one cell of a random other type, at a random place."""
        pools = label_pools(labels)
        others = [label for label in pools if label != labels[anchor]]
        if not others:
            return None
        k = int(rng.integers(MIN_CELLS, MAX_CELLS + 1))
        majority = other_cells(pools[labels[anchor]], k - 2, [anchor], rng)
        if majority is None:
            return None
        odd = other_cells(pools[others[int(rng.integers(len(others)))]], 1, [], rng)
        cells = [anchor, *majority]
        cells.insert(int(rng.integers(k)), odd[0])
        return after_unrelated_turns(CellGroup(tuple(cells)), labels, rng)

    def truth(self, cell_labels: Sequence[str], n_question_cells: int, query: str) -> int:
        """Return the position (1-based, among the question's cells) of the cell whose label occurs once."""
        labels = question_part(cell_labels, n_question_cells)
        counts = Counter(labels)
        return next(i for i, label in enumerate(labels, 1) if counts[label] == 1)

    def from_cell_probabilities(
        self, probabilities: np.ndarray, labels: Sequence[str], n_question_cells: int, query: str
    ) -> int:
        """Return the cell least likely to be of the majority's most probable label."""
        probabilities = np.asarray(question_part(probabilities, n_question_cells))
        majority = Counter(argmax_labels(probabilities, labels)).most_common(1)[0][0]
        return int(np.argmin(probabilities[:, list(labels).index(majority)])) + 1


ODD_ONE_OUT = MultiCellTask(
    name="odd_one_out",
    title="odd one out",
    required_placeholders=frozenset(["cells"]),
    optional_placeholders=frozenset(["sequencing_method", "species", "tissue"]),
    response_placeholders=frozenset(["sequencing_method", "species", "tissue"]),
    default_instruction="Which cell differs from the others? {cells}",
    question=OddOneOut(),
    grammar=TaskGrammar(
        description="odd one out: another person names the one cell of {cells} whose type differs from the "
        "others",
        cores={
            "high": [
                "Which cell differs from the others? {cells}",
                "One of these profiles belongs to another cell type: {cells}. Which one?",
                "Identify the outlier cell in this group: {cells}.",
                "All but one of these cells share a type. Name the exception. {cells}",
                "Find the cell whose identity does not match the rest: {cells}.",
                "Which profile is transcriptionally the odd one out? {cells}",
                "Spot the single cell of a different population among {cells}.",
                "Point out the cell that is not like the others in {cells}.",
                "Here is a group: {cells}. Which member is of another lineage?",
                "Detect the mismatched cell in this set: {cells}.",
            ],
            "low": [
                "Which of these cells is the odd one out? {cells}",
                "One cell here is different. Which? {cells}",
                "Can you find the cell that doesn't belong? {cells}",
                "Which cell is not like the others? {cells}",
                "Spot the different cell for me: {cells}.",
                "I think one of these cells is weird: {cells}. Which one?",
                "Tell me which cell stands out in this group: {cells}.",
                "Here are some cells: {cells}. Which one is not the same kind?",
            ],
        },
        answers=[
            "The odd one out is {output}.",
            "It is {output}.",
            "{output} differs from the rest.",
            "Answer: {output}.",
            "The different one is {output}.",
            "I'd pick {output}.",
            "{output} stands out.",
            "That would be {output}.",
        ],
        notes={"high": [""], "low": [""]},
        motivations=(
            "checking a cluster for intruders",
            "testing whether I can trust a sorted population",
            "looking for doublets or contaminants",
            "teaching students to compare profiles",
            "validating a gating strategy",
            "cleaning up a reference dataset",
            "reviewing cells flagged by QC",
            "learning what makes cell types different",
            "quality-checking a cell-sorting experiment",
            "building a curated training set",
            "investigating a surprising cluster",
            "playing a cell-type quiz",
            "checking a collaborator's annotations",
            "looking for rare cells in a population",
            "designing a marker panel",
        ),
    ),
)
