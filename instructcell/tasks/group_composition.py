"""Group composition: which cell types are in a group of 2-16 cells, and how many of each."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modeling_instructcell.answer_extraction import extract_label

from .base import TaskGrammar
from .follow_up import after_unrelated_turns
from .multicell import (
    MAX_CELLS_PER_PROMPT,
    TALLY_MARK,
    CellGroup,
    Composition,
    MultiCellTask,
    argmax_labels,
    composition_of,
    composition_text,
    conclusion,
    label_pools,
    other_cells,
    question_part,
)

MIN_CELLS = 2
#: Most cell types in one group.
MAX_TYPES = 4


class GroupComposition:
    """k = 2-16 cells of 1-4 types of one dataset; the answer lists every type with its count.

    The answer labels each cell, then counts (types in alphabetical order):
    ``"1: B cells; 2: T cells; 3: B cells; in total B cells: 2; T cells: 1"``
    (:func:`~instructcell.tasks.multicell.composition_text`).
    """

    def draw(self, labels: Sequence[str], anchor: int, rng: np.random.Generator) -> CellGroup | None:
        """Draw the anchor's type and up to three others: 2-16 cells, the types' counts a random split."""
        pools = label_pools(labels)
        k = int(rng.integers(MIN_CELLS, MAX_CELLS_PER_PROMPT + 1))
        others = [label for label in pools if label != labels[anchor]]
        n_types = int(rng.integers(1, min(k, MAX_TYPES, len(others) + 1) + 1))
        chosen = [labels[anchor], *(others[i] for i in rng.choice(len(others), n_types - 1, replace=False))]
        cuts = np.sort(rng.choice(np.arange(1, k), size=n_types - 1, replace=False))
        counts = np.diff(np.concatenate([[0], cuts, [k]]))
        cells = [anchor]
        for label, count in zip(chosen, counts, strict=True):
            left = len(np.setdiff1d(pools[label], cells))
            need = min(int(count) - (label == labels[anchor]), left)  # a small type gives what it has
            cells += other_cells(pools[label], need, cells, rng)
        if len(cells) < MIN_CELLS:
            return None
        group = CellGroup(tuple(int(i) for i in rng.permutation(cells)))
        return after_unrelated_turns(group, labels, rng)

    def truth(self, cell_labels: Sequence[str], n_question_cells: int, query: str) -> Composition:
        """Count the question's cells' labels."""
        return composition_of(question_part(cell_labels, n_question_cells))

    def render(self, answer: Composition, cell_labels: Sequence[str], first: int = 1) -> str:
        """Label the cells one by one, then write the counts: ``"1: B cells; ...; in total B cells: 2"``."""
        if composition_of(cell_labels) != answer:
            raise ValueError(f"The cells {list(cell_labels)} do not make the composition {answer}.")
        return composition_text(cell_labels, first)

    def parse(
        self, text: str, labels: Sequence[str], n_question_cells: int, first: int = 1
    ) -> Composition | None:
        """Read the counts ``"<label>: <count>; ..."`` after the walk-through's ``in total``.

        Without ``in total`` the whole text is read. None when a part names no label, a label twice, or no
        count.
        """
        counts: dict[str, int] = {}
        for part in conclusion(text, TALLY_MARK).split(";"):
            name, _, count = part.rpartition(":")
            count = count.strip().rstrip(".")  # the end of the answer's sentence
            label = extract_label(name, labels) if name.strip() else None
            if label is None or label in counts or not count.isdigit() or int(count) < 1:
                return None
            counts[label] = int(count)
        return tuple(sorted(counts.items())) if counts else None

    def from_cell_probabilities(
        self, probabilities: np.ndarray, labels: Sequence[str], n_question_cells: int, query: str
    ) -> Composition:
        """Count the question's cells' most probable labels."""
        return composition_of(argmax_labels(question_part(probabilities, n_question_cells), labels))

    def cell_accuracy(self, answer: Composition | None, truth: Composition) -> float:
        """Cells accounted for: ``sum over labels of min(answered, true count) / group size``."""
        if answer is None:
            return 0.0
        given = dict(answer)
        return sum(min(given.get(label, 0), count) for label, count in truth) / sum(c for _, c in truth)


GROUP_COMPOSITION = MultiCellTask(
    name="group_composition",
    title="group composition",
    required_placeholders=frozenset(["cells"]),
    optional_placeholders=frozenset(["sequencing_method", "species", "tissue"]),
    response_placeholders=frozenset(["sequencing_method", "species", "tissue"]),
    default_instruction="What cell types are in this group, and how many of each? {cells}",
    question=GroupComposition(),
    anchor_share=0.4,
    grammar=TaskGrammar(
        description="group composition: another person counts the cell types of the group of cells {cells}",
        cores={
            "high": [
                "What cell types are in this group, and how many of each? {cells}",
                "Give the cell-type composition of these cells: {cells}.",
                "Count the cells of each type among {cells}.",
                "Here is a group of single-cell profiles: {cells}. Which populations do they contain, and in "
                "what numbers?",
                "Annotate this set of cells and report the count per cell type. {cells}",
                "Tally the cell identities in the following group: {cells}.",
                "Which cell types make up this sample of cells, with counts? {cells}",
                "Break this group of transcriptomes down by cell type: {cells}.",
                "Report how many cells of each type are present in {cells}.",
                "Summarise the composition of this cell group as type and count. {cells}",
                "Profiles: {cells}. Provide the number of cells per annotated type.",
                "Determine the cell-type counts for this batch of barcodes: {cells}.",
            ],
            "low": [
                "What kinds of cells are in this bunch, and how many of each? {cells}",
                "Can you count the types of cells here? {cells}",
                "I have some cells: {cells}. What are they, and how many of each kind?",
                "Tell me which cells are in this group and count them. {cells}",
                "How many of each sort of cell do I have here? {cells}",
                "Sort these cells into types and count them for me: {cells}.",
                "What's in this group of cells? Give me numbers per type. {cells}",
                "Here are my cells: {cells}. Which kinds are there and how many?",
                "Please count the cell types in this little group: {cells}.",
                "Help me see what this set of cells is made of: {cells}.",
            ],
        },
        answers=[
            "The group holds {output}.",
            "Composition: {output}.",
            "I count {output}.",
            "By cell type: {output}.",
            "These cells are {output}.",
            "Answer: {output}.",
            "Here is the breakdown: {output}.",
            "The counts per type are {output}.",
            "I find {output}.",
            "Cell types and counts: {output}.",
        ],
        notes={"high": [""], "low": [""]},
        motivations=(
            "checking the composition of a sorted population",
            "estimating cell-type proportions in a sample",
            "validating a cluster I picked by eye",
            "comparing two samples by their make-up",
            "auditing a batch before sequencing more",
            "teaching how tissues are composed",
            "looking for contaminating cell types",
            "preparing a composition figure",
            "summarising a region of my UMAP",
            "checking a pooled sample",
            "writing a methods section",
            "screening for rare populations",
            "learning what a blood sample contains",
            "comparing treated and control samples",
            "benchmarking a deconvolution tool",
        ),
    ),
)
