import anndata
import numpy as np
import pandas as pd
import pytest
from conftest import CTA_TEMPLATE, GENES

from datasets_builder.collator import DataCollatorForInstructCell
from modeling_instructcell import InstructCellProcessor


def test_special_tokens_added_and_ids_exposed(processor):
    ids = processor.special_token_ids
    assert len(set(ids.values())) == 4
    for token in processor.special_tokens:
        assert processor.tokenizer.convert_tokens_to_ids(token) != processor.tokenizer.unk_token_id
        assert processor.tokenizer.tokenize(token) == [token]


def test_cell_slot_expands_to_k_placeholders(processor, tester):
    batch = processor(
        text=CTA_TEMPLATE, cells=tester.make_counts(1), metadata={"species": "human", "tissue": "liver"}
    )
    ids = batch["input_ids"][0].tolist()
    placeholder = processor.special_token_ids["cell_token_index"]
    start = ids.index(processor.special_token_ids["cell_start_token_index"])
    assert ids[start + 1 : start + 5] == [placeholder] * 4
    assert ids[start + 5] == processor.special_token_ids["cell_end_token_index"]
    assert batch["cell_values"].shape == (1, len(GENES))


def test_template_filled_from_metadata_and_obs(processor, tester):
    counts = tester.make_counts(3)
    adata = anndata.AnnData(
        X=counts.astype(np.float32),
        obs=pd.DataFrame(
            {"species": ["human", "mouse", "human"], "tissue": ["liver", "lung", "blood"]},
            index=["a", "b", "c"],
        ),
        var=pd.DataFrame(index=GENES),
    )
    batch = processor(text=CTA_TEMPLATE, cells=adata)
    assert batch["input_ids"].shape[0] == 3  # one template broadcast over the cells
    texts = processor.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert "mouse" in texts[1] and "lung" in texts[1] and "liver" in texts[0]
    overridden = processor(text=CTA_TEMPLATE, cells=adata, metadata={"tissue": "spleen"})
    assert all(
        "spleen" in t for t in processor.batch_decode(overridden["input_ids"], skip_special_tokens=True)
    )


def test_fill_template_joins_choices():
    processor = InstructCellProcessor.__new__(InstructCellProcessor)
    processor.cell_start_token = "<CELL>"
    filled = processor.fill_template("Is it {choices}? {input}", {"choices": ["sensitive", "resistant"]})
    assert filled == "Is it sensitive, resistant? <CELL>"


def test_missing_placeholder_value_raises(processor, tester):
    with pytest.raises(ValueError, match=r"needs values for \['tissue'\]"):
        processor(text=CTA_TEMPLATE, cells=tester.make_counts(1), metadata={"species": "human"})
    with pytest.raises(ValueError, match="empty"):
        processor(text="Cell {} here {input}", cells=tester.make_counts(1))


def test_slot_and_cell_count_must_agree(processor, tester):
    with pytest.raises(ValueError, match="2 cell slots"):
        processor(text=["{input} and {input}"], cells=tester.make_counts(1))
    with pytest.raises(ValueError, match="0 cell slots"):
        processor(text=["no slot", "none here"], cells=tester.make_counts(2))


def test_labels_are_padded_with_ignore_index(processor):
    batch = processor(text=["a", "b"], text_target=["short", "a much longer answer here"])
    labels = batch["labels"]
    assert labels.shape[0] == 2
    assert (labels[0] == -100).any() and not (labels[1] == -100).any()
    with pytest.raises(ValueError, match="one answer per prompt"):
        processor(text=["a", "b"], text_target=["only one"])


def test_bad_counts_raise(processor, tester):
    counts = tester.make_counts(1).astype(float)
    counts[0, 3] = -1
    with pytest.raises(ValueError, match="negative"):
        processor(text="{input}", cells=counts)
    with pytest.raises(ValueError):
        processor(text="{input}", cells=np.log1p(tester.make_counts(1)) + 0.5)


def test_post_process_reports_signal(processor):
    ids = processor.tokenizer(["Here is the cell <SIGNAL>", "This is a T cell."])["input_ids"]
    answers = processor.post_process_generation(ids)
    assert answers[0]["has_signal"] and not answers[1]["has_signal"]
    assert "<SIGNAL>" not in answers[0]["text"] and answers[1]["text"] == "This is a T cell."


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = InstructCellProcessor.from_pretrained(tmp_path)
    assert loaded.num_query_tokens == 4
    assert loaded.feature_extractor.gene_names == GENES
    assert loaded.special_token_ids == processor.special_token_ids
    text = ["Generate a {cell_type} cell."]
    meta = {"cell_type": "B cell"}
    assert (
        loaded(text=text, metadata=meta)["input_ids"].tolist()
        == processor(text=text, metadata=meta)["input_ids"].tolist()
    )


def test_prompt_format_must_hold_prompt(processor):
    with pytest.raises(ValueError, match="prompt"):
        InstructCellProcessor(processor.feature_extractor, processor.tokenizer, prompt_format="User: no slot")


def test_collator_densifies_and_matches_processor(processor, tester):
    counts = tester.make_counts(2)
    rows = []
    for i, task in enumerate(["cta", "cpcg"]):
        nonzero = np.flatnonzero(counts[i])
        cell = {"gene_indices": nonzero.tolist(), "gene_counts": counts[i, nonzero].astype(float).tolist()}
        empty = {"gene_indices": [], "gene_counts": []}
        rows.append(
            {
                "instruction": "What is this? <CELL>" if task == "cta" else "Generate a B cell.",
                "response": "This is a T cell." if task == "cta" else "Here is the cell <SIGNAL>",
                **{f"input_{k}": v for k, v in (cell if task == "cta" else empty).items()},
                **{f"target_{k}": v for k, v in (empty if task == "cta" else cell).items()},
            }
        )
    batch = DataCollatorForInstructCell(processor)(rows)
    np.testing.assert_array_equal(batch["cell_values"].numpy(), counts[:1])
    np.testing.assert_array_equal(batch["target_cell_values"].numpy(), counts[1:])
    assert batch["labels"].shape[0] == 2
