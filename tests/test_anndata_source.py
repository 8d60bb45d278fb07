import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from synthetic_anndata import make_counts

from datasets_builder.anndata_source import AnnDataReader, AnnDataSource, densify


def _write(adata, tmp_path, name="x.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return str(path)


def test_reader_aligns_chunks_to_the_vocabulary(tmp_path):
    adata = make_counts(n_cells=50, n_genes=40)
    path = _write(adata, tmp_path)
    vocab = ["NOT_THERE", *reversed(adata.var_names[::2].tolist())]
    cells = list(AnnDataReader(AnnDataSource(path, task="cta"), vocab, chunk_size=7, progress=False))
    assert [c.obs_name for c in cells] == adata.obs_names.tolist()
    dense = adata.X.toarray()
    for i, cell in enumerate(cells):
        assert cell.gene_indices.dtype == np.int32 and cell.gene_counts.dtype == np.float32
        assert np.all(np.diff(cell.gene_indices) > 0)
        expected = np.array([0] + [dense[i, adata.var_names.get_loc(g)] for g in vocab[1:]], dtype=np.float32)
        np.testing.assert_array_equal(densify(cell.gene_indices, cell.gene_counts, len(vocab)), expected)
        assert cell.metadata == {"species": "human", "tissue": "blood", "sequencing_method": "10x"}


def test_reader_reads_a_counts_layer(tmp_path):
    adata = make_counts(n_cells=20, n_genes=30)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    path = _write(adata, tmp_path)
    vocab = adata.var_names.tolist()
    with pytest.raises(ValueError, match="non-integer"):
        list(AnnDataReader(AnnDataSource(path, task="cta"), vocab, progress=False))
    cells = list(AnnDataReader(AnnDataSource(path, task="cta", layer="counts"), vocab, progress=False))
    np.testing.assert_array_equal(
        densify(cells[3].gene_indices, cells[3].gene_counts, 30), adata.layers["counts"][3].toarray()[0]
    )


def test_missing_label_column_is_a_clear_error(tmp_path):
    adata = make_counts(n_cells=10, n_genes=20)
    path = _write(adata, tmp_path)
    with pytest.raises(ValueError, match="no obs column 'drug_response'.*label_key"):
        AnnDataReader(AnnDataSource(path, task="dsp", drug="x"), adata.var_names.tolist())


def test_non_integer_and_negative_counts_are_clear_errors(tmp_path):
    adata = make_counts(n_cells=10, n_genes=20)
    adata.X = sp.csr_matrix(adata.X.toarray() * 0.5)
    reader = AnnDataReader(
        AnnDataSource(_write(adata, tmp_path), task="cta"), adata.var_names.tolist(), progress=False
    )
    with pytest.raises(ValueError, match="non-integer values.*raw integer counts"):
        list(reader)
    adata.X = sp.csr_matrix(-np.ones((10, 20)))
    reader = AnnDataReader(
        AnnDataSource(_write(adata, tmp_path, "n.h5ad"), task="cta"), adata.var_names.tolist()
    )
    with pytest.raises(ValueError, match="negative values"):
        list(reader)


def test_missing_gene_names_are_a_clear_error(tmp_path):
    adata = make_counts(n_cells=10, n_genes=20)
    adata.var_names = pd.Index([str(i) for i in range(20)])
    with pytest.raises(ValueError, match="no gene names"):
        AnnDataReader(AnnDataSource(_write(adata, tmp_path), task="cta"), ["GENE1"])


def test_no_shared_gene_and_missing_metadata_are_clear_errors(tmp_path):
    adata = make_counts(n_cells=10, n_genes=20)
    path = _write(adata, tmp_path)
    with pytest.raises(ValueError, match="shares no gene"):
        AnnDataReader(AnnDataSource(path, task="cta"), ["OTHER"])
    adata.obs = adata.obs.drop(columns=["tissue"])
    path = _write(adata, tmp_path, "m.h5ad")
    with pytest.raises(ValueError, match="no 'tissue'.*tissue=..."):
        AnnDataReader(AnnDataSource(path, task="cta"), adata.var_names.tolist())
    assert (
        AnnDataReader(
            AnnDataSource(path, task="cta", tissue="liver"), adata.var_names.tolist()
        ).n_shared_genes
        == 20
    )
    with pytest.raises(ValueError, match="Unknown task"):
        AnnDataSource(path, task="annotation")


def test_dense_x_is_read_too(tmp_path):
    adata = make_counts(n_cells=12, n_genes=15)
    adata.X = adata.X.toarray()
    path = _write(adata, tmp_path)
    cells = list(
        AnnDataReader(AnnDataSource(path, task="cta"), adata.var_names.tolist(), chunk_size=5, progress=False)
    )
    np.testing.assert_array_equal(densify(cells[11].gene_indices, cells[11].gene_counts, 15), adata.X[11])
    assert isinstance(anndata.read_h5ad(path).X, np.ndarray)
