"""Follow-up annotation: after one or two earlier questions, "and this one?" with a new cell."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import TaskGrammar
from .follow_up import earlier_turns
from .multicell import CellGroup, LabelAnswer, MultiCellTask, argmax_labels


class FollowUpAnnotation(LabelAnswer):
    """The new cell (the anchor, last in the prompt) gets its label; the earlier turns set the question."""

    def draw(self, labels: Sequence[str], anchor: int, rng: np.random.Generator) -> CellGroup | None:
        """Draw one or two earlier turns about other cells, then the anchor."""
        turns, cells = earlier_turns(labels, rng, [anchor], int(rng.integers(1, 3)))
        return CellGroup((*cells, anchor), earlier=tuple(turns))

    def truth(self, cell_labels: Sequence[str], n_question_cells: int, query: str) -> str:
        """Return the label of the last cell."""
        return cell_labels[-1]

    def from_cell_probabilities(
        self, probabilities: np.ndarray, labels: Sequence[str], n_question_cells: int, query: str
    ) -> str:
        """Return the last cell's most probable label: the question asked without its earlier turns."""
        return argmax_labels(probabilities, labels)[-1]


FOLLOW_UP_ANNOTATION = MultiCellTask(
    name="follow_up_annotation",
    title="follow-up annotation",
    input_cell=True,
    required_placeholders=frozenset(["input"]),
    optional_placeholders=frozenset([]),
    response_placeholders=frozenset([]),
    default_instruction="And this one? {input}",
    question=FollowUpAnnotation(),
    grammar=TaskGrammar(
        description="follow-up annotation: after annotating earlier cells, another person gives the cell "
        "type of one more cell {input}",
        cores={
            "high": [
                "And this one?",
                "Same question for the next cell.",
                "Now annotate this profile as well.",
                "What about the following cell?",
                "Do the same for another barcode.",
                "Next one, please: what is its identity?",
                "Apply the same annotation to this cell.",
                "And how would you classify this one?",
                "Let's continue with one more profile.",
                "Same again for this transcriptome.",
            ],
            "low": [
                "And what about this one?",
                "Okay, and this cell?",
                "What is this next one?",
                "Now this one, please.",
                "And this other cell?",
                "How about this one?",
                "Can you do this one too?",
                "One more: what's this?",
            ],
        },
        answers=[
            "This one is {output}.",
            "That one looks like {output}.",
            "The next cell is {output}.",
            "Answer: {output}.",
            "I'd call it {output}.",
            "This is {output}.",
            "It's {output}.",
            "That cell is {output}.",
        ],
        notes={"high": [""], "low": [""]},
        motivations=(
            "going through my cells one by one",
            "checking a few more cells",
            "annotating a list of barcodes",
            "continuing my review of a cluster",
            "comparing neighbouring cells",
            "finishing a manual annotation",
            "double-checking several cells",
            "working through a quiz",
            "exploring a new dataset",
            "looking at cells near a boundary",
            "screening a sample cell by cell",
            "learning by example",
            "reviewing flagged cells",
            "spot-checking an annotation",
            "walking a student through my data",
        ),
    ),
)
