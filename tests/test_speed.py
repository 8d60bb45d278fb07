"""Fast paths give the answers of the plain ones: prefix-tree label scoring, one shared encoder pass, int8."""

import pytest
import torch
from conftest import CTA_TEMPLATE
from torch import nn

from instructcell.inference import SpeedOptions, apply_speed_options, load_pipeline
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.modeling_instructcell import candidate_prefix_tree
from modeling_instructcell.pipeline_instructcell import TASK

# Shared first words, shared inner prefixes and four different lengths.
ANSWERS = ["T cell", "B cell", "This is a T cell.", "This is a B cell.", "This is a cell"]


def _prompts(tester, n=3):
    return tester.processor(
        text=CTA_TEMPLATE,
        cells=tester.make_counts(n),
        metadata=[{"species": "human", "tissue": t} for t in ("liver", "blood", "pancreas")][:n],
    )


def _teacher_forced(model, processor, prompt, answers):
    """Reference: summed log-probabilities of each answer from forward(), one answer at a time."""
    columns = []
    for answer in answers:
        labels = processor.tokenizer([answer] * prompt["input_ids"].shape[0], return_tensors="pt")[
            "input_ids"
        ]
        logits = model(**prompt, labels=labels).logits
        columns.append(torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1))
    return torch.stack(columns, -1)


def test_prefix_tree_shares_nodes_and_scores_every_token(tester):
    candidates = tester.processor.tokenizer(ANSWERS, padding=True, return_tensors="pt")
    ids = candidates["input_ids"].expand(2, -1, -1)
    lengths = candidates["attention_mask"].sum(-1).expand(2, -1)
    states = torch.arange(ids.numel()).reshape(ids.shape)
    tree = candidate_prefix_tree(ids, lengths, states)
    assert tree.token_node.shape[0] == int(lengths.sum())  # every real token is scored once
    assert tree.node_state_index.shape[0] < int(lengths.sum())  # shared prefixes are projected once
    # Every node's tokens were all predicted after the same prefix: one node per (prompt, prefix).
    for node in range(tree.node_state_index.shape[0]):
        rows = tree.token_candidate[tree.token_node == node]
        assert len(set((rows // len(ANSWERS)).tolist())) == 1


def test_score_labels_equals_teacher_forcing_with_shared_prefixes(model, tester):
    prompt = {k: v for k, v in _prompts(tester).items()}
    candidates = tester.processor.tokenizer(ANSWERS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        scores = model.score_labels(**prompt, candidate_ids=candidates["input_ids"])
        encoded = model.encode_prompts(**prompt)
        reused = model.score_labels(
            attention_mask=prompt["attention_mask"],
            candidate_ids=candidates["input_ids"],
            encoder_outputs=encoded,
            max_rows_per_pass=len(ANSWERS),
        )
        expected = _teacher_forced(model, tester.processor, prompt, ANSWERS)
    torch.testing.assert_close(scores.log_likelihoods, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(reused.log_likelihoods, scores.log_likelihoods, atol=1e-5, rtol=1e-5)


def test_generate_from_encoder_outputs_gives_the_same_ids(model, tester):
    prompt = dict(_prompts(tester))
    with torch.inference_mode():
        plain = model.generate(**prompt, max_new_tokens=6)
        reused = model.generate(
            attention_mask=prompt["attention_mask"],
            encoder_outputs=model.encode_prompts(**prompt),
            max_new_tokens=6,
        )
    torch.testing.assert_close(reused, plain, atol=0, rtol=0)


def test_pipeline_matches_separate_model_calls(model, tester):
    pipe = InstructCellPipeline(model=model, processor=tester.processor, task=TASK)
    counts = tester.make_counts(3)
    metadata = [{"species": "human", "tissue": "liver"}] * 3
    results = pipe(
        CTA_TEMPLATE, cells=counts, metadata=metadata, labels=["T cell", "B cell"], max_new_tokens=5
    )
    prompt = dict(tester.processor(text=CTA_TEMPLATE, cells=counts, metadata=metadata))
    candidates = tester.processor.tokenizer(["T cell", "B cell"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        answers = tester.processor.post_process_generation(model.generate(**prompt, max_new_tokens=5))
        probabilities = model.score_labels(**prompt, candidate_ids=candidates["input_ids"]).probabilities
    assert [r["answer"] for r in results] == [a["text"] for a in answers]
    for result, row in zip(results, probabilities, strict=True):
        assert result["label_probabilities"] == pytest.approx(
            dict(zip(["T cell", "B cell"], row.tolist(), strict=True)), abs=1e-5
        )


def test_int8_quantizes_the_language_model_and_keeps_the_scores_close(model, tester):
    prompt = dict(_prompts(tester))
    candidates = tester.processor.tokenizer(ANSWERS, padding=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        before = model.score_labels(**prompt, candidate_ids=candidates).probabilities
    pipe = load_pipeline(
        InstructCellPipeline(model=model, processor=tester.processor, task=TASK),
        speed=SpeedOptions(int8=True),
    )
    linears = [m for m in pipe.model.language_model.modules() if type(m) is nn.Linear]
    assert not linears  # every linear layer of the language model is now a dynamically quantized one
    assert all(type(m) is nn.Linear for m in pipe.model.cell_encoder.modules() if isinstance(m, nn.Linear))
    with torch.inference_mode():
        after = model.score_labels(**prompt, candidate_ids=candidates).probabilities
        ids = model.generate(**prompt, max_new_tokens=4)
    assert ids.shape[0] == 3
    torch.testing.assert_close(after, before, atol=0.02, rtol=0)  # int8 rounding, not a different model
    assert not torch.equal(after, before)


def test_speed_options_refuse_bad_settings(model):
    with pytest.raises(ValueError, match="threads"):
        SpeedOptions(threads=0)
    with pytest.raises(ValueError, match="eval"):
        apply_speed_options(model.train(), SpeedOptions(int8=True))
    model.eval().language_model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        apply_speed_options(model, SpeedOptions(int8=True))
