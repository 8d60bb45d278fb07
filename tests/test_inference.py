"""Whole-dataset helpers and the `instructcell` CLI on the tiny preset (synthetic .h5ad files only)."""

import io

import anndata
import numpy as np
import pandas as pd
import pytest
from synthetic_anndata import make_counts

from instructcell import cli, inference
from instructcell.hub import save_for_hub
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.pipeline_instructcell import TASK

LABELS = ["T cell", "B cell"]


@pytest.fixture
def pipe(tester, model):
    return InstructCellPipeline(model=model, processor=tester.processor, task=TASK)


@pytest.fixture
def h5ad(tmp_path):
    adata = make_counts(n_cells=7, n_genes=50, labels=("T cell", "B cell"))
    adata.layers["counts"] = adata.X.copy()
    adata.obs["drug"] = "erlotinib"
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture
def model_dir(model, tester, tmp_path):
    return save_for_hub(model, tester.processor, tmp_path / "model")


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_annotate_file_adds_obs_columns_and_touches_nothing_else(pipe, h5ad, tmp_path):
    before = anndata.read_h5ad(h5ad)
    out = inference.annotate(
        pipe,
        h5ad,
        labels=LABELS,
        output=tmp_path / "out.h5ad",
        label_key="pred",
        probability_key="pred_p",
        chunk_size=3,
        batch_size=2,
        progress=False,
    )
    after = anndata.read_h5ad(out)
    assert list(after.obs.columns) == [*before.obs.columns, "pred", "pred_p"]
    pd.testing.assert_frame_equal(after.obs[before.obs.columns], before.obs)
    assert (after.X != before.X).nnz == 0 and (after.layers["counts"] != before.layers["counts"]).nnz == 0
    assert set(after.obs["pred"]) <= set(LABELS) and after.obs["pred_p"].between(0, 1).all()
    # Chunked file annotation equals in-memory annotation.
    inference.annotate(
        pipe, before, labels=LABELS, label_key="pred", probability_key="pred_p", progress=False
    )
    np.testing.assert_allclose(before.obs["pred_p"], after.obs["pred_p"], atol=1e-5)
    assert ".tmp" not in "".join(_files(tmp_path))


def test_failure_leaves_no_partial_output(pipe, h5ad, tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    original = InstructCellPipeline.__call__
    monkeypatch.setattr(InstructCellPipeline, "__call__", failing)
    listing = _files(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        inference.annotate(
            pipe, h5ad, labels=LABELS, output=tmp_path / "out.h5ad", chunk_size=3, progress=False
        )
    # No output, only the finished chunk kept for a rerun to resume from.
    assert _files(tmp_path) == sorted([*listing, "out.h5ad.instructcell-partial"])
    assert _files(tmp_path / "out.h5ad.instructcell-partial") == ["chunk-00000000.json", "run.json"]


def test_annotate_generate_method_and_drug_response(pipe, h5ad):
    adata = anndata.read_h5ad(h5ad)
    inference.annotate(pipe, adata, method="generate", max_new_tokens=2, progress=False)
    assert "instructcell_label" in adata.obs and "instructcell_probability" not in adata.obs  # free text
    inference.predict_drug(pipe, adata, progress=False)  # {drug} from obs["drug"]
    assert set(adata.obs["instructcell_drug_response"]) <= {"sensitive", "resistant"}
    assert adata.obs["instructcell_drug_response_probability"].notna().all()


def test_bad_files_and_genes(pipe, tmp_path):
    empty = tmp_path / "empty.h5ad"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="Cannot read"):
        inference.annotate(pipe, empty, labels=LABELS, output=tmp_path / "o.h5ad")
    no_cells = make_counts(n_cells=3, n_genes=50)[:0].copy()
    no_cells.write_h5ad(tmp_path / "zero.h5ad")
    with pytest.raises(ValueError, match="0 cells"):
        inference.annotate(pipe, tmp_path / "zero.h5ad", labels=LABELS, output=tmp_path / "o.h5ad")
    unknown = make_counts(n_cells=3, n_genes=50)
    unknown.var_names = [f"X{i}" for i in range(50)]
    with pytest.raises(ValueError, match="vocabulary genes"):
        inference.annotate(pipe, unknown, labels=LABELS)
    with pytest.raises(ValueError, match="needs a label set"):
        inference.annotate(pipe, make_counts(n_cells=2, n_genes=50), method="score")
    assert not (tmp_path / "o.h5ad").exists()


def test_generate_cells_per_condition(pipe, tmp_path):
    conditions = [{"cell_type": "B cell", "species": "human"}, {"cell_type": "T cell", "species": "human"}]
    adata = inference.generate_cells(
        pipe, conditions, n_cells=3, output=tmp_path / "gen.h5ad", max_new_tokens=2, progress=False
    )
    assert adata.shape == (6, pipe.model.config.n_genes)
    assert np.issubdtype(adata.X.dtype, np.integer)
    assert list(adata.obs["cell_type"]) == ["B cell"] * 3 + ["T cell"] * 3
    assert list(adata.obs["condition_index"]) == [0, 0, 0, 1, 1, 1]
    assert anndata.read_h5ad(tmp_path / "gen.h5ad").shape == (6, pipe.model.config.n_genes)
    with pytest.raises(ValueError, match="cell_type"):
        inference.generate_cells(pipe, [{"species": "human"}], n_cells=1)


def test_gene_saliency_ranks_genes(pipe, h5ad):
    frame = inference.gene_saliency(pipe, anndata.read_h5ad(h5ad)[:3], "B cell", labels=LABELS, top_k=5)
    assert len(frame) == 5 and (frame["saliency"] >= 0).all()
    assert frame["saliency"].is_monotonic_decreasing and frame["saliency"].iloc[0] > 0
    with pytest.raises(ValueError, match="not in the label set"):
        inference.gene_saliency(pipe, anndata.read_h5ad(h5ad)[:1], "NK cell", labels=LABELS)


def test_gene_saliency_masked_protocol(pipe, h5ad):
    adata = anndata.read_h5ad(h5ad)[:4]
    frame = inference.gene_saliency(pipe, adata, "B cell", labels=LABELS, top_k=40, method="masked")
    assert frame["saliency"].between(0, 1).all() and frame["saliency"].iloc[0] > 0
    # genes of the vocabulary absent from the file (zero-filled) or never expressed get no saliency
    assert (frame.loc[frame["mean_count"] == 0, "saliency"] == 0).all()
    with pytest.raises(ValueError, match="method"):
        inference.gene_saliency(pipe, adata, "B cell", labels=LABELS, method="smoothgrad")


def test_cli_annotate_predict_generate(model_dir, h5ad, tmp_path):
    out = io.StringIO()
    assert (
        cli.main(
            [
                "annotate",
                str(model_dir),
                str(h5ad),
                "-o",
                str(tmp_path / "a.h5ad"),
                "--labels",
                "T cell,B cell",
                "--quiet",
                "--chunk-size",
                "4",
            ],
            stdout=out,
        )
        == 0
    )
    assert "instructcell_label_probability" in anndata.read_h5ad(tmp_path / "a.h5ad").obs
    assert (
        cli.main(
            [
                "predict-drug",
                str(model_dir),
                str(h5ad),
                "-o",
                str(tmp_path / "d.h5ad"),
                "--drug",
                "erlotinib",
                "--quiet",
            ],
            stdout=out,
        )
        == 0
    )
    assert "instructcell_drug_response" in anndata.read_h5ad(tmp_path / "d.h5ad").obs
    assert (
        cli.main(
            [
                "generate",
                str(model_dir),
                "-o",
                str(tmp_path / "g.h5ad"),
                "--cell-type",
                "B cell",
                "--cell-type",
                "T cell",
                "--species",
                "human",
                "--n-cells",
                "2",
                "--quiet",
                "--max-new-tokens",
                "2",
            ],
            stdout=out,
        )
        == 0
    )
    assert anndata.read_h5ad(tmp_path / "g.h5ad").n_obs == 4
    assert (
        cli.main(
            [
                "annotate",
                str(model_dir),
                str(tmp_path / "missing.h5ad"),
                "-o",
                str(tmp_path / "x.h5ad"),
                "--labels",
                "T cell,B cell",
            ],
            stdout=out,
        )
        == 2
    )
