from collections import Counter

import numpy as np
import pytest
from synthetic_anndata import make_counts

from datasets_builder import (
    CELL_TOKEN,
    SIGNAL_TOKEN,
    AnnDataSource,
    InstructCellDatasetBuilder,
    TemplateBank,
    densify,
    read_gene_vocab,
    split_of,
    write_gene_vocab,
)

RECORDS = [
    {"id": f"{task}-{i}", "task": task, "instruction": instruction.format(i=i), "response": response.format()}
    for task, instruction, response in [
        (
            "cta",
            "Variant {i}: which cell type is {{input}} from {{species}}? Options: {{choices}}.",
            "It is {{output}}.",
        ),
        ("dsp", "Variant {i}: is {{input}} sensitive to {{drug}}?", "The cell is {{output}} to {{drug}}."),
        (
            "cpcg",
            "Variant {i}: make a {{cell_type}} ({{species}}, {{tissue}}, {{sequencing_method}}).",
            "Here: {{output}}",
        ),
    ]
    for i in range(40)
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cta = make_counts(n_cells=150, prefix="a")
    dsp = make_counts(n_cells=90, labels=("sensitive", "resistant"), prefix="d", seed=1)
    dsp.obs = dsp.obs.rename(columns={"cell_type": "drug_response"})
    cta.write_h5ad(root / "pbmc.h5ad")
    dsp.write_h5ad(root / "lung.h5ad")
    vocab = sorted(set(cta.var_names[5:200]) | {"EXTRA"})
    write_gene_vocab(vocab, root / "gene_vocab.txt")
    bank = root / "bank.jsonl"
    bank.write_text("\n".join(__import__("json").dumps(r) for r in RECORDS))
    sources = [
        AnnDataSource(str(root / "pbmc.h5ad"), task="cta"),
        AnnDataSource(str(root / "lung.h5ad"), task="dsp", drug="Erlotinib"),
        AnnDataSource(str(root / "pbmc.h5ad"), task="cpcg"),
    ]
    return {"root": root, "cta": cta, "dsp": dsp, "vocab": vocab, "bank": str(bank), "sources": sources}


def _build(inputs, config_name, tmp_path):
    builder = InstructCellDatasetBuilder(
        config_name=config_name,
        cache_dir=str(tmp_path),
        sources=inputs["sources"],
        gene_vocab=str(inputs["root"] / "gene_vocab.txt"),
        template_bank=inputs["bank"],
        chunk_size=64,
        progress=False,
    )
    builder.download_and_prepare()
    return builder


def test_builder_yields_expected_examples_per_split_and_task(inputs, tmp_path):
    builder = _build(inputs, "all-chat", tmp_path)
    bank = TemplateBank.load(inputs["bank"])
    cells, templates = {}, {}
    for split in ("train", "validation", "test"):
        ds = builder.as_dataset(split)
        counts = Counter(ds["task"])
        expected_cta = sum(split_of("pbmc", n) == split for n in inputs["cta"].obs_names)
        expected_dsp = sum(split_of("lung", n) == split for n in inputs["dsp"].obs_names)
        assert counts == Counter({"cta": expected_cta, "cpcg": expected_cta, "dsp": expected_dsp})
        assert set(ds["split"]) == {split}
        assert all(split_of(d, c) == split for d, c in zip(ds["dataset"], ds["cell_id"], strict=True))
        allowed = {t.id for task in ("cta", "dsp", "cpcg") for t in bank.select(task, "chat", split)}
        assert set(ds["template_id"]) <= allowed
        cells[split] = set(zip(ds["dataset"], ds["cell_id"], strict=True))
        templates[split] = set(ds["template_id"])
    for first, second in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not cells[first] & cells[second], f"a cell is in both {first} and {second}"
        assert not templates[first] & templates[second], f"a template is in both {first} and {second}"
    with open(f"{builder.cache_dir}/gene_vocab.txt") as f:
        assert f.read().split() == inputs["vocab"]


def test_rows_follow_the_schema_and_sparse_rows_densify_to_the_input(inputs, tmp_path):
    ds = _build(inputs, "all-instruct", tmp_path).as_dataset("train")
    vocab = read_gene_vocab(inputs["root"] / "gene_vocab.txt")
    position = {g: i for i, g in enumerate(inputs["cta"].var_names)}
    dense_input = inputs["cta"].X.toarray()
    columns = [position.get(g) for g in vocab]
    for row in ds:
        assert row["variant"] == "instruct"
        if row["task"] == "cta":
            assert row["instruction"].count(CELL_TOKEN) == 1 and row["response"] == row["label"]
            assert row["choices"] == ["B cell", "T cell", "monocyte"] and row["options_in_prompt"]
            assert ", ".join(sorted(row["choices"])) != "" and all(
                c in row["instruction"] for c in row["choices"]
            )
            assert row["target_gene_indices"] == [] and row["drug"] == ""
            cell = dense_input[inputs["cta"].obs_names.get_loc(row["cell_id"])]
            expected = np.array([cell[c] if c is not None else 0 for c in columns], dtype=np.float32)
            np.testing.assert_array_equal(
                densify(row["input_gene_indices"], row["input_gene_counts"], len(vocab)), expected
            )
        elif row["task"] == "dsp":
            assert row["drug"] == "Erlotinib" and "Erlotinib" in row["instruction"]
            assert row["label"] in ("sensitive", "resistant") and not row["options_in_prompt"]
        else:
            assert CELL_TOKEN not in row["instruction"] and row["response"] == SIGNAL_TOKEN
            assert row["label"] in row["instruction"] and row["input_gene_indices"] == []
            assert len(row["target_gene_indices"]) > 0
        assert "{" not in row["instruction"] + row["response"]
        assert row["species"] == "human" and row["tissue"] == "blood"


def test_builder_is_deterministic(inputs, tmp_path):
    first = _build(inputs, "cta-chat", tmp_path / "a").as_dataset("validation").to_pandas()
    second = _build(inputs, "cta-chat", tmp_path / "b").as_dataset("validation").to_pandas()
    assert first.drop(columns=["input_gene_indices", "input_gene_counts"]).equals(
        second.drop(columns=["input_gene_indices", "input_gene_counts"])
    )
    assert first.sort_values("cell_id")["cell_id"].is_unique


def test_builder_errors_are_clear(inputs, tmp_path):
    with pytest.raises(ValueError, match="No source for tasks"):
        InstructCellDatasetBuilder(
            config_name="cta-instruct",
            cache_dir=str(tmp_path),
            sources=inputs["sources"][1:2],
            gene_vocab=inputs["vocab"],
            template_bank=inputs["bank"],
        ).download_and_prepare()
    with pytest.raises(ValueError, match="gene vocabulary"):
        InstructCellDatasetBuilder(
            config_name="cta-instruct",
            cache_dir=str(tmp_path / "v"),
            sources=inputs["sources"][:1],
            template_bank=inputs["bank"],
        ).download_and_prepare()
