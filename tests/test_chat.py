"""``instructcell chat``: every turn goes to the model with its earlier turns and the cells they show."""

import io

import numpy as np
import pytest
from synthetic_anndata import make_counts

from instructcell import cli
from instructcell.cli.chat import ChatSession, cell_references
from instructcell.hub import save_for_hub
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.pipeline_instructcell import TASK


@pytest.fixture
def adata():
    return make_counts(n_cells=20, n_genes=50, labels=("T cell", "B cell"))


@pytest.fixture
def session(tester, model, adata):
    pipe = InstructCellPipeline(model=model, processor=tester.processor, task=TASK)
    return ChatSession(pipe, adata, max_new_tokens=4)


@pytest.fixture
def calls(session, monkeypatch):
    """Record the inputs of every model call the session makes."""
    seen = []
    original = session.model.generate_cells

    def record(**kwargs):
        seen.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(session.model, "generate_cells", record)
    return seen


def test_cell_references():
    assert cell_references("what are cells 3-5 and cell 9?", 20) == [3, 4, 5, 9]
    assert cell_references("which of cells 1, 4 and 7 is the B cell?", 20) == [1, 4, 7]
    assert cell_references("cells 2 to 3", 20) == [2, 3]
    assert cell_references("how sure are you? Generate 20 more like the first one.", 20) == []
    with pytest.raises(ValueError, match="outside the file's rows 0-19"):
        cell_references("what is cell 20?", 20)


def test_references_become_cell_slots_numbered_as_the_model_reads_them(session):
    question = session._question("Which of cells 1-2 and cell 5 is the B cell?")
    assert question == "Which of cell 1: <CELL>, cell 2: <CELL> and cell 3: <CELL> is the B cell?"
    assert session._question("What is cell 7 {really}?") == "What is this cell <CELL> {{really}}?"


def test_every_turn_goes_to_the_model_with_earlier_turns_and_their_cells(session, calls, tester, adata):
    session.respond("What is cell 2?")
    session.respond("And cell 3 {too}?")  # braces are text, not placeholders
    session.respond("How sure are you?")
    first, second, third = calls
    tokenizer = tester.processor.tokenizer
    prompt = tokenizer.decode(second["input_ids"][0], skip_special_tokens=False)
    assert "User: What is this cell<CELL>" in prompt and "Assistant:" in prompt
    assert "And this cell<CELL>" in prompt and "{too}?" in prompt
    expected = tester.processor.feature_extractor(adata[[2, 3]], return_tensors="np")["cell_values"]
    np.testing.assert_array_equal(second["cell_values"].numpy(), expected)
    assert first["cell_values"].shape[0] == 1 and third["cell_values"].shape[0] == 2  # no new cell
    assert [turn.rows for turn in session.turns] == [[2], [3], []]
    assert session.turns[0].answer in tokenizer.decode(third["input_ids"][0])


def test_old_turns_leave_the_prompt_first_and_a_too_long_question_is_refused(session, calls):
    session.respond("What is cell 2?")
    session.respond("What is cell 3?")
    session.history_turns = 1
    session.respond("What is cell 4?")
    assert calls[-1]["cell_values"].shape[0] == 2  # cell 2's turn left the prompt
    prompt_length = calls[-1]["input_ids"].shape[-1]
    session.max_tokens = prompt_length - 1  # the one earlier turn no longer fits
    session.respond("What is cell 5?")
    assert calls[-1]["cell_values"].shape[0] == 1
    session.max_tokens = 8
    reply = session.respond("What is cell 6?")
    assert reply.startswith("Sorry, I could not do that: the question is ")
    assert "this model reads at most 8 tokens" in reply
    assert len(calls) == 4 and len(session.turns) == 4  # nothing was asked, nothing was added


def test_cells_are_numbered_through_the_conversation_and_again_when_old_turns_leave(session, calls):
    session.respond("Which of cells 1-2 is the B cell?")
    session.respond("Which of cells 3-5 is the B cell?")
    assert [turn.first for turn in session.turns] == [1, 3]  # the second turn's cells follow the first's
    assert session._question("Which of cells 3-5 is it?", first=3) == (
        "Which of cell 3: <CELL>, cell 4: <CELL>, cell 5: <CELL> is it?"
    )
    session.turns[1].answer = "3: T cell; 4: B cell; 5: T cell; so cell 4"
    # without the oldest turn, the kept one's cells are the prompt's first: its text and answer follow
    assert session._history(session.turns[1:]) == [
        (
            "Which of cell 1: <CELL>, cell 2: <CELL>, cell 3: <CELL> is the B cell?",
            "1: T cell; 2: B cell; 3: T cell; so cell 2",
        )
    ]
    assert session._history(session.turns)[1][1] == session.turns[1].answer  # nothing dropped, as asked


def test_many_cells_are_asked_one_by_one(session, calls):
    reply = session.respond("What are cells 0-17?")
    assert reply.startswith("More than 16 cells: I asked about each of the 18 cells on its own. Answers:")
    assert (
        sum(int(part.split(" x ")[0]) for part in reply.split("Answers: ")[1].rstrip(".").split(", ")) == 18
    )
    assert not calls and not session.turns


def test_cli_chat(tester, model, adata, tmp_path):
    model_dir = save_for_hub(model, tester.processor, tmp_path / "model")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    lines = [
        "What cell types are in cells 0-3, and how many of each?",
        "which genes drive that call?",
        f"save generated to {tmp_path / 'out.h5ad'}",
        "what is cell 99?",
        "quit",
    ]
    out = io.StringIO()
    code = cli.main(
        ["chat", str(model_dir), str(tmp_path / "cells.h5ad"), "--labels", "T cell,B cell"],
        stdin=io.StringIO("\n".join(lines) + "\n"),
        stdout=out,
    )
    text = out.getvalue()
    assert code == 0 and text.count("instructcell> ") == 4
    assert "Top genes behind" in text and "Nothing generated yet" in text
    assert "outside the file's rows 0-19" in text
    assert not (tmp_path / "out.h5ad").exists()
