"""Match: which of 2-8 cells of different types is the requested one? The answer is its position."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import TaskGrammar
from .follow_up import after_unrelated_turns
from .multicell import (
    CellGroup,
    MultiCellTask,
    PositionAnswer,
    label_pools,
    other_cells,
    question_part,
)

MIN_CELLS, MAX_CELLS = 2, 8


class CellMatch(PositionAnswer):
    """k cells of k different types; the question names a type (``{cell_type}``), the answer its position."""

    def draw(self, labels: Sequence[str], anchor: int, rng: np.random.Generator) -> CellGroup | None:
        """Draw the anchor (the requested cell) and one cell of each of k - 1 other types, in random order."""
        pools = label_pools(labels)
        others = [label for label in pools if label != labels[anchor]]
        if not others:
            return None
        k = int(rng.integers(MIN_CELLS, min(MAX_CELLS, len(others) + 1) + 1))
        cells = [anchor]
        for i in rng.choice(len(others), size=k - 1, replace=False):
            cells += other_cells(pools[others[i]], 1, [], rng)
        group = CellGroup(tuple(int(i) for i in rng.permutation(cells)), query=labels[anchor])
        return after_unrelated_turns(group, labels, rng)

    def truth(self, cell_labels: Sequence[str], n_question_cells: int, query: str) -> int:
        """Return the position (1-based, among the question's cells) of the cell of the requested type."""
        return list(question_part(cell_labels, n_question_cells)).index(query) + 1

    def from_cell_probabilities(
        self, probabilities: np.ndarray, labels: Sequence[str], n_question_cells: int, query: str
    ) -> int:
        """Return the cell most likely to be of the requested type."""
        probabilities = np.asarray(question_part(probabilities, n_question_cells))
        return int(np.argmax(probabilities[:, list(labels).index(query)])) + 1


CELL_MATCH = MultiCellTask(
    name="cell_match",
    title="cell match",
    required_placeholders=frozenset(["cell_type", "cells"]),
    optional_placeholders=frozenset(["sequencing_method", "species", "tissue"]),
    response_placeholders=frozenset(["cell_type", "sequencing_method", "species", "tissue"]),
    default_instruction="Which of these cells is the {cell_type}? {cells}",
    question=CellMatch(),
    grammar=TaskGrammar(
        description="cell match: another person says which cell of {cells} is of the type {cell_type}",
        cores={
            "high": [
                "Which of these cells is the {cell_type}? {cells}",
                "Identify the {cell_type} among the following profiles: {cells}.",
                "One of {cells} is a {cell_type}. Which one?",
                "Locate the cell annotated as {cell_type} in this group: {cells}.",
                "Which profile would you assign to {cell_type}? {cells}",
                "Pick out the {cell_type} from these transcriptomes: {cells}.",
                "Here is a panel of cells: {cells}. Which is the {cell_type}?",
                "Find the cell matching the identity {cell_type} in {cells}.",
                "Select the barcode that corresponds to {cell_type}: {cells}.",
                "Among {cells}, which cell belongs to the {cell_type} population?",
            ],
            "low": [
                "Which one of these is the {cell_type}? {cells}",
                "Can you find the {cell_type} here? {cells}",
                "Show me which cell is the {cell_type}: {cells}.",
                "I'm looking for the {cell_type}. Which cell is it? {cells}",
                "Which of my cells is a {cell_type}? {cells}",
                "Here are some cells: {cells}. Where is the {cell_type}?",
                "Point to the {cell_type} in this bunch: {cells}.",
                "Help me find the {cell_type} among these cells: {cells}.",
            ],
        },
        answers=[
            "The {cell_type} is {output}.",
            "It is {output}.",
            "{output} is the one.",
            "Answer: {output}.",
            "You are looking for {output}.",
            "That is {output}.",
            "I'd say {output}.",
            "{output} matches best.",
        ],
        notes={"high": [""], "low": [""]},
        motivations=(
            "picking cells for a follow-up experiment",
            "checking a marker-based gate",
            "finding a population I care about",
            "teaching how to recognise cell types",
            "testing an annotation model",
            "curating examples for a figure",
            "comparing candidate cells",
            "looking for a specific lineage",
            "validating an atlas label",
            "choosing cells to sort",
            "preparing a quiz for my lab",
            "learning what a cell type looks like",
            "selecting representative cells",
            "auditing an annotation",
            "planning a spatial experiment",
        ),
    ),
)
