"""Follow-up generation: "generate 20 more like the first" after earlier questions about cells."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import TaskGrammar
from .follow_up import earlier_turns
from .multicell import CellGroup, LabelAnswer, MultiCellTask, argmax_labels


class FollowUpGeneration(LabelAnswer):
    """More cells like the conversation's first cell (the anchor): the answer is its type, then ``<SIGNAL>``.

    The builder appends ``<SIGNAL>`` to the answer and makes the anchor the target cell, so the cell decoder
    learns to sample cells like it.
    """

    def draw(self, labels: Sequence[str], anchor: int, rng: np.random.Generator) -> CellGroup | None:
        """Draw one or two earlier turns, the first of which shows the anchor first."""
        turns, cells = earlier_turns(labels, rng, [], int(rng.integers(1, 3)), first=anchor)
        return CellGroup(tuple(cells), earlier=tuple(turns))

    def truth(self, cell_labels: Sequence[str], n_question_cells: int, query: str) -> str:
        """Return the label of the first cell."""
        return cell_labels[0]

    def from_cell_probabilities(
        self, probabilities: np.ndarray, labels: Sequence[str], n_question_cells: int, query: str
    ) -> str:
        """Return the first cell's most probable label."""
        return argmax_labels(probabilities, labels)[0]


FOLLOW_UP_GENERATION = MultiCellTask(
    name="follow_up_generation",
    title="follow-up generation",
    output_cell=True,
    required_placeholders=frozenset([]),
    optional_placeholders=frozenset(["count"]),
    response_placeholders=frozenset(["count"]),
    default_instruction="Generate {count} more cells like the first one.",
    question=FollowUpGeneration(),
    grammar=TaskGrammar(
        description="follow-up generation: another person generates {count} more cells like the first "
        "cell of the conversation",
        cores={
            "high": [
                "Generate {count} more cells like the first one.",
                "Simulate {count} additional profiles of the same type as the first cell.",
                "Sample {count} synthetic cells resembling the first profile.",
                "Produce {count} more transcriptomes like that first cell.",
                "Create {count} in-silico cells of the first cell's type.",
                "Give me {count} generated cells matching the first one.",
                "Draw {count} pseudo-cells like the first cell we discussed.",
                "Now synthesize {count} cells similar to the first profile.",
                "Generate more like the first: {count} cells, please.",
                "I'd like {count} simulated cells of the first cell's identity.",
            ],
            "low": [
                "Make {count} more like the first one.",
                "Can you create {count} more cells like that first cell?",
                "Give me {count} more of the first kind.",
                "Please make {count} fake cells like the first one.",
                "I want {count} more cells like the first.",
                "Could you make {count} copies of that first type of cell?",
                "Make me {count} new cells like the first one we saw.",
                "Now {count} more like cell number one, please.",
            ],
        },
        answers=[
            "Here are cells like the first one: {output}",
            "Generating cells of that type: {output}",
            "Done, more of the first kind: {output}",
            "These are like the first cell: {output}",
            "Here you go: {output}",
            "Simulated cells: {output}",
            "Coming up: {output}",
            "New cells of the first cell's type: {output}",
        ],
        notes={"high": [""], "low": [""]},
        motivations=(
            "augmenting a rare population",
            "getting more examples of one cell",
            "testing a classifier on synthetic cells",
            "simulating a control population",
            "balancing my classes",
            "teaching what a cell type looks like",
            "exploring variation within a type",
            "building toy data for a tutorial",
            "benchmarking a clustering method",
            "checking what the model learned",
            "designing an in-silico experiment",
            "sharing data without privacy concerns",
            "prototyping a figure",
            "creating negative controls",
            "stress-testing an annotation tool",
        ),
    ),
)
