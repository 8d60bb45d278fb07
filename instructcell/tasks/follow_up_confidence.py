"""Follow-up confidence: "how sure are you?" about the last annotation, which may have been wrong."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modeling_instructcell.answer_extraction import extract_label

from .base import TaskGrammar
from .follow_up import earlier_turns
from .multicell import CellGroup, EarlierTurn, MultiCellTask, argmax_labels, label_pools

#: Share of examples whose earlier answer was wrong (the model learns to check an answer, not to repeat it).
WRONG_ANSWER_SHARE = 0.5
#: An answer ``(agrees, label)``: whether the earlier answer holds, and the label the cell has.
Confidence = tuple[bool, str]


class FollowUpConfidence:
    """The last earlier turn annotated the anchor, right or wrong; the answer confirms it or corrects it.

    The answer reads ``"sure, it is B cells"`` or ``"not sure, more likely T cells"``; the example's query is
    the earlier answer being questioned.
    """

    def draw(self, labels: Sequence[str], anchor: int, rng: np.random.Generator) -> CellGroup | None:
        """Draw (half the time) a turn about other cells, then one annotating the anchor right or wrong."""
        others = [label for label in label_pools(labels) if label != labels[anchor]]
        if not others:
            return None
        turns, cells = earlier_turns(labels, rng, [anchor], 1) if rng.random() < 0.5 else ([], [])
        given = labels[anchor]
        if rng.random() < WRONG_ANSWER_SHARE:
            given = others[int(rng.integers(len(others)))]
        turns.append(EarlierTurn("cta", 1, given))
        return CellGroup((*cells, anchor), earlier=tuple(turns), query=given)

    def truth(self, cell_labels: Sequence[str], n_question_cells: int, query: str) -> Confidence:
        """Return whether the earlier answer (``query``) is the last cell's label, and that label."""
        return (query == cell_labels[-1], cell_labels[-1])

    def render(self, answer: Confidence, cell_labels: Sequence[str], first: int = 1) -> str:
        """Write ``"sure, it is B cells"`` / ``"not sure, more likely T cells"``."""
        agrees, label = answer
        return f"sure, it is {label}" if agrees else f"not sure, more likely {label}"

    def parse(
        self, text: str, labels: Sequence[str], n_question_cells: int, first: int = 1
    ) -> Confidence | None:
        """Read ``sure``/``not sure`` and the label; None when either is missing."""
        lowered = (text or "").lower()
        label = extract_label(text, labels)
        if label is None or "sure" not in lowered:
            return None
        return ("not sure" not in lowered, label)

    def from_cell_probabilities(
        self, probabilities: np.ndarray, labels: Sequence[str], n_question_cells: int, query: str
    ) -> Confidence:
        """Annotate the last cell again, on its own, and compare with the earlier answer."""
        label = argmax_labels(probabilities, labels)[-1]
        return (label == query, label)

    def cell_accuracy(self, answer: Confidence | None, truth: Confidence) -> float:
        """Return 1 when the answer names the right label (whatever it judged the earlier answer)."""
        return float(answer is not None and answer[1] == truth[1])


FOLLOW_UP_CONFIDENCE = MultiCellTask(
    name="follow_up_confidence",
    title="follow-up confidence",
    required_placeholders=frozenset([]),
    optional_placeholders=frozenset([]),
    response_placeholders=frozenset([]),
    default_instruction="How sure are you?",
    question=FollowUpConfidence(),
    grammar=TaskGrammar(
        description="follow-up confidence: another person says whether the cell type they just gave for "
        "the last cell is right, and which type it is",
        cores={
            "high": [
                "How sure are you?",
                "How confident are you in that call?",
                "Is that annotation reliable?",
                "Would you stand by that label?",
                "Are you certain about that identity?",
                "Double-check that assignment, please.",
                "Can you verify that last call?",
                "How much should I trust that label?",
                "Re-examine that cell: is the annotation right?",
                "Is that classification correct?",
            ],
            "low": [
                "Are you sure?",
                "Really? How sure are you?",
                "Is that right?",
                "Can you check that again?",
                "Should I believe that?",
                "Are you certain about that one?",
                "Hmm, is that correct?",
                "Could you be wrong about that?",
            ],
        },
        answers=[
            "Having checked again: {output}.",
            "{output}.",
            "Answer: {output}.",
            "On a second look, {output}.",
            "My check: {output}.",
            "After re-examining the cell, {output}.",
            "Honestly, {output}.",
            "Let me see... {output}.",
        ],
        notes={"high": [""], "low": [""]},
        motivations=(
            "deciding whether to trust an annotation",
            "checking a surprising call",
            "preparing to sort cells",
            "writing up results carefully",
            "reviewing an automatic annotation",
            "avoiding a mislabelled figure",
            "teaching critical thinking",
            "comparing with my own guess",
            "checking before I publish",
            "validating a cluster label",
            "catching annotation errors",
            "judging a borderline cell",
            "learning when models fail",
            "auditing a collaborator's labels",
            "planning a validation experiment",
        ),
    ),
)
