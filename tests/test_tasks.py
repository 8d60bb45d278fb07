"""The task registry: every task is complete and consistent, and its template bank is valid for it."""

import numpy as np
import pytest

from datasets_builder.template_grammar import GrammarGenerator
from datasets_builder.templates import TemplateBank, validate_template
from datasets_builder.traits import sample_questioner
from instructcell.tasks import (
    METRIC_FAMILIES,
    TASKS,
    Task,
    get_task,
    is_multicell,
    parse_task_list,
    task_names,
    tasks_of_family,
)

MULTICELL_TASKS = (
    "group_composition",
    "odd_one_out",
    "cell_match",
    "joint_annotation",
    "follow_up_annotation",
    "follow_up_confidence",
    "follow_up_generation",
)


def test_lookup_and_lists():
    # new tasks go last: the registry order seeds template synthesis
    assert task_names() == ("cta", "dsp", "cpcg", "prp", *MULTICELL_TASKS)
    assert get_task("dsp").default_labels == ("sensitive", "resistant")
    with pytest.raises(ValueError, match="Unknown task 'xyz': choose one of cta, dsp, cpcg, prp, group_"):
        get_task("xyz")
    assert parse_task_list("cpcg, cta") == ("cta", "cpcg")
    assert parse_task_list(None) == task_names()
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        parse_task_list("cta,nope")
    assert tasks_of_family("classification") == ("cta", "dsp")
    assert tasks_of_family("generation") == ("cpcg",)
    assert tasks_of_family("perturbation") == ("prp",)
    assert tasks_of_family("multicell") == MULTICELL_TASKS
    assert [name for name, task in TASKS.items() if task.pairs_cells] == ["prp"]
    assert METRIC_FAMILIES == ("classification", "generation", "perturbation", "multicell")


@pytest.mark.parametrize("name", task_names())
def test_each_task_has_a_valid_bank_and_grammar(name):
    task = TASKS[name]
    assert task.name == name and task.title and task.label_key
    assert task.input_cell or task.output_cell or is_multicell(task)  # a task is about cells
    assert task.input_cell or task.default_instruction is None or "{input}" not in task.default_instruction
    if task.default_instruction:  # inference's default instruction has the task's required placeholders
        assert all(
            f"{{{p}}}" in task.default_instruction for p in task.required_placeholders if p != "choices"
        )
    bank = TemplateBank.load()
    for variant in ("instruct", "chat"):
        templates = bank.select(name, variant, "train")
        assert templates, f"no {variant} training templates for {name}"
        for template in templates[:50]:
            validate_template(template)
    rng = np.random.default_rng(0)
    grammar = GrammarGenerator()
    for _ in range(20):
        questioner = sample_questioner(name, rng)
        instruction = grammar.instruction(name, questioner, task.offers_choices and rng.random() < 0.5, rng)
        assert set(task.required_placeholders) <= {
            p for p in task.required_placeholders | task.optional_placeholders if f"{{{p}}}" in instruction
        }
        assert "{output}" in grammar.response(name, instruction, questioner, rng)


def test_inconsistent_definitions_are_refused():
    fields = {**TASKS["cta"].__dict__}
    with pytest.raises(ValueError, match="metric_family"):
        Task(**{**fields, "metric_family": "vibes"})
    with pytest.raises(ValueError, match="input_cell"):
        Task(**{**fields, "input_cell": False})
    with pytest.raises(ValueError, match="label placeholder"):
        Task(**{**fields, "label_placeholder": "cell_type"})
