"""What a task is: the fields every part of the package reads instead of branching on task names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

METRIC_FAMILIES: tuple[str, ...] = ("classification", "generation", "perturbation", "multicell")


@dataclass(frozen=True)
class TaskGrammar:
    """The task's phrases for the offline template grammar (``datasets_builder.template_grammar``).

    Parameters
    ----------
    description : str
        ``"<task title>: <who does what>"``, with the task's placeholders; the template-synthesis prompts
        quote it.
    cores : mapping of str to list of str
        Instruction cores per questioner proficiency (``"high"``, ``"low"``).
    answers : list of str
        Answer sentences of chat responses, each with ``{output}``.
    notes : mapping of str to list of str
        Optional follow-up sentences of chat responses per proficiency (``[""]`` for none).
    motivations : tuple of str
        Why a questioner asks (one of the questioner traits).
    """

    description: str
    cores: Mapping[str, Sequence[str]]
    answers: Sequence[str]
    notes: Mapping[str, Sequence[str]]
    motivations: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    """One instruction task: what it reads, what it answers, how the answer is scored.

    Parameters
    ----------
    name : str
        Short id used in data rows, template ids, file names and command-line flags (``"cta"``).
    title : str
        Human-readable name (``"cell type annotation"``).
    input_cell : bool
        The instruction carries one cell (``{input}``): the example's cell is the *input* cell.
    output_cell : bool
        The answer is ``<SIGNAL>``: the model generates a cell, the example's cell is the *target* cell.
        A task that also reads a cell pairs cells (:attr:`pairs_cells`): its input is another cell, e.g. a
        control cell whose perturbed counterpart is the target.
    label_key : str
        Default ``obs`` column holding each cell's label.
    label_placeholder : str or None
        Instruction placeholder that the label fills (``"cell_type"`` when the label is the request);
        None when the label is the answer.
    required_placeholders, optional_placeholders : frozenset of str
        Placeholders every instruction template must / may contain (``input``, ``species``, ``choices``...).
    response_placeholders : frozenset of str
        Metadata a chat response may echo (besides ``{output}``).
    metadata_keys : tuple of str
        Metadata each example carries (``species``, ``tissue``, ``sequencing_method``, ``drug``).
    metric_family : {"classification", "generation", "perturbation", "multicell"}
        How test answers are scored (:mod:`instructcell.evaluation` has one evaluator per family).
    baselines : tuple of str
        Baselines the evaluation runs beside the model, of the same metric family (keys of
        :data:`instructcell.evaluation.baselines.BASELINES`).
    drop_rare_labels : bool
        Preprocessing drops labels with too few cells (off where every label matters, e.g. drug response).
    default_instruction : str or None
        The instruction inference uses when the user gives none.
    default_labels : tuple of str or None
        The label set when a task has a fixed one (drug response: sensitive / resistant).
    grammar : TaskGrammar
        Phrases for writing the task's template bank.
    """

    name: str
    title: str
    input_cell: bool
    output_cell: bool
    label_key: str
    label_placeholder: str | None
    required_placeholders: frozenset[str]
    optional_placeholders: frozenset[str]
    response_placeholders: frozenset[str]
    metadata_keys: tuple[str, ...]
    metric_family: str
    baselines: tuple[str, ...]
    drop_rare_labels: bool
    default_instruction: str | None
    default_labels: tuple[str, ...] | None
    grammar: TaskGrammar

    def __post_init__(self) -> None:
        if self.metric_family not in METRIC_FAMILIES:
            raise ValueError(f"Task {self.name!r}: metric_family must be one of {METRIC_FAMILIES}.")
        if self.input_cell != ("input" in self.required_placeholders):
            raise ValueError(f"Task {self.name!r}: input_cell must match an '{{input}}' placeholder.")
        if self.label_placeholder is not None and self.label_placeholder not in self.required_placeholders:
            raise ValueError(f"Task {self.name!r}: the label placeholder must be a required placeholder.")

    @property
    def offers_choices(self) -> bool:
        """Whether instructions may list the label options (``{choices}``)."""
        return "choices" in self.optional_placeholders

    @property
    def pairs_cells(self) -> bool:
        """Whether an example reads one cell and generates another (perturbation response)."""
        return self.input_cell and self.output_cell

    @property
    def answer_is_label(self) -> bool:
        """Whether the answer names a label (parsed with ``extract_label``) rather than generating a cell."""
        return not self.output_cell
