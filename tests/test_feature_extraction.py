"""Tests for InstructCellFeatureExtractor (gene alignment, validation, input types, save/load)."""

import json
import logging
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from transformers import BatchFeature

from modeling_instructcell.feature_extraction_instructcell import (
    GeneAlignment,
    InstructCellFeatureExtractor,
)

anndata = pytest.importorskip("anndata")
pd = pytest.importorskip("pandas")
sp = pytest.importorskip("scipy.sparse")

LOGGER = "modeling_instructcell.feature_extraction_instructcell"
VOCAB = ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY"]
VOCAB_IDS = ["ENSG00000198851", "ENSG00000156738", "ENSG00000090382", "ENSG00000105374", "ENSG00000115523"]
# Input columns: different order, different case, two genes outside the vocabulary, NKG7 missing.
INPUT_GENES = ["lyz", "EXTRA1", "CD3E", "gnly", "MS4A1", "EXTRA2"]
COUNTS = np.array(
    [
        [5, 1, 0, 2, 3, 0],
        [0, 0, 4, 1, 0, 7],
        [1, 2, 3, 0, 0, 0],
    ],
    dtype=np.int32,
)
# Expected cell_values in vocabulary order: CD3E, MS4A1, LYZ, NKG7 (missing -> 0), GNLY.
EXPECTED = np.array(
    [
        [0, 3, 5, 0, 2],
        [4, 0, 0, 0, 1],
        [3, 0, 1, 0, 0],
    ],
    dtype=np.float32,
)
OBS = ["cellA", "cellB", "cellC"]


@pytest.fixture
def fe():
    return InstructCellFeatureExtractor(gene_names=VOCAB)


def make_adata(counts=COUNTS, genes=INPUT_GENES, obs=OBS, sparse=True, **var_columns):
    X = sp.csr_matrix(counts) if sparse else np.asarray(counts)
    var = pd.DataFrame(var_columns, index=list(genes))
    return anndata.AnnData(X=X, obs=pd.DataFrame(index=list(obs)), var=var)


def _padded_adata():
    """COUNTS embedded in a bigger AnnData, so that a view selects exactly COUNTS."""
    extra = np.array([[9, 9, 9, 9, 9, 9]], dtype=np.int32)
    return make_adata(np.vstack([extra, COUNTS, extra]), obs=["pad0", *OBS, "pad1"])


def _backed(tmp_path, view):
    adata = _padded_adata() if view else make_adata()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    return backed[1:4] if view else backed


def _backed_csc(tmp_path):
    adata = make_adata()
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    return anndata.read_h5ad(tmp_path / "csc.h5ad", backed="r")


INPUTS = {
    "numpy": lambda tmp: (COUNTS, INPUT_GENES),
    "numpy_float": lambda tmp: (COUNTS.astype(np.float64), INPUT_GENES),
    "list": lambda tmp: (COUNTS.tolist(), INPUT_GENES),
    "torch": lambda tmp: (torch.from_numpy(COUNTS), INPUT_GENES),
    "csr": lambda tmp: (sp.csr_matrix(COUNTS), INPUT_GENES),
    "csc": lambda tmp: (sp.csc_matrix(COUNTS), INPUT_GENES),
    "coo": lambda tmp: (sp.coo_matrix(COUNTS.astype(np.float32)), INPUT_GENES),
    "csr_array": lambda tmp: (sp.csr_array(COUNTS), INPUT_GENES),
    "dataframe": lambda tmp: (pd.DataFrame(COUNTS, columns=INPUT_GENES, index=OBS), None),
    "sparse_dataframe": lambda tmp: (
        pd.DataFrame.sparse.from_spmatrix(sp.csr_matrix(COUNTS), columns=INPUT_GENES, index=OBS),
        None,
    ),
    "anndata_sparse": lambda tmp: (make_adata(), None),
    "anndata_dense": lambda tmp: (make_adata(sparse=False), None),
    "anndata_view": lambda tmp: (_padded_adata()[1:4], None),
    "anndata_raw": lambda tmp: (_with_raw(), None),
    "anndata_backed": lambda tmp: (_backed(tmp, view=False), None),
    "anndata_backed_view": lambda tmp: (_backed(tmp, view=True), None),
    "anndata_backed_csc": lambda tmp: (_backed_csc(tmp), None),
}


def _with_raw():
    adata = make_adata()
    adata.raw = adata
    return adata.raw


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_every_input_type_gives_the_same_aligned_counts(fe, kind, tmp_path):
    cells, gene_names = INPUTS[kind](tmp_path)
    out = fe(cells, gene_names=gene_names)
    assert isinstance(out, BatchFeature)
    values = out["cell_values"]
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, EXPECTED)


def test_anndata_layer_is_used(fe):
    adata = make_adata(counts=np.ones_like(COUNTS))
    adata.layers["counts"] = sp.csr_matrix(COUNTS)
    np.testing.assert_array_equal(fe(adata, layer="counts")["cell_values"], EXPECTED)


def test_single_cell_vector_and_series(fe):
    vector = fe(COUNTS[0], gene_names=INPUT_GENES)["cell_values"]
    assert vector.shape == (1, len(VOCAB))
    np.testing.assert_array_equal(vector[0], EXPECTED[0])
    series = pd.Series(COUNTS[1], index=INPUT_GENES, name="cellB")
    np.testing.assert_array_equal(fe(series)["cell_values"][0], EXPECTED[1])


def test_unnamed_columns_of_vocabulary_width_are_taken_in_vocabulary_order(fe):
    counts = np.arange(1, 11).reshape(2, 5)
    np.testing.assert_array_equal(fe(counts)["cell_values"], counts.astype(np.float32))


@pytest.mark.parametrize(
    "return_tensors, kind", [(None, np.ndarray), ("np", np.ndarray), ("pt", torch.Tensor)]
)
def test_return_tensors(fe, return_tensors, kind):
    values = fe(COUNTS, gene_names=INPUT_GENES, return_tensors=return_tensors)["cell_values"]
    assert isinstance(values, kind)
    assert tuple(values.shape) == (3, len(VOCAB))
    if return_tensors == "pt":
        assert values.dtype == torch.float32
        assert fe.model_input_names == ["cell_values"]


# ---------------------------------------------------------------- matching rules


def test_case_insensitive_by_default_and_case_sensitive_on_request():
    lower = [g.lower() for g in VOCAB]
    counts = np.ones((1, 5), dtype=np.int32)
    loose = InstructCellFeatureExtractor(gene_names=VOCAB)
    np.testing.assert_array_equal(loose(counts, gene_names=lower)["cell_values"], np.ones((1, 5)))
    strict = InstructCellFeatureExtractor(gene_names=VOCAB, case_sensitive=True)
    with pytest.raises(ValueError, match="pass case_sensitive=False"):
        strict(counts, gene_names=lower)
    np.testing.assert_array_equal(strict(counts, gene_names=VOCAB)["cell_values"], np.ones((1, 5)))


def test_missing_genes_zero_filled_and_overlap_reported(fe, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out, report = fe(make_adata(), return_alignment=True)
    np.testing.assert_array_equal(out["cell_values"][:, VOCAB.index("NKG7")], 0)
    assert isinstance(report, GeneAlignment)
    assert (report.n_vocab, report.n_input_genes, report.n_matched) == (5, 6, 4)
    assert report.fraction_vocab_matched == pytest.approx(4 / 5)
    assert report.fraction_input_genes_matched == pytest.approx(4 / 6)
    kept = EXPECTED.sum() / COUNTS.sum()
    assert report.fraction_counts_kept == pytest.approx(kept)
    assert report.missing_vocab_examples == ["NKG7"]
    assert report.unmatched_input_examples == ["EXTRA1", "EXTRA2"]
    assert "4/5 vocabulary genes matched" in caplog.text


def test_duplicate_input_genes_are_summed_with_a_warning(fe, caplog):
    counts = np.array([[1, 2, 3, 1, 1]])
    genes = ["CD3E", "cd3e", "MS4A1", "LYZ", "GNLY"]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out, report = fe(counts, gene_names=genes, return_alignment=True)
    np.testing.assert_array_equal(out["cell_values"], [[3, 3, 1, 0, 1]])
    assert report.n_duplicate_genes == 1 and report.duplicate_examples == ["CD3E"]
    assert report.fraction_counts_kept == pytest.approx(1.0)
    assert "summed" in caplog.text
    sparse_out = fe(sp.csr_matrix(counts), gene_names=genes)["cell_values"]
    np.testing.assert_array_equal(sparse_out, [[3, 3, 1, 0, 1]])


def test_ensembl_ids_from_var_names_with_symbol_column():
    fe = InstructCellFeatureExtractor(gene_names=VOCAB, gene_ids=VOCAB_IDS)
    ids = {g.upper(): i for g, i in zip(VOCAB, VOCAB_IDS, strict=True)}
    # var_names are versioned Ensembl ids; gene symbols in var["gene_symbols"] are deliberately wrong.
    var_names = [ids.get(g.upper(), f"ENSG0000099999{k}") + ".7" for k, g in enumerate(INPUT_GENES)]
    adata = make_adata(genes=var_names, gene_symbols=[f"WRONG{k}" for k in range(6)])
    out, report = fe(adata, return_alignment=True)
    np.testing.assert_array_equal(out["cell_values"], EXPECTED)
    assert report.n_matched_by_id == 4


def test_ensembl_id_column_beats_renamed_symbol():
    fe = InstructCellFeatureExtractor(gene_names=VOCAB, gene_ids=VOCAB_IDS)
    renamed = ["LYZ_OLDNAME", "EXTRA1", "CD3E", "GNLY", "MS4A1", "EXTRA2"]
    gene_ids = [VOCAB_IDS[2], "ENSG00000000001", VOCAB_IDS[0], VOCAB_IDS[4], None, "ENSG00000000002"]
    adata = make_adata(genes=renamed, gene_ids=gene_ids)
    out, report = fe(adata, return_alignment=True)
    np.testing.assert_array_equal(out["cell_values"], EXPECTED)  # MS4A1 (no id) matched by symbol
    assert report.n_matched_by_id == 3 and report.n_matched == 4


def test_ensembl_ids_as_gene_names_for_arrays():
    fe = InstructCellFeatureExtractor(gene_names=VOCAB, gene_ids=VOCAB_IDS)
    np.testing.assert_array_equal(fe(np.eye(5)[[0]], gene_names=VOCAB_IDS)["cell_values"], np.eye(5)[[0]])


def test_vocabulary_of_ensembl_ids_matches_versioned_ids():
    fe = InstructCellFeatureExtractor(gene_names=VOCAB_IDS)
    counts = np.arange(1, 6)[None, :]
    versioned = [f"{g}.3" for g in VOCAB_IDS[::-1]]
    np.testing.assert_array_equal(fe(counts, gene_names=versioned)["cell_values"], counts[:, ::-1])


def test_composite_symbol_id_names(fe):
    genes = [f"{g}_ENSG0000000000{k}" for k, g in enumerate(INPUT_GENES)]
    np.testing.assert_array_equal(fe(COUNTS, gene_names=genes)["cell_values"], EXPECTED)


def test_ensembl_ids_against_a_symbol_only_vocabulary_explain_the_fix(fe):
    with pytest.raises(ValueError, match="look like Ensembl ids"):
        fe(np.ones((1, 5)), gene_names=VOCAB_IDS)


def test_align_once_and_reuse_for_chunks(fe):
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(10, 6)) + 1
    alignment = fe.align_genes(INPUT_GENES)
    assert alignment.fraction_counts_kept is None
    full = fe(counts, gene_names=INPUT_GENES)["cell_values"]
    chunks = [fe(counts[i : i + 4], alignment=alignment)["cell_values"] for i in range(0, 10, 4)]
    np.testing.assert_array_equal(np.vstack(chunks), full)
    with pytest.raises(ValueError, match="recompute it with align_genes"):
        fe(counts[:, :5], alignment=alignment)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(
    "value, message",
    [
        (-1.0, "non-negative"),
        (np.nan, "NaN/inf"),
        (np.inf, "NaN/inf"),
        (0.5, "non-integer"),
    ],
)
def test_bad_values_raise(fe, sparse, value, message):
    counts = COUNTS.astype(np.float32)
    counts[1, 2] = value
    cells = sp.csr_matrix(counts) if sparse else counts
    with pytest.raises(ValueError, match=message) as info:
        fe(cells, gene_names=INPUT_GENES)
    assert "[1]" in str(info.value)  # names the offending cell


def test_negative_integer_counts_raise(fe):
    counts = COUNTS.copy()
    counts[0, 0] = -3
    with pytest.raises(ValueError, match="non-negative"):
        fe(counts, gene_names=INPUT_GENES)


def test_log_normalized_input_gets_a_raw_counts_hint(fe):
    adata = make_adata(counts=np.log1p(COUNTS.astype(np.float32)))
    with pytest.raises(ValueError, match=r"log-normalized.*adata\.layers\['counts'\]"):
        fe(adata)


def test_all_zero_cells_named(fe):
    counts = COUNTS.copy()
    counts[2] = [0, 5, 0, 0, 0, 5]  # only genes outside the vocabulary
    with pytest.raises(ValueError, match=r"1 of 3 cells have no counts.*2 \('cellC'\)"):
        fe(make_adata(counts=counts))


def test_gene_names_width_mismatch(fe):
    with pytest.raises(ValueError, match="gene_names has 5 entries but the count matrix has 6 columns"):
        fe(COUNTS, gene_names=INPUT_GENES[:5])


def test_unnamed_columns_of_other_width_need_gene_names(fe):
    with pytest.raises(ValueError, match="pass gene_names="):
        fe(COUNTS)


@pytest.mark.parametrize(
    "cells", [np.zeros((0, 6)), sp.csr_matrix((0, 6)), "empty_adata"], ids=["numpy", "csr", "anndata"]
)
def test_empty_input(fe, cells):
    if isinstance(cells, str):
        cells = make_adata()[[]]
    with pytest.raises(ValueError, match="0 cells"):
        fe(cells, gene_names=None if hasattr(cells, "var_names") else INPUT_GENES)


def test_unknown_layer(fe):
    with pytest.raises(ValueError, match=r"Unknown layer 'counts'.*layer=None"):
        fe(make_adata(), layer="counts")


def test_low_overlap_says_what_to_do(fe):
    genes = ["CD3E", "X1", "X2", "X3", "X4", "X5"]
    with pytest.raises(ValueError, match=r"Only 1 of the 5 vocabulary genes.*min_gene_overlap"):
        fe(COUNTS, gene_names=genes)
    report = fe.align_genes(genes, check_overlap=False)
    assert report.n_matched == 1


def test_mouse_genes_against_human_vocabulary_suggest_orthologs():
    human = [f"GENE{k}A" for k in range(20)]
    fe = InstructCellFeatureExtractor(gene_names=human)
    mouse = [f"Mgene{k}b" for k in range(20)]
    with pytest.raises(ValueError, match="orthologs"):
        fe(np.ones((1, 20)), gene_names=mouse)


def test_three_dimensional_input(fe):
    with pytest.raises(ValueError, match="1-d .* or 2-d"):
        fe(np.ones((2, 3, 5)))


def test_bad_vocabulary():
    with pytest.raises(ValueError, match="duplicated symbols"):
        InstructCellFeatureExtractor(gene_names=["CD3E", "cd3e"])
    InstructCellFeatureExtractor(gene_names=["CD3E", "cd3e"], case_sensitive=True)
    with pytest.raises(ValueError, match="aligned one-to-one"):
        InstructCellFeatureExtractor(gene_names=VOCAB, gene_ids=VOCAB_IDS[:2])
    with pytest.raises(ValueError, match="min_gene_overlap"):
        InstructCellFeatureExtractor(gene_names=VOCAB, min_gene_overlap=2)
    with pytest.raises(ValueError, match="no gene vocabulary"):
        InstructCellFeatureExtractor()(COUNTS)


# ---------------------------------------------------------------- save / load, remote-code constraints


def test_save_and_load_round_trip(tmp_path):
    fe = InstructCellFeatureExtractor(
        gene_names=VOCAB, gene_ids=VOCAB_IDS, min_gene_overlap=0.3, case_sensitive=True
    )
    fe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["gene_names"] == VOCAB and saved["gene_ids"] == VOCAB_IDS
    assert not any(key.startswith("_") for key in saved)
    loaded = InstructCellFeatureExtractor.from_pretrained(tmp_path)
    assert loaded.gene_names == VOCAB and loaded.gene_ids == VOCAB_IDS
    assert (loaded.min_gene_overlap, loaded.case_sensitive) == (0.3, True)
    np.testing.assert_array_equal(
        loaded(COUNTS, gene_names=[g.upper() for g in INPUT_GENES])["cell_values"], EXPECTED
    )
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "preprocessor_config.json").read_text()) == saved


def test_module_imports_only_what_remote_code_allows():
    # check_imports (run when loading Hub code) requires every import outside `try:` blocks, even inside
    # functions, to be installed: only the stdlib, numpy, torch and transformers are allowed.
    from transformers.dynamic_module_utils import get_imports

    import modeling_instructcell.feature_extraction_instructcell as module

    third_party = set(get_imports(module.__file__)) - set(sys.stdlib_module_names)
    assert third_party <= {"numpy", "torch", "transformers"}


# ---------------------------------------------------------------- scale


def test_large_sparse_input_is_not_densified():
    n_cells, n_genes, n_vocab = 1000, 20000, 2000
    rng = np.random.default_rng(0)
    counts = sp.random(n_cells, n_genes, density=0.05, format="csr", dtype=np.float32, random_state=rng)
    counts.data = np.ceil(counts.data * 10)
    genes = [f"GENE{j}" for j in range(n_genes)]
    columns = rng.choice(n_genes, size=n_vocab, replace=False)
    fe = InstructCellFeatureExtractor(gene_names=[genes[j] for j in columns])

    tracemalloc.start()
    try:
        values = fe(counts, gene_names=genes)["cell_values"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    dense_input_bytes = n_cells * n_genes * 4  # 80 MB
    assert values.shape == (n_cells, n_vocab)
    assert peak < dense_input_bytes / 2, f"peak {peak / 1e6:.1f} MB suggests the input was densified"
    np.testing.assert_array_equal(values[:50], counts[:50][:, columns].toarray())


@pytest.mark.parametrize(
    "var_names, var, symbols, ids",
    [
        # CELLxGENE: Ensembl ids in var_names, symbols in feature_name (a gene without one keeps its id)
        (
            ["ENSG00000198851", "ENSG00000156738"],
            {"feature_name": ["CD3E", None]},
            ["CD3E", "ENSG00000156738"],
            ["ENSG00000198851", "ENSG00000156738"],
        ),
        # scanpy's read_10x default: symbols in var_names, ids in gene_ids
        (
            ["CD3E", "MS4A1"],
            {"gene_ids": ["ENSG00000198851", "ENSG00000156738"]},
            ["CD3E", "MS4A1"],
            ["ENSG00000198851", "ENSG00000156738"],
        ),
        # ids without any symbol column
        (["ENSG00000198851", "ENSG00000156738"], {}, None, ["ENSG00000198851", "ENSG00000156738"]),
        # row numbers from R, symbols in gene_name
        (["0", "1"], {"gene_name": ["CD3E", "MS4A1"]}, ["CD3E", "MS4A1"], None),
        # composite names
        (
            ["CD3E_ENSG00000198851", "MS4A1_ENSG00000156738"],
            {},
            ["CD3E", "MS4A1"],
            ["ENSG00000198851", "ENSG00000156738"],
        ),
    ],
)
def test_gene_identifiers_read_the_usual_conventions(var_names, var, symbols, ids):
    from modeling_instructcell.feature_extraction_instructcell import gene_identifiers

    assert gene_identifiers(var_names, pd.DataFrame(var, index=var_names)) == (symbols, ids)


def test_cellxgene_anndata_aligns_to_a_symbol_vocabulary_as_it_is(fe):
    var_names = [f"ENSG{i:011d}" for i in range(6)]
    adata = make_adata(genes=var_names, feature_name=pd.Categorical(INPUT_GENES))
    np.testing.assert_array_equal(fe(adata)["cell_values"], EXPECTED)
    numbered = make_adata(genes=[str(i) for i in range(6)], gene_symbols=INPUT_GENES)
    np.testing.assert_array_equal(fe(numbered)["cell_values"], EXPECTED)
