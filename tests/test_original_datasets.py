"""Readers of the paper's datasets on tiny synthetic files in each source's exact layout (no network)."""

import gzip
import io

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from datasets_builder import original_datasets as od


def _gz(path, text):
    with gzip.open(path, "wt") as f:
        f.write(text)
    return path


def test_registry_lists_the_papers_ten_datasets_with_the_builder_schema():
    assert len(od.REGISTRY) == 10
    assert {d.task for d in od.REGISTRY.values()} == {"cta", "dsp", "cpcg"}
    for spec in od.REGISTRY.values():
        assert spec.species in ("human", "mouse") and spec.files and spec.source.startswith("https://")
        assert (spec.task == "dsp") == bool(spec.drug)
        assert all(url.startswith("https://") or (not url and spec.manual) for url in spec.files.values())
    assert od.geo_file("GSM1", "a.txt.gz") == (
        "https://www.ncbi.nlm.nih.gov/geo/download/?acc=GSM1&file=a.txt.gz&format=file"
    )


def test_segerstolpe_keeps_counts_not_rpkms_and_labels_from_sdrf(tmp_path):
    header = "#samples\tS1\tS2\tS3\n"
    rows = ["A\tNM_1\t1.5\t0.0\t2.25\t3\t0\t9\n", "B\tNM_2\t0.1\t7.7\t0.0\t1\t4\t0\n"]
    (tmp_path / "pancreas_refseq_rpkms_counts_3514sc.txt").write_text(header + "".join(rows))
    sdrf = pd.DataFrame(
        {
            "Source Name": ["x1", "x2", "x3"],
            "Extract Name": ["S1", "S2", "S3"],
            "Characteristics[cell type]": ["alpha cell", "beta cell", "not applicable"],
        }
    )
    sdrf.to_csv(tmp_path / "E-MTAB-5061.sdrf.txt", sep="\t", index=False)
    adata = od.read_segerstolpe(tmp_path)
    assert adata.obs_names.tolist() == ["S1", "S2", "S3"]
    assert adata.X.toarray().tolist() == [[3, 1], [0, 4], [9, 0]]
    assert adata.obs["cell_type"].tolist() == ["alpha", "beta", "not applicable"]


def test_segerstolpe_rejects_a_row_with_the_wrong_number_of_fields(tmp_path):
    (tmp_path / "pancreas_refseq_rpkms_counts_3514sc.txt").write_text("#samples\tS1\tS2\nA\tNM\t1\t2\t3\n")
    with pytest.raises(ValueError, match="Expected 6 fields"):
        od.read_segerstolpe(tmp_path)


def test_he2020_liver_matches_barcodes_of_the_liver_rows(tmp_path):
    pd.DataFrame({"": ["G1", "G2"], "AAAC": [1, 0], "CCCG": [2, 5]}).to_csv(
        tmp_path / "GSM4850582_Liver_Counts.csv.gz", index=False
    )
    meta = pd.DataFrame(
        {"orig.ident": ["Liver_cDNA", "Blood_cDNA"], "Cell_type_in_each_tissue": ["Hepatocyte", "T Cell"]},
        index=["Liver_cDNA_CCCG", "Blood_cDNA_AAAC"],
    )
    meta.to_csv(tmp_path / "Annotation_AHCA_alltissues_meta.data_84363_cell.txt", sep="\t")
    adata = od.read_he2020_liver(tmp_path)
    assert adata.obs_names.tolist() == ["CCCG"] and adata.obs["cell_type"].tolist() == ["Hepatocyte"]
    assert adata.X.toarray().tolist() == [[2, 5]] and adata.var_names.tolist() == ["G1", "G2"]


def _write_mex(folder, X, barcodes, genes, prefix="", gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, sp.coo_matrix(np.asarray(X).T))
    opener = gzip.open if gz else open
    with opener(folder / f"{prefix}matrix.mtx{suffix}", "wb") as f:
        f.write(buf.getvalue())
    with opener(folder / f"{prefix}barcodes.tsv{suffix}", "wt") as f:
        f.write("".join(f"{b}\n" for b in barcodes))
    with opener(folder / f"{prefix}genes.tsv{suffix}", "wt") as f:
        f.write("".join(f"{g}\tSYM{g}\n" for g in genes))


def test_pbmc68k_reads_mex_with_symbols_and_10x_annotation(tmp_path):
    _write_mex(tmp_path / "filtered_matrices_mex" / "hg19", [[1, 0], [0, 3]], ["AC-1", "GT-1"], ["E1", "E2"])
    annotation = pd.DataFrame({"barcodes": ["GT-1", "AC-1"], "celltype": ["CD14+ Mono", "NK"]})
    annotation.to_csv(tmp_path / "68k_pbmc_barcodes_annotation.tsv", sep="\t", index=False)
    adata = od.read_pbmc68k(tmp_path)
    assert adata.var_names.tolist() == ["SYME1", "SYME2"]
    assert adata.obs["cell_type"].tolist() == ["NK", "CD14+ Mono"]
    assert adata.X.toarray().tolist() == [[1, 0], [0, 3]]


def test_xin_concatenates_samples_drops_ensg_rows_and_requires_labels(tmp_path):
    _write_mex(tmp_path, [[1, 2, 0]], ["AA-1"], ["INS", "ENSG01", "GCG"], prefix="GSM1_a_b_", gz=True)
    _write_mex(tmp_path, [[0, 0, 4]], ["AA-1"], ["INS", "ENSG01", "GCG"], prefix="GSM2_c_d_", gz=True)
    with pytest.raises(od.ManualDownloadRequired, match="xin_labels.tsv"):
        od.read_xin(tmp_path)
    pd.DataFrame({"barcode": ["GSM2_c_d:AA-1", "GSM1_a_b:AA-1"], "cell_type": ["alpha", "beta"]}).to_csv(
        tmp_path / "xin_labels.tsv", sep="\t", index=False
    )
    adata = od.read_xin(tmp_path)
    # genes.tsv column 0 is used (as the original notebook does), hence raw names
    assert adata.var_names.tolist() == ["INS", "GCG"]
    assert adata.obs["cell_type"].tolist() == ["beta", "alpha"]
    assert adata.X.toarray().tolist() == [[1, 0], [0, 4]]


def _gse117872_files(folder, tpm):
    _gz(folder / "GSE117872_good_Data_TPM.txt.gz", f"gene\tc1\tc2\nA\t{tpm}\t0\nB\t1\t4\n")
    _gz(
        folder / "GSE117872_good_Data_cellinfo.txt.gz",
        "groups\tcluster\torigin\nc1\tSensitive\tHN120P\nc2\tResistant_holiday\tHN120M\n",
    )


def test_gse117872_refuses_tpm_unless_allowed_and_labels_from_cluster(tmp_path):
    _gse117872_files(tmp_path, "2.6")
    with pytest.raises(ValueError, match="TPM only"):
        od.read_gse117872(tmp_path)
    adata = od.read_gse117872(tmp_path, allow_tpm=True)
    assert adata.obs["drug_response"].tolist() == ["sensitive", "resistant"]
    assert adata.obs["origin"].tolist() == ["HN120P", "HN120M"]
    assert adata.X.toarray().tolist() == [[3, 1], [0, 4]]
    assert adata.layers["tpm"][0, 0] == pytest.approx(2.6)


@pytest.mark.parametrize("cells_in_rows", [True, False])
def test_gse149383_detects_orientation_and_labels_by_condition(tmp_path, cells_in_rows):
    table = pd.DataFrame([[1, 0, 2], [3, 1, 0]], index=["c1", "c2"], columns=["EGFR", "KRAS", "MYC"])
    (table if cells_in_rows else table.T).to_csv(tmp_path / "erl_total_data_2K.csv")
    (tmp_path / "erl_total_2K_meta.csv").write_text("c1,erl_res_day4\nc2,DMSO_day0\n")
    adata = od.read_gse149383(tmp_path)
    assert adata.obs["drug_response"].tolist() == ["resistant", "sensitive"]
    assert adata.var_names.tolist() == ["EGFR", "KRAS", "MYC"]
    assert adata.X.toarray().tolist() == [[1, 0, 2], [3, 1, 0]]


def test_ma2020_maps_comma_barcodes_to_the_celltype_table(tmp_path):
    _gz(
        tmp_path / "GSM4156608_skin.late.anagen.rna.counts.txt.gz",
        "gene\tR1.01,R2.02\tR1.03,R2.04\tR1.05,R2.06\nKrt14\t5\t0\t1\nmt-Co1\t1\t2\t0\n",
    )
    _gz(
        tmp_path / "GSM4156597_skin_celltype.txt.gz",
        "atac.bc\trna.bc\tcelltype\nx\tR1.03.R2.04\tBasal\ny\tR1.01.R2.02\tSpinous\n",
    )
    adata = od.read_ma2020(tmp_path)
    assert adata.obs_names.tolist() == ["R1.01.R2.02", "R1.03.R2.04"]
    assert adata.obs["cell_type"].tolist() == ["Spinous", "Basal"]
    assert adata.X.toarray().tolist() == [[5, 1], [0, 2]]


def test_gse110894_labels_from_the_cellinfo_sheet(tmp_path, monkeypatch):
    info = pd.DataFrame(
        {
            "Plate#": ["P1", None, "P2"],
            "Well position": ["A1=1", "A2=2", "B1=3"],
            "Sample name": ["RESISTANT CELLS", None, "PARENTAL SENSITIVE"],
        }
    )
    labels = od.gse110894_labels(info)
    assert labels.to_dict() == {"P1_A1": "resistant", "P1_A2": "resistant", "P2_B1": "sensitive"}
    _gz(tmp_path / "GSE110894_GeneExpressions.txt.gz", "gene\tP1_A1\tP2_B1\tP9_C1\nMeis1\t4\t0\t1\n")
    (tmp_path / "GSE110894_CellInfo.xlsx").write_bytes(b"")
    monkeypatch.setattr(od.pd, "read_excel", lambda path, header: info)
    adata = od.read_gse110894(tmp_path)
    assert adata.obs["drug_response"].tolist() == ["resistant", "sensitive"]


def test_h5ad_readers_bastidas_ponce_and_mouse_atlas(tmp_path):
    obs = pd.DataFrame({"clusters": ["Beta", "Alpha"]}, index=["a", "b"])
    src = anndata.AnnData(X=sp.csr_matrix([[0.5, 1.0], [1.0, 0.0]]), obs=obs)
    src.var_names = ["Ins1", "Gcg"]
    src.layers["spliced"] = sp.csr_matrix([[2, 0], [0, 7]])
    src.write_h5ad(tmp_path / "endocrinogenesis_day15.h5ad")
    adata = od.read_bastidas_ponce(tmp_path)
    assert adata.obs["cell_type"].tolist() == ["Beta", "Alpha"]
    assert adata.X.toarray().tolist() == [[2, 0], [0, 7]]

    tms = anndata.AnnData(X=sp.csr_matrix([[1, 0], [3, 2]]))
    tms.obs_names, tms.var_names = ["c1", "c2"], ["Cd3e", "Alb"]
    tms.write_h5ad(tmp_path / f"{od._TMS}.h5ad")
    pd.DataFrame({"cell_ontology_class": ["hepatocyte"], "tissue": ["Liver"]}, index=["c2"]).to_csv(
        tmp_path / f"{od._TMS}-metadata.csv"
    )
    adata = od.read_mouse_atlas(tmp_path)
    assert adata.obs_names.tolist() == ["c2"] and adata.obs["organ"].tolist() == ["Liver"]


def test_non_integer_counts_and_unmatched_labels_raise(tmp_path):
    with pytest.raises(ValueError, match="non-integer"):
        od.counts_adata(np.array([[0.5, 1.0]]), ["c"], ["g1", "g2"])
    adata = od.counts_adata(np.array([[1, 2]]), ["c"], ["g1", "g2"])
    with pytest.raises(ValueError, match="No cell matched"):
        od.attach_labels(adata, pd.Series(["x"], index=["other"]), "cell_type")


def test_download_resumes_a_partial_file_and_renames_it(tmp_path, monkeypatch):
    payload = b"0123456789"
    seen = {}

    class Response(io.BytesIO):
        status = 206
        headers = {"Content-Length": "6"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(request, timeout):
        seen["range"] = request.get_header("Range")
        return Response(payload[4:])

    target = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(payload[:4])
    monkeypatch.setattr(od.urllib.request, "urlopen", fake_urlopen)
    assert od.download("https://example.org/f.bin", target) == target
    assert seen["range"] == "bytes=4-" and target.read_bytes() == payload
    assert not (tmp_path / "f.bin.part").exists()


def test_fetch_asks_for_manual_files_and_extract_unpacks_once(tmp_path):
    with pytest.raises(od.ManualDownloadRequired, match="OneDrive"):
        od.fetch(od.REGISTRY["GSE149383"], tmp_path)
    import zipfile

    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("inner/x.txt", "hi")
    folder = od.extract(tmp_path / "a.zip")
    assert od.find_file(folder, "x.txt").read_text() == "hi"
    assert od.extract(tmp_path / "a.zip") == folder


def test_cli_list_and_metadata(capsys):
    od.main(["--list"])
    out = capsys.readouterr().out
    assert all(name in out for name in od.REGISTRY) and "manual download" in out
    adata = od.add_metadata(od.counts_adata(np.array([[1]]), ["c"], ["g"]), od.REGISTRY["GSE110894"])
    assert adata.obs.loc["c", "drug"] == "I-BET-762" and adata.obs.loc["c", "species"] == "mouse"
