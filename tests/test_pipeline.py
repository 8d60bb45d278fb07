"""The single-cell-instruction pipeline and label scoring, on the tiny preset."""

import copy

import numpy as np
import pytest
import torch
from conftest import CTA_TEMPLATE, DSP_TEMPLATE, GENES, InstructCellModelTester
from synthetic_anndata import make_counts

from instructcell.inference import argmax_agreement
from modeling_instructcell import (
    InstructCellFeatureExtractor,
    InstructCellPipeline,
    InstructCellProcessor,
)
from modeling_instructcell.pipeline_instructcell import TASK

LABELS = ["T cell", "B cell"]


def _adata(n_cells=6, seed=0):
    # 50 genes, 30 of which are in the 40-gene vocabulary (GENE10..GENE39): 75% overlap.
    return make_counts(n_cells=n_cells, n_genes=50, labels=("T cell", "B cell"), seed=seed)


@pytest.fixture
def pipe(tester, model):
    return InstructCellPipeline(model=model, processor=tester.processor, task=TASK)


@pytest.fixture(scope="module")
def overfit(base_tokenizer):
    """A tiny model trained to answer CTA prompts with the bare label (instruct variant)."""
    processor = InstructCellProcessor(
        InstructCellFeatureExtractor(gene_names=GENES), copy.deepcopy(base_tokenizer), num_query_tokens=4
    )
    tester = InstructCellModelTester(processor)
    model = tester.make_model(seed=1).train()
    counts = tester.make_counts(4, seed=5)
    counts[:2, 10:20] += 30  # "T cell" markers
    counts[2:, 20:30] += 30  # "B cell" markers
    answers = ["T cell", "T cell", "B cell", "B cell"]
    batch = processor(
        text=CTA_TEMPLATE, cells=counts, metadata={"species": "human", "tissue": "blood"}, text_target=answers
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and, for this size, no slower
    try:
        for _ in range(400):  # until every answer token is the arg-max (greedy = the answer), ~50-150 steps
            optimizer.zero_grad()
            out = model(**batch)
            answer = batch["labels"] != -100
            if (
                bool((out.logits.argmax(-1)[answer] == batch["labels"][answer]).all())
                and out.loss.item() < 0.1
            ):
                break
            out.loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return InstructCellPipeline(model=model, processor=processor, task=TASK), counts, answers


@pytest.mark.parametrize(
    "answers", [["T cell", "B cell", "monocyte"], ["This is a T cell.", "This is a B cell."]]
)
def test_score_labels_is_teacher_forced_likelihood(model, tester, answers):
    processor = tester.processor
    batch = processor(
        text=CTA_TEMPLATE,
        cells=tester.make_counts(3),
        metadata=[{"species": "human", "tissue": t} for t in ("liver", "blood", "pancreas")],
    )
    prompt = {k: batch[k] for k in ("input_ids", "attention_mask", "cell_values")}
    candidates = processor.tokenizer(answers, padding=True, return_tensors="pt")
    args = (*prompt.values(), candidates["input_ids"], candidates["attention_mask"])
    with torch.inference_mode():
        full = model.score_labels(*args)
        chunked = model.score_labels(*args, max_rows_per_pass=len(answers))
        per_prompt = model.score_labels(*args[:3], candidates["input_ids"].expand(3, -1, -1))
        # Reference: the teacher-forced log-likelihood of each candidate (EOS included) from forward().
        expected = []
        for answer in answers:
            labels = processor.tokenizer([answer] * 3, return_tensors="pt")["input_ids"]
            logits = model(**prompt, labels=labels).logits
            expected.append(
                torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1)
            )
    assert full.probabilities.shape == (3, len(answers))
    torch.testing.assert_close(full.probabilities.sum(-1), torch.ones(3))
    torch.testing.assert_close(full.log_likelihoods, torch.stack(expected, -1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(chunked.log_likelihoods, full.log_likelihoods)
    torch.testing.assert_close(per_prompt.log_likelihoods, full.log_likelihoods)


def test_argmax_matches_overfit_greedy_answer(overfit):
    pipe, counts, answers = overfit
    results = pipe(
        CTA_TEMPLATE,
        cells=counts,
        gene_names=GENES,
        metadata={"species": "human", "tissue": "blood"},
        labels=LABELS,
        max_new_tokens=6,
    )
    assert [r["answer"] for r in results] == answers
    assert [r["label"] for r in results] == answers
    assert [r["argmax_label"] for r in results] == answers
    for r in results:
        assert sum(r["label_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["probability"] == r["label_probabilities"][r["label"]] > 0.5
    assert argmax_agreement(results)["agreement"] == 1.0


def test_answer_naming_a_label_outside_the_label_set(overfit):
    pipe, counts, _ = overfit
    results = pipe(
        CTA_TEMPLATE,
        cells=counts[:2],
        gene_names=GENES,
        metadata={"species": "human", "tissue": "blood"},
        labels=["monocyte", "NK cell"],
        max_new_tokens=6,
    )
    # The model says "T cell", which is not a candidate: unanswered, but the distribution is still defined.
    assert [r["answer"] for r in results] == ["T cell", "T cell"]
    assert all(r["label"] is None and r["probability"] is None for r in results)
    assert all(r["argmax_label"] in ("monocyte", "NK cell") for r in results)
    assert argmax_agreement(results)["answered"] == 0.0


def test_anndata_request_is_batched_and_padding_aware(pipe):
    adata = _adata(5)
    adata.obs["tissue"] = ["blood", "bone marrow of the left femur", "liver", "blood", "spleen"]
    kwargs = dict(cells=adata, labels=LABELS, max_new_tokens=3)
    one_by_one = pipe(CTA_TEMPLATE, batch_size=1, **kwargs)
    batched = pipe(CTA_TEMPLATE, batch_size=4, **kwargs)
    assert len(batched) == 5
    for a, b in zip(one_by_one, batched, strict=True):
        assert set(b) >= {
            "answer",
            "label",
            "probability",
            "label_probabilities",
            "argmax_label",
            "has_signal",
        }
        assert a["answer"] == b["answer"]
        assert a["label_probabilities"] == pytest.approx(b["label_probabilities"], abs=1e-5)


def test_score_only_and_list_of_requests(pipe):
    adata = _adata(3)
    scored = pipe(CTA_TEMPLATE, cells=adata, labels=LABELS, generate=False)
    assert all(r["answer"] is None and r["label"] == r["argmax_label"] for r in scored)
    both = pipe(
        [
            {"instruction": CTA_TEMPLATE, "cells": adata[:2], "labels": LABELS},
            {
                "instruction": DSP_TEMPLATE,
                "cells": adata[2:],
                "metadata": {"drug": "erlotinib", "choices": ["sensitive", "resistant"]},
            },
        ],
        max_new_tokens=2,
    )
    assert [len(r) for r in both] == [2, 1]
    assert set(both[1][0]["label_probabilities"]) == {"sensitive", "resistant"}  # label set from {choices}


def test_label_names_saved_with_the_model(model, tester, tmp_path):
    model.config.label_names = LABELS
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.config.label_names == LABELS
    result = InstructCellPipeline(model=reloaded, processor=tester.processor, task=TASK)(
        CTA_TEMPLATE, cells=_adata(1), generate=False
    )
    assert set(result[0]["label_probabilities"]) == set(LABELS)


def test_auto_answer_template_scores_within_the_answer(overfit):
    pipe, counts, _ = overfit
    results = pipe(
        CTA_TEMPLATE,
        cells=counts,
        gene_names=GENES,
        metadata={"species": "human", "tissue": "blood"},
        labels=LABELS,
        answer_template="auto",
        max_new_tokens=6,
    )
    assert [r["argmax_label"] for r in results] == [r["label"] for r in results]


def test_generation_request_returns_an_anndata(pipe, tester):
    metadata = [
        {"cell_type": "B cell", "species": "human", "tissue": "blood", "sequencing_method": "10x"},
        {"cell_type": "T cell", "species": "mouse", "tissue": "liver", "sequencing_method": "10x"},
    ]
    template = "Generate a {cell_type} cell from {species} {tissue}, sequenced with {sequencing_method}."
    results = pipe(template, metadata=metadata, num_cells=3, force_signal=True, seed=0, max_new_tokens=2)
    assert len(results) == 2
    for result, condition in zip(results, metadata, strict=True):
        cells = result["cells"]
        assert result["has_signal"] and cells.shape == (3, len(GENES))
        assert list(cells.var_names) == GENES
        assert np.issubdtype(cells.X.dtype, np.integer)
        assert (cells.obs["cell_type"] == condition["cell_type"]).all()
        assert (cells.obs["species"] == condition["species"]).all()
    again = pipe(template, metadata=metadata, num_cells=3, force_signal=True, seed=0, max_new_tokens=2)
    assert (again[0]["cells"].X != results[0]["cells"].X).nnz == 0


def test_bad_inputs_raise_clear_errors(pipe):
    adata = _adata(2)
    unknown = adata.copy()
    unknown.var_names = [f"UNKNOWN{i}" for i in range(unknown.n_vars)]
    with pytest.raises(ValueError, match="vocabulary genes"):
        pipe(CTA_TEMPLATE, cells=unknown, labels=LABELS)
    with pytest.raises(ValueError, match="at least two distinct labels"):
        pipe(CTA_TEMPLATE, cells=adata, labels=["T cell"])
    with pytest.raises(ValueError, match="not one string"):
        pipe(CTA_TEMPLATE, cells=adata, labels="T cell")
    with pytest.raises(ValueError, match="only scores a label set"):
        pipe(CTA_TEMPLATE, cells=adata, generate=False)
    with pytest.raises(ValueError, match="Unknown arguments"):
        pipe(CTA_TEMPLATE, cells=adata, colour="blue")
    with pytest.raises(ValueError, match="needs values for"):
        pipe("Is this cell sensitive to {drug}? {input}", cells=adata, labels=LABELS)
