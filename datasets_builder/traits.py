"""Questioner traits for template synthesis, sampled as in the InstructCell paper.

A questioner has up to three traits: a personality, a motivation (specific to the task) and a proficiency in
single-cell analysis (high or low). The number of traits is 3, 2, 1 or 0 with probabilities
27 %, 45 %, 18 % and 10 %; which traits are present is then drawn uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
MOTIVATIONS: dict[str, tuple[str, ...]] = {
    "cta": (
        "validating the clusters I found",
        "preparing figures for a manuscript",
        "building a reference atlas",
        "checking a sample for contamination",
        "teaching an undergraduate course",
        "curating a public dataset",
        "looking for rare cell populations",
        "comparing two annotation tools",
        "writing my PhD thesis",
        "auditing labels from a collaborator",
        "studying tissue composition in disease",
        "learning how annotation works",
        "screening cells before sorting them",
        "preparing a grant proposal",
        "benchmarking my own classifier",
    ),
    "dsp": (
        "choosing a treatment strategy",
        "screening for resistant clones",
        "studying drug tolerance mechanisms",
        "planning a combination therapy experiment",
        "prioritising cell lines for a drug screen",
        "investigating relapse after chemotherapy",
        "testing a precision oncology idea",
        "writing a pharmacology report",
        "comparing responders and non-responders",
        "learning about drug resistance",
        "validating a biomarker",
        "designing a follow-up experiment",
        "estimating the fraction of persister cells",
        "reviewing a collaborator's drug data",
        "preparing a lab meeting talk",
    ),
    "cpcg": (
        "augmenting a small dataset",
        "benchmarking an integration method",
        "simulating a control population",
        "testing a clustering pipeline",
        "teaching what expression profiles look like",
        "balancing rare cell classes",
        "stress-testing an annotation model",
        "sharing data without privacy concerns",
        "designing an in-silico experiment",
        "checking what a generative model has learned",
        "creating toy data for a tutorial",
        "filling gaps in an atlas",
        "prototyping a visualisation",
        "exploring cell-type signatures",
        "generating negative controls",
    ),
}


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
        ``"cta"``, ``"dsp"`` or ``"cpcg"`` (selects the motivations).
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
    return Questioner(
        personality=PERSONALITIES[int(rng.integers(len(PERSONALITIES)))] if "personality" in kinds else None,
        motivation=MOTIVATIONS[task][int(rng.integers(len(MOTIVATIONS[task])))]
        if "motivation" in kinds
        else None,
        proficiency=PROFICIENCIES[int(rng.integers(2))] if "proficiency" in kinds else None,
    )
