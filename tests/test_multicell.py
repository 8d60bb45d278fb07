"""Multi-cell and follow-up tasks: their questions, the builder's rows of several cells, batching, scoring."""

import re

import numpy as np
import pytest
import torch
from conftest import GENES
from multicell_rows import LABELS, multicell_rows, synthetic_cells

from datasets_builder import TemplateBank
from datasets_builder.collator import DataCollatorForInstructCell
from datasets_builder.splits import split_of
from instructcell.evaluation.multicell_evaluator import answers_from_cells, multicell_entry
from instructcell.evaluation.render import render_report
from instructcell.tasks import get_task, tasks_of_family
from instructcell.tasks.multicell import (
    MAX_CELLS_PER_PROMPT,
    cell_list,
    conversation,
    first_question_cell,
    parse_position,
    question_part,
    shift_cell_numbers,
)

MULTICELL = tasks_of_family("multicell")


@pytest.fixture(scope="module")
def bank():
    return TemplateBank.load()


@pytest.fixture(scope="module")
def cells():
    return synthetic_cells(120, len(GENES))


def _one_hot(cell_labels, labels=LABELS):
    return np.eye(len(labels))[[list(labels).index(label) for label in cell_labels]]


@pytest.mark.parametrize("name", MULTICELL)
def test_each_question_draws_valid_groups_and_reads_its_own_answers(name):
    question = get_task(name).question
    labels = [LABELS[i % 3] for i in range(60)]
    rng = np.random.default_rng(0)
    for anchor in range(30):
        group = question.draw(labels, anchor, rng)
        assert anchor in group.cells and len(set(group.cells)) == len(group.cells)
        assert 1 <= len(group.cells) <= MAX_CELLS_PER_PROMPT and len(group.earlier) <= 2
        assert group.n_question_cells == len(group.cells) - sum(t.n_cells for t in group.earlier)
        cell_labels = [labels[i] for i in group.cells]
        truth = question.truth(cell_labels, group.n_question_cells, group.query)
        first = first_question_cell(len(cell_labels), group.n_question_cells)
        text = question.render(truth, question_part(cell_labels, group.n_question_cells), first)
        assert question.parse(text, LABELS, group.n_question_cells, first) == truth
        probabilities = _one_hot(cell_labels)  # per-cell calls that are all right answer right
        assert question.from_cell_probabilities(
            probabilities, LABELS, group.n_question_cells, group.query
        ) == (truth)
        assert question.cell_accuracy(truth, truth) == 1.0 and question.cell_accuracy(None, truth) == 0.0


def test_answers_are_read_strictly():
    composition = get_task("group_composition").question
    assert composition.parse("B cells: 2; T cell: 1", LABELS, 3) == (("B cell", 2), ("T cell", 1))
    assert composition.parse("B cell: 2; B cell: 1", LABELS, 3) is None  # a label twice
    assert composition.parse("B cell: two", LABELS, 3) is None
    walked = composition.render((("B cell", 2), ("T cell", 1)), ["B cell", "T cell", "B cell"])
    assert walked == "1: B cell; 2: T cell; 3: B cell; in total B cell: 2; T cell: 1"
    # the counts are read after "in total", whatever the walk-through says
    assert composition.parse(f"I count {walked}.", LABELS, 3) == (("B cell", 2), ("T cell", 1))
    assert composition.parse("1: B cell; 2: B cell; in total B cell: 1", LABELS, 2) == (("B cell", 1),)
    with pytest.raises(ValueError, match="do not make the composition"):
        composition.render((("B cell", 1),), ["B cell", "T cell"])
    joint = get_task("joint_annotation").question
    assert joint.parse("1: T cell; 2: B cell", LABELS, 2) == ("T cell", "B cell")
    assert joint.parse("1: T cell", LABELS, 2) is None  # a cell left out
    assert parse_position("It is cell 3.", 4) == 3 and parse_position("cell 5", 4) is None
    assert parse_position("cell 1 or cell 2", 4) is None
    odd = get_task("odd_one_out").question
    walked = odd.render(2, ["T cell", "B cell", "T cell"])
    assert walked == "1: T cell; 2: B cell; 3: T cell; so cell 2"
    assert odd.parse(f"Answer: {walked}.", LABELS, 3) == 2
    assert odd.parse("1: T cell; 2: B cell; so cell 3 or cell 1", LABELS, 3) is None
    # after earlier turns that showed three cells, the question's cells are numbered 4-6
    walked = odd.render(2, ["T cell", "B cell", "T cell"], first=4)
    assert walked == "4: T cell; 5: B cell; 6: T cell; so cell 5"
    assert odd.parse(walked, LABELS, 3, first=4) == 2
    assert odd.parse("so cell 2", LABELS, 3, first=4) is None  # an earlier turn's cell
    assert joint.parse("4: T cell; 5: B cell", LABELS, 2, first=4) == ("T cell", "B cell")
    assert joint.parse("1: T cell; 2: B cell", LABELS, 2, first=4) is None
    assert shift_cell_numbers(walked, -3) == "1: T cell; 2: B cell; 3: T cell; so cell 2"
    counted = composition.render((("B cell", 2),), ["B cell", "B cell"], first=3)
    assert shift_cell_numbers(counted, -2) == "1: B cell; 2: B cell; in total B cell: 2"  # counts stay
    confidence = get_task("follow_up_confidence").question
    assert confidence.parse("not sure, more likely NK cells", LABELS, 0) == (False, "NK cell")
    assert confidence.parse("sure, it is T cell", LABELS, 0) == (True, "T cell")
    with pytest.raises(ValueError, match="1 to 16 cells"):
        cell_list(17, "<CELL>")


def test_per_cell_answers_follow_the_probabilities_not_the_truth():
    odd = get_task("odd_one_out").question
    # cells 1-3 look like T cells, cell 2 least so: the odd one out by probabilities is cell 2
    probabilities = np.array([[0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.0, 0.1, 0.9]])
    assert odd.from_cell_probabilities(probabilities, LABELS, 3, "") == 2
    joint = get_task("joint_annotation").question
    both_b = np.array([[0.9, 0.0, 0.1], [0.6, 0.0, 0.4]])  # independent calls may repeat a label
    assert joint.from_cell_probabilities(both_b, LABELS, 2, "B cell; T cell") == ("B cell", "B cell")
    follow_up = get_task("follow_up_annotation").question
    assert follow_up.from_cell_probabilities(_one_hot(["T cell", "B cell"]), LABELS, 1, "") == "B cell"


@pytest.mark.parametrize("name", MULTICELL)
def test_rows_show_every_cell_of_their_split_once_per_slot(name, cells, bank):
    task = get_task(name)
    rows = multicell_rows(name, "train", cells, bank)
    assert rows
    for row in rows:
        assert row["instruction"].count("<CELL>") == len(row["cell_ids"]) == len(row["cells_gene_indices"])
        assert all(split_of("toy", cell) == "train" for cell in row["cell_ids"])
        assert row["instruction"].count("User: ") == row["n_earlier_turns"]
        truth = task.question.truth(row["cell_labels"], row["n_question_cells"], row["query"])
        shown = question_part(row["cell_labels"], row["n_question_cells"])
        first = first_question_cell(len(row["cell_labels"]), row["n_question_cells"])
        assert row["label"] == task.question.render(truth, shown, first)
        # a number written before a cell slot is that slot's place in the whole conversation
        slots = re.finditer(r"(?:cell (\d+): )?<CELL>", row["instruction"])
        for place, slot in enumerate(slots, 1):
            assert slot.group(1) is None or int(slot.group(1)) == place
        assert row["response"] == row["label"] + (" <SIGNAL>" if task.output_cell else "")
        assert len(row["target_gene_indices"]) == (
            len(row["cells_gene_indices"][0]) if task.output_cell else 0
        )
        assert len(row["input_gene_indices"]) == 0
    chat = multicell_rows(name, "train", cells, bank, variant="chat")
    assert [r["cell_ids"] for r in chat] == [r["cell_ids"] for r in rows]  # the same cells in both variants
    again = multicell_rows(name, "train", cells, bank)  # deterministic
    assert [(r["instruction"], r["response"], r["cell_ids"]) for r in again] == [
        (r["instruction"], r["response"], r["cell_ids"]) for r in rows
    ]


def test_held_out_cells_all_anchor_a_group(cells, bank):
    test_cells = [cell for cell in cells if split_of("toy", cell.obs_name) == "test"]
    rows = multicell_rows("cell_match", "test", cells, bank)
    assert sorted(row["cell_id"] for row in rows) == sorted(cell.obs_name for cell in test_cells)
    templates = {t.id: t.split for t in bank.templates}
    assert {templates[row["template_id"]] for row in rows} == {"test"}


def test_collator_puts_every_cell_in_slot_order(processor, cells, bank):
    rows = multicell_rows("group_composition", "train", cells, bank)[:3]
    single = {
        **rows[0],
        **{key: [] for key in ("cell_ids", "cell_labels", "cells_gene_indices", "cells_gene_counts")},
        "instruction": "What is this cell? <CELL>",
        "input_gene_indices": cells[0].gene_indices,
        "input_gene_counts": cells[0].gene_counts,
        "label": cells[0].label,
    }
    batch = DataCollatorForInstructCell(processor, with_cell_captions=True)([rows[0], single, rows[1]])
    n_cells = len(rows[0]["cell_ids"]) + 1 + len(rows[1]["cell_ids"])
    assert batch["cell_values"].shape == (n_cells, len(GENES))
    first = rows[0]["cells_gene_indices"][0]
    assert torch.equal(batch["cell_values"][0, first], torch.as_tensor(rows[0]["cells_gene_counts"][0]))
    assert torch.equal(
        batch["cell_values"][len(rows[0]["cell_ids"]), cells[0].gene_indices],
        torch.as_tensor(cells[0].gene_counts),
    )
    cell_token = processor.special_token_ids["cell_token_index"]
    assert int((batch["input_ids"] == cell_token).sum()) == n_cells * processor.num_query_tokens
    assert batch["cell_caption_ids"].shape[0] == n_cells
    with pytest.raises(ValueError, match="cut: .* cell placeholder tokens are gone"):
        DataCollatorForInstructCell(processor, max_length=40)([rows[0]])


def test_one_instruction_with_several_slots_is_not_broadcast(processor):
    counts = np.random.default_rng(0).poisson(2.0, size=(3, len(GENES))) + 1
    several = processor(text=f"Which differs? {cell_list(3, '<CELL>')}", cells=counts)
    assert several["input_ids"].shape[0] == 1 and several["cell_values"].shape[0] == 3
    broadcast = processor(text="What is this cell? {input}", cells=counts)
    assert broadcast["input_ids"].shape[0] == 3


def test_conversation_format():
    text = conversation([("What is this cell? <CELL>", "B cell")], "And this one? <CELL>")
    assert text == "User: What is this cell? <CELL>\nAssistant: B cell\nAnd this one? <CELL>"


def test_entry_scores_whole_answers_partial_credit_and_sizes(cells, bank):
    rows = multicell_rows("group_composition", "train", cells, bank)[:6]
    question = get_task("group_composition").question
    truths = [question.truth(r["cell_labels"], r["n_question_cells"], r["query"]) for r in rows]
    wrong = [tuple((label, count + 1) for label, count in truth) for truth in truths]
    probabilities = {cell.obs_name: _one_hot([cell.label])[0] for cell in cells}
    answers = {
        "model": truths[:3] + [None] * 3,
        "cells": answers_from_cells(question, rows, probabilities),
        "wrong": wrong,
    }
    entry = multicell_entry(question, rows, answers, {"model": {"seconds": 1.0}}, n_train=10)
    methods = entry["methods"]
    assert methods["model"]["accuracy"] == 0.5 and methods["model"]["answered_rate"] == 0.5
    assert methods["cells"]["accuracy"] == 1.0 and methods["wrong"]["accuracy"] == 0.0
    assert methods["wrong"]["cell_accuracy"] == 1.0  # one too many of each: every cell is still counted
    assert methods["model"]["seconds"] == 1.0
    groups = entry["by_size"]["groups"]
    assert entry["by_size"]["variable"] == "cells"
    assert sum(g["n"] for g in groups.values()) == 6
    turns = entry["by_turns"]  # a group question, scored apart by the earlier turns it came after
    assert set(turns) == {str(r["n_earlier_turns"]) for r in rows}
    for key, group in turns.items():
        chosen = [i for i, r in enumerate(rows) if str(r["n_earlier_turns"]) == key]
        assert group["n"] == len(chosen)
        assert group["methods"]["model"] == np.mean([answers["model"][i] is not None for i in chosen])
    metrics = {"run": {}, "scores": {"group_composition": {"toy": entry}}}
    report = render_report(metrics)
    assert "| cells | n | model | cells | wrong |" in report and "cells right" in report
    assert "| asked after earlier turns | n | model | cells | wrong |" in report
