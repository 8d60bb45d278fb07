import pandas as pd
import pytest
from synthetic_anndata import make_counts

from datasets_builder.original_datasets import REGISTRY, attach_labels, find_file, geo_suppl, read_matrix


def test_registry_covers_the_readme_datasets_with_consistent_entries():
    assert len(REGISTRY) == 10
    assert {d.task for d in REGISTRY.values()} == {"cta", "dsp", "cpcg"}
    for spec in REGISTRY.values():
        assert spec.species in ("human", "mouse") and spec.urls and spec.matrix
        assert bool(spec.labels) != bool(spec.label_column)
        assert (spec.task == "dsp") == bool(spec.drug)
        assert all(url.startswith("https://") for url in spec.urls.values())
    assert (
        geo_suppl("GSE110894", "x.txt")
        == "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE110nnn/GSE110894/suppl/x.txt"
    )


def test_attach_labels_from_a_table_and_metadata():
    adata = make_counts(n_cells=6, n_genes=12)
    spec = REGISTRY["GSE110894"]
    table = pd.DataFrame(
        {"Sample name": ["cell_0", "cell_2", "nope"], "Drug response": ["sensitive", "resistant", "x"]}
    )
    out = attach_labels(adata, spec, table)
    assert out.obs_names.tolist() == ["cell_0", "cell_2"]
    assert out.obs["drug_response"].tolist() == ["sensitive", "resistant"]
    assert (out.obs["drug"] == "I-BET-762").all() and (out.obs["species"] == "mouse").all()
    with pytest.raises(ValueError, match="no cell matched"):
        attach_labels(adata, spec, table.assign(**{"Sample name": ["a", "b", "c"]}))


def test_text_matrix_reader_and_file_search(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "S1_Liver_Counts.csv"
    pd.DataFrame({"gene": ["A", "B"], "c1": [1, 0], "c2": [3, 4]}).to_csv(path, index=False)
    found = find_file(tmp_path, "*Liver_Counts.csv")
    adata = read_matrix(found, genes_in_rows=True)
    assert adata.obs_names.tolist() == ["c1", "c2"] and adata.var_names.tolist() == ["A", "B"]
    assert adata.X.toarray().tolist() == [[1, 0], [3, 4]]
    with pytest.raises(ValueError, match="update REGISTRY"):
        find_file(tmp_path, "missing.txt")
