import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from synthetic_anndata import make_counts

from datasets_builder.preprocessing import (
    build_gene_vocab,
    filter_rare_labels,
    highly_variable_genes,
    load_ortholog_table,
    map_mouse_genes,
    preprocess_dataset,
    quality_control,
)


def test_qc_drops_low_quality_cells_rare_genes_and_mito_outliers():
    adata = make_counts(n_cells=200, n_genes=400)
    X = adata.X.toarray()
    X[0] = 0
    X[0, 50:60] = 3  # 10 genes only: fewer than 200
    X[1, :10] = 2000  # mitochondrial outlier
    X[:, 399] = 0
    X[:3, 399] = 1  # gene seen in 3 cells
    adata.X = sp.csr_matrix(X)
    filtered = quality_control(adata, species="human", min_genes=200)
    assert "cell_0" not in filtered.obs_names and "cell_1" not in filtered.obs_names
    assert "GENE399" not in filtered.var_names
    assert filtered.n_obs >= 190
    np.testing.assert_array_equal(
        filtered.X.toarray(), adata[filtered.obs_names, filtered.var_names].X.toarray()
    )


def test_qc_rejects_normalized_data():
    adata = make_counts(n_cells=20, n_genes=30)
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    with pytest.raises(ValueError, match="non-integer"):
        quality_control(adata, species="human")


def test_rare_labels_are_dropped():
    adata = make_counts(n_cells=100, n_genes=50)
    adata.obs["cell_type"] = pd.Categorical(["rare"] * 5 + ["common"] * 95)
    kept = filter_rare_labels(adata, "cell_type", min_cells=20)
    assert kept.n_obs == 95 and list(kept.obs["cell_type"].cat.categories) == ["common"]


def test_hvg_selects_marker_genes_and_keeps_raw_counts():
    adata = make_counts(n_cells=300, n_genes=300)
    before = adata.X.copy()
    genes = highly_variable_genes(adata, n_top_genes=40)
    assert len(genes) == 40
    markers = {f"GENE{i}" for i in range(20, 65)}
    assert len(markers & set(genes)) >= 20  # chance level is 6
    assert (adata.X != before).nnz == 0
    assert highly_variable_genes(adata, n_top_genes=10_000) == adata.var_names.tolist()


def test_gene_vocab_is_a_sorted_union():
    assert build_gene_vocab([["B", "A"], ["C", "A"]]) == ["A", "B", "C"]


def test_mouse_genes_map_with_a_table_and_keep_mouse_specific_genes(tmp_path):
    adata = make_counts(n_cells=30, n_genes=20, species="mouse")
    table = tmp_path / "orthologs.tsv"
    table.write_text("mouse_symbol\thuman_symbol\nGene10\tHUMAN10\nGene11\tHUMAN10\nGene12\tHUMAN12\n")
    orthologs = load_ortholog_table(table)
    mapped = map_mouse_genes(adata, orthologs)
    assert "HUMAN12" in mapped.var_names and "Gene13" in mapped.var_names and "Gene10" not in mapped.var_names
    assert mapped.n_vars == 19
    summed = adata[:, ["Gene10", "Gene11"]].X.toarray().sum(axis=1)
    np.testing.assert_array_equal(mapped[:, "HUMAN10"].X.toarray().ravel(), summed)


def test_mgi_and_biomart_tables_are_recognised(tmp_path):
    mgi = tmp_path / "HOM_MouseHumanSequence.rpt"
    mgi.write_text(
        "DB Class Key\tCommon Organism Name\tNCBI Taxon ID\tSymbol\n"
        "1\tmouse, laboratory\t10090\tActb\n1\thuman\t9606\tACTB\n2\tmouse, laboratory\t10090\tMouseOnly\n"
    )
    assert load_ortholog_table(mgi) == {"Actb": "ACTB"}
    biomart = tmp_path / "mart.txt"
    biomart.write_text("Gene stable ID\tGene name\tHuman gene name\nENSMUSG1\tCd4\tCD4\nENSMUSG2\tXist\t\n")
    assert load_ortholog_table(biomart) == {"Cd4": "CD4"}
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="Unrecognised ortholog table"):
        load_ortholog_table(bad)


def test_case_insensitive_fallback_logs_a_warning(caplog):
    adata = make_counts(n_cells=30, n_genes=20, species="mouse")
    mapped = map_mouse_genes(adata, human_symbols=["GENE10", "GENE11"])
    assert "GENE10" in mapped.var_names and "Gene12" in mapped.var_names
    assert "case-insensitively" in caplog.text


def test_preprocess_dataset_end_to_end():
    adata = make_counts(n_cells=200, n_genes=300, species="mouse")
    out = preprocess_dataset(
        adata, "mouse", "cell_type", human_symbols=[f"GENE{i}" for i in range(300)], min_genes=50
    )
    assert out.X.dtype == np.int32 and sp.isspmatrix_csr(out.X) or sp.issparse(out.X)
    assert out.var_names[-1].startswith("GENE")


def test_gene_symbols_come_from_a_var_column_and_repeated_symbols_are_summed():
    from datasets_builder.preprocessing import use_gene_symbols

    adata = make_counts(n_cells=20, n_genes=4)
    symbols = ["CD3E", "MS4A1", "CD3E", "LYZ"]
    adata.var = pd.DataFrame({"gene_symbols": symbols}, index=[f"ENSG{i:011d}" for i in range(4)])
    renamed, source = use_gene_symbols(adata)
    assert list(renamed.var_names) == ["CD3E", "MS4A1", "LYZ"]
    assert source == "var['gene_symbols'], 1 repeated symbols summed"
    X = adata.X.toarray()
    np.testing.assert_array_equal(renamed.X.toarray()[:, 0], X[:, 0] + X[:, 2])
    same, source = use_gene_symbols(make_counts(n_cells=5, n_genes=12))
    assert source == "var_names"


def test_a_label_below_the_minimum_is_an_error_unless_rare_labels_are_dropped():
    from datasets_builder.preprocessing import check_label_counts

    adata = make_counts(n_cells=100, n_genes=300)
    adata.obs["cell_type"] = pd.Categorical(["rare"] + ["common"] * 50 + ["other"] * 49)
    with pytest.raises(ValueError, match=r"'rare': 1 cell\).*--drop-rare-labels"):
        check_label_counts(adata, "cell_type", min_cells=20)
    with pytest.raises(ValueError, match="'rare': 1 cell"):
        preprocess_dataset(adata, "human", "cell_type", drop_rare_labels=False, min_genes=50)
    kept = preprocess_dataset(adata, "human", "cell_type", drop_rare_labels=True, min_genes=50)
    assert json.loads(kept.uns["preprocessing"])["dropped_labels"] == {"rare": 1}
