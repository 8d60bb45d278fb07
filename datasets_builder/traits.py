"""Questioner traits for template synthesis, sampled as in the InstructCell paper.

A questioner has up to three traits: a personality, a motivation (specific to the task) and a proficiency in
single-cell analysis (high or low). Motivations are the task's (``Task.grammar.motivations``). The number of
traits is 3, 2, 1 or 0 with probabilities 27 %, 45 %, 18 % and 10 %; which traits are present is then drawn
uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from instructcell.tasks import get_task

TRAIT_KINDS: tuple[str, str, str] = ("personality", "motivation", "proficiency")
TRAIT_COUNT_PROBABILITIES: dict[int, float] = {3: 0.27, 2: 0.45, 1: 0.18, 0: 0.10}
PERSONALITIES: tuple[str, ...] = (
    "polite",
    "impatient",
    "curious",
    "skeptical",
    "anxious",
    "enthusiastic",
    "formal",
    "humorous",
    "casual",
    "meticulous",
)
PROFICIENCIES: tuple[str, str] = ("high", "low")


@dataclass(frozen=True)
class Questioner:
    """The person asking; ``None`` means the trait is not specified."""

    personality: str | None = None
    motivation: str | None = None
    proficiency: str | None = None

    @property
    def n_traits(self) -> int:
        """How many traits are specified."""
        return sum(getattr(self, kind) is not None for kind in TRAIT_KINDS)

    def describe(self) -> str:
        """Traits as prompt text for a language model (empty if none)."""
        lines = []
        if self.personality:
            lines.append(f"Personality: {self.personality}")
        if self.motivation:
            lines.append(f"Motivation: {self.motivation}")
        if self.proficiency:
            lines.append(f"Level of proficiency in single-cell analysis: {self.proficiency}")
        return "\n".join(lines)


def sample_questioner(task: str, rng: np.random.Generator) -> Questioner:
    """Draw a questioner for ``task``: 3/2/1/0 traits with probabilities 27/45/18/10 %.

    Parameters
    ----------
    task
        A task name of :mod:`instructcell.tasks` (its grammar lists the motivations).
    rng
        Random generator.

    Returns
    -------
    Questioner
        The sampled questioner.
    """
    counts = list(TRAIT_COUNT_PROBABILITIES)
    n_traits = counts[int(rng.choice(len(counts), p=list(TRAIT_COUNT_PROBABILITIES.values())))]
    kinds = {TRAIT_KINDS[i] for i in rng.choice(len(TRAIT_KINDS), size=n_traits, replace=False)}
    motivations = get_task(task).grammar.motivations
    return Questioner(
        personality=PERSONALITIES[int(rng.integers(len(PERSONALITIES)))] if "personality" in kinds else None,
        motivation=motivations[int(rng.integers(len(motivations)))] if "motivation" in kinds else None,
        proficiency=PROFICIENCIES[int(rng.integers(2))] if "proficiency" in kinds else None,
    )
