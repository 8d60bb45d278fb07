import json

import numpy as np
import pytest

from datasets_builder.template_grammar import CLOSERS, OPENERS, RESPONSE_ACKS, GrammarGenerator
from datasets_builder.template_stats import bank_statistics, statistics_markdown, unigram_ratio
from datasets_builder.template_synthesis import iter_records, synthesize_task, write_bank
from datasets_builder.templates import (
    CELL_TOKEN,
    SIGNAL_TOKEN,
    RougeLIndex,
    Template,
    TemplateBank,
    check_near_duplicates,
    placeholders,
    render,
    rouge_l,
    tokenize,
    validate_instruction,
    validate_response,
)
from datasets_builder.traits import PERSONALITIES, TRAIT_COUNT_PROBABILITIES, sample_questioner


def _lcs(a, b):
    table = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
    return table[-1, -1]


def test_rouge_l_matches_a_reference_lcs():
    a = "Please annotate this {species} cell: {input}."
    b = "Annotate the cell from {species}, {input}, please!"
    ta, tb = tokenize(a), tokenize(b)
    assert rouge_l(a, b) == pytest.approx(2 * _lcs(ta, tb) / (len(ta) + len(tb)))
    assert rouge_l(a, a) == pytest.approx(1.0)
    index = RougeLIndex([a, b, "something else entirely"])
    assert index.pairwise().shape == (3,)


@pytest.mark.parametrize(
    ("text", "task", "message"),
    [
        ("What is this cell?", "cta", "lacks required placeholder"),
        ("Is {input} resistant?", "dsp", "lacks required placeholder"),
        ("Make a {cell_type} from {species}.", "cpcg", "lacks required placeholder"),
        ("What is {input} treated with {drug}?", "cta", "unknown placeholder"),
        ("What is {input}? {input}", "cta", "repeats placeholder"),
        ("What is {input}? " + "word " * 70, "cta", "words"),
        ("What is {input}? {", "cta", "Malformed braces"),
        ("What is {input:>3}?", "cta", "Bad placeholder"),
    ],
)
def test_instruction_validation_rejects_bad_templates(text, task, message):
    with pytest.raises(ValueError, match=message):
        validate_instruction(text, task)


def test_response_validation():
    validate_response("{output}", "cta", "instruct")
    validate_response("Sure, it is {output}.", "cta", "chat")
    validate_response("Here is a {cell_type}: {output}", "cpcg", "chat")
    with pytest.raises(ValueError, match="exactly"):
        validate_response("It is {output}.", "cta", "instruct")
    with pytest.raises(ValueError, match="exactly once"):
        validate_response("No answer here.", "cta", "chat")
    with pytest.raises(ValueError, match="end with"):
        validate_response("{output} is your cell.", "cpcg", "chat")
    with pytest.raises(ValueError, match="unknown placeholder"):
        validate_response("{output} from {input}", "cta", "chat")


def test_near_duplicates_are_rejected():
    texts = ["Please annotate this cell for me: {input}.", "Please annotate this cell for me now: {input}."]
    with pytest.raises(ValueError, match="near-duplicates"):
        check_near_duplicates(texts)
    check_near_duplicates([texts[0], "Which population does {input} belong to, in your opinion?"])


def test_bank_rejects_duplicate_ids_and_selects_deterministically():
    record = {"id": "cta-1", "task": "cta", "instruction": "What is {input}?", "response": "It is {output}."}
    with pytest.raises(ValueError, match="appears twice"):
        TemplateBank.from_records([record, record])
    bank = TemplateBank.from_records([record])
    split = bank.templates[0].split
    chosen = bank.choose("cta", "chat", split, "any-key")
    assert (
        chosen.response == "It is {output}."
        and bank.choose("cta", "instruct", split, "k").response == "{output}"
    )
    with pytest.raises(ValueError, match="no cpcg/chat template"):
        bank.choose("cpcg", "chat", split, "k")


def test_render_fills_every_placeholder():
    template = Template(
        "t", "cta", "chat", "A {species} cell from {tissue}: {input}. Options: {choices}.", "It is {output}."
    )
    instruction, response = render(
        template,
        {"species": "human", "tissue": "blood", "sequencing_method": "10x"},
        "B cell",
        ["B cell", "T cell"],
    )
    assert instruction == f"A human cell from blood: {CELL_TOKEN}. Options: B cell, T cell."
    assert response == "It is B cell."
    cpcg = Template(
        "g",
        "cpcg",
        "chat",
        "Make a {cell_type} ({species}, {tissue}, {sequencing_method}).",
        "Here: {output}",
    )
    _, response = render(
        cpcg, {"species": "h", "tissue": "t", "sequencing_method": "m", "cell_type": "NK"}, SIGNAL_TOKEN
    )
    assert response.endswith(SIGNAL_TOKEN)


def test_trait_count_probabilities():
    assert sum(TRAIT_COUNT_PROBABILITIES.values()) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_questioner("cta", rng).n_traits for _ in range(4000)], minlength=4) / 4000
    for n, p in TRAIT_COUNT_PROBABILITIES.items():
        assert abs(counts[n] - p) < 0.03
    assert set(PERSONALITIES) <= set(OPENERS) & set(CLOSERS) & set(RESPONSE_ACKS)


@pytest.mark.parametrize("task", ["cta", "dsp", "cpcg"])
def test_offline_synthesis_yields_valid_dissimilar_templates(task, tmp_path):
    records = synthesize_task(task, 150, GrammarGenerator(), seed=1, progress=False)
    assert len(records) == 150
    assert records == synthesize_task(task, 150, GrammarGenerator(), seed=1, progress=False)
    check_near_duplicates([r["instruction"] for r in records])
    bank = TemplateBank.from_records(records)
    assert len(bank.templates) == 300
    if task != "cpcg":
        with_choices = sum("choices" in placeholders(r["instruction"]) for r in records)
        assert 0.35 < with_choices / len(records) < 0.65
    write_bank(records, tmp_path)
    assert list(iter_records(tmp_path)) == json.loads(json.dumps(records))
    stats = bank_statistics(records)[task]
    assert stats["count"] == {"instruct": 150, "chat": 150} and stats["max_pairwise_rouge_l"] < 0.75
    assert task in statistics_markdown({task: stats})


class _FlakyGenerator:
    """Always proposes the same instruction, so every later one is a near-duplicate of the first."""

    def __init__(self):
        self.rewrites = 0

    def instruction(self, task, questioner, with_choices, rng):
        return "Tell me the type of {input}."

    def rewrite(self, text, task, questioner, rng):
        self.rewrites += 1
        return text

    def response(self, task, instruction, questioner, rng):
        return "It is {output}."


def test_synthesis_rewrites_at_most_three_times_then_drops():
    generator = _FlakyGenerator()
    records = synthesize_task("cta", 5, generator, max_attempts=4, progress=False)
    assert len(records) == 1 and generator.rewrites == 3 * 3


def test_committed_bank_is_valid_and_large():
    records = list(iter_records())
    bank = TemplateBank.from_records(records)
    for task in ("cta", "dsp", "cpcg"):
        for variant in ("instruct", "chat"):
            assert len(bank.select(task, variant, "train")) >= 2000
            assert len(bank.select(task, variant, "test")) >= 200
    train_ids = {t.id for t in bank.select("cta", "chat", "train")}
    assert not train_ids & {t.id for t in bank.select("cta", "chat", "test")}
    assert unigram_ratio(["a b a"]) == pytest.approx(2 / 3)
