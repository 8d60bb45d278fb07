"""Download and preprocess the InstructCell paper's ten datasets from their public sources (needs internet).

The paper's "Data availability" section and the InstructCell README list the same ten datasets. Each
:class:`OriginalDataset` entry names the files to download, a reader for their exact layout, the label
source, the obs metadata, and what could not be verified offline. :func:`prepare` downloads the files
(resumable ``.part`` files, progress bars), reads them into an AnnData with raw integer counts and the obs
schema the builder needs (``cell_type`` or ``drug_response``, ``species``, ``tissue``,
``sequencing_method``, ``drug``), runs :func:`~datasets_builder.preprocessing.preprocess_dataset` and writes
``<root>/<name>.h5ad``::

    python -m datasets_builder.original_datasets --list
    python -m datasets_builder.original_datasets --dataset Ma-2020 --root data/original

The file is long because it is a registry: one reader per paper dataset, each for its own file layout.
Not run in CI. See docs/data.md ("The paper's datasets") for sources, verification and caveats.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from instructcell.tasks import get_task

from .anndata_source import check_raw_counts

logger = logging.getLogger(__name__)

GEO_FILE = "https://www.ncbi.nlm.nih.gov/geo/download/?acc={acc}&file={file}&format=file"
GEO_SERIES_TAR = "https://www.ncbi.nlm.nih.gov/geo/download/?acc={acc}&format=file"


def geo_file(acc: str, file: str) -> str:
    """Download URL of one GEO supplementary file (series ``GSE...`` or sample ``GSM...``)."""
    return GEO_FILE.format(acc=acc, file=file)


class ManualDownloadRequired(RuntimeError):
    """A source has no direct download URL; the message says where to get the file and where to put it."""


# --------------------------------------------------------------------------------------------------------
# Downloading and finding files
# --------------------------------------------------------------------------------------------------------


def download(url: str, path: Path, chunk_size: int = 1 << 20, timeout: float = 600) -> Path:
    """Download ``url`` to ``path`` unless it exists; resumable.

    Bytes go to ``<path>.part``; an interrupted download resumes from its size with an HTTP ``Range``
    request (restarting when the server ignores it), and the file is renamed to ``path`` when complete.
    """
    if path.exists():
        return path
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = done > 0 and response.status == 206
        if not resumed:
            done = 0
        length = response.headers.get("Content-Length")
        total = int(length) + done if length else None
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=path.name) as bar,
        ):
            while chunk := response.read(chunk_size):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(part, path)
    return path


def extract(path: Path) -> Path:
    """Unpack a ``.tar``/``.tar.gz``/``.zip`` archive into ``<stem>_extracted`` (once); return that folder.

    Other files are returned unchanged. Extraction goes to a ``.part`` folder first, then is renamed.
    """
    if not (tarfile.is_tarfile(path) or zipfile.is_zipfile(path)):
        return path
    target = path.with_name(path.name.split(".")[0] + "_extracted")
    if not target.exists():
        tmp = target.with_name(target.name + ".part")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                archive.extractall(tmp)
        else:
            with tarfile.open(path) as archive:
                archive.extractall(tmp, filter="data")
        os.replace(tmp, target)
    return target


def find_file(folder: Path, pattern: str) -> Path:
    """Return the first file under ``folder`` (recursive) whose name matches the glob ``pattern``."""
    direct = folder / pattern
    if direct.exists():
        return direct
    matches = sorted(p for p in folder.rglob(pattern) if not p.name.endswith(".part"))
    if not matches:
        raise ValueError(
            f"No file matching {pattern!r} under {folder}: the source layout changed or the download is "
            "incomplete; update the dataset entry in REGISTRY."
        )
    return matches[0]


def open_text(path: Path):
    """Open a text file, gzip-compressed or not (detected from the magic bytes)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt") if gz else open(path)


# --------------------------------------------------------------------------------------------------------
# Generic readers
# --------------------------------------------------------------------------------------------------------


def counts_adata(
    X, obs_names, var_names, labels: pd.Series | None = None, label_key: str = "cell_type"
) -> anndata.AnnData:
    """Cells x genes AnnData with CSR int32 counts; checks raw integer counts; attaches ``labels`` by name."""
    X = sp.csr_matrix(X)
    check_raw_counts(X.data, "The source count matrix")
    adata = anndata.AnnData(X=X.astype(np.int32))
    adata.obs_names = pd.Index(np.asarray(obs_names, dtype=str))
    adata.var_names = pd.Index(np.asarray(var_names, dtype=str))
    adata.var_names_make_unique()
    if labels is not None:
        adata = attach_labels(adata, labels, label_key)
    return adata


def attach_labels(adata: anndata.AnnData, labels: pd.Series, label_key: str) -> anndata.AnnData:
    """Put ``labels`` (indexed by cell name) into ``obs[label_key]``; drop cells without a label."""
    labels = labels[~labels.index.duplicated()]
    labels.index = labels.index.astype(str)
    values = labels.reindex(adata.obs_names).to_numpy()
    keep = pd.notna(values)
    if not keep.any():
        raise ValueError(
            f"No cell matched a label (cells e.g. {list(adata.obs_names[:3])}, label table e.g. "
            f"{list(labels.index[:3])}): the barcode format changed; fix the reader."
        )
    adata = adata[keep].copy()
    adata.obs[label_key] = pd.Series(values[keep], index=adata.obs_names).astype(str)
    return adata


def read_dense_table(path: Path, sep: str = "\t", genes_in_rows: bool = True, **kwargs) -> anndata.AnnData:
    """Read a dense text matrix whose first column holds row names (genes or cells)."""
    with open_text(path) as f:
        table = pd.read_csv(f, sep=sep, index_col=0, **kwargs)
    values = table.to_numpy()
    if genes_in_rows:
        return counts_adata(values.T, table.columns, table.index)
    return counts_adata(values, table.index, table.columns)


def read_mtx_triplet(matrix: Path, barcodes: Path, genes: Path, gene_column: int = 1) -> anndata.AnnData:
    """Read a 10x MEX triplet (``matrix.mtx`` genes x cells, ``barcodes.tsv``, ``genes.tsv``), gz or not."""
    with open(matrix, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    with gzip.open(matrix) if gz else open(matrix, "rb") as f:
        X = scipy.io.mmread(f)
    with open_text(barcodes) as f:
        cells = pd.read_csv(f, sep="\t", header=None)[0]
    with open_text(genes) as f:
        table = pd.read_csv(f, sep="\t", header=None)
    names = table[gene_column if table.shape[1] > gene_column else 0]
    return counts_adata(sp.csr_matrix(X).T, cells, names)


# --------------------------------------------------------------------------------------------------------
# Dataset-specific readers: each takes the dataset's raw folder and returns raw counts + labels
# --------------------------------------------------------------------------------------------------------


def read_segerstolpe(folder: Path) -> anndata.AnnData:
    """E-MTAB-5061: ``pancreas_refseq_rpkms_counts_3514sc.txt`` + SDRF cell types.

    Layout (E-MTAB-5061 IDF): the first line is ``#samples`` followed by the N sample ids; every other line
    is gene symbol, RefSeq id, N RPKM values, then N read counts, tab-separated. Only the counts are kept.
    Labels: SDRF ``Characteristics[cell type]``, matched on whichever of ``Source Name`` /
    ``Extract Name`` / ``Assay Name`` holds the sample ids (" cell" suffix removed).
    """
    with open_text(find_file(folder, "pancreas_refseq_rpkms_counts_*.txt*")) as f:
        header = f.readline().rstrip("\n").split("\t")
        if not header[0].startswith("#samples"):
            raise ValueError(f"Expected a '#samples' header line, got {header[0]!r}.")
        samples = header[1:]
        n = len(samples)
        genes, rows = [], []
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2 + 2 * n:
                raise ValueError(f"Expected {2 + 2 * n} fields (symbol, refseq, {n} RPKMs, {n} counts).")
            genes.append(fields[0])
            rows.append(np.asarray(fields[2 + n :], dtype=np.float64))
    X = sp.csr_matrix(np.vstack(rows).T) if rows else sp.csr_matrix((n, 0))
    with open_text(find_file(folder, "E-MTAB-5061.sdrf.txt")) as f:
        sdrf = pd.read_csv(f, sep="\t", dtype=str)
    labels = segerstolpe_labels(sdrf, samples)
    return counts_adata(X, samples, genes, labels)


def segerstolpe_labels(sdrf: pd.DataFrame, samples: list[str]) -> pd.Series:
    """Cell types from an E-MTAB-5061 SDRF table, indexed by the sample ids of the matrix header."""
    label_col = next(
        (c for c in sdrf.columns if c.replace(" ", "").lower() == "characteristics[celltype]"), None
    )
    if label_col is None:
        raise ValueError("SDRF has no 'Characteristics[cell type]' column.")
    wanted = set(samples)
    id_cols = [c for c in ("Source Name", "Extract Name", "Assay Name") if c in sdrf.columns]
    if not id_cols:
        raise ValueError("SDRF has none of 'Source Name', 'Extract Name', 'Assay Name'.")
    best = max(id_cols, key=lambda c: sdrf[c].isin(wanted).sum())
    labels = sdrf[label_col].str.replace(r" cell$", "", regex=True)
    return pd.Series(labels.to_numpy(), index=sdrf[best].to_numpy())


def read_he2020_liver(folder: Path) -> anndata.AnnData:
    """GSE159929 liver counts (CSV, genes x cells) + bei-lab/scRNA-AHCA annotation.

    The annotation's first column is ``<Tissue>_cDNA_<barcode>``; the liver rows are matched to the
    counts' barcodes, and ``Cell_type_in_each_tissue`` is the label.
    """
    adata = read_dense_table(find_file(folder, "*_Liver_Counts.csv*"), sep=",")
    with open_text(find_file(folder, "Annotation_AHCA_alltissues_meta.data_*_cell.txt")) as f:
        meta = pd.read_csv(f, sep="\t", index_col=0)
    return attach_labels(adata, he2020_labels(meta, "Liver"), "cell_type")


def he2020_labels(meta: pd.DataFrame, tissue: str) -> pd.Series:
    """Labels of one tissue from the AHCA annotation, indexed by plain barcode."""
    prefix = f"{tissue}_cDNA_"
    rows = meta[meta.index.astype(str).str.startswith(prefix)]
    return pd.Series(
        rows["Cell_type_in_each_tissue"].to_numpy(), index=rows.index.astype(str).str[len(prefix) :]
    )


def read_pbmc68k(folder: Path) -> anndata.AnnData:
    """10x ``fresh_68k_pbmc_donor_a`` filtered matrices (MEX, hg19) + the 10x paper's cell-type annotation."""
    mex = find_file(folder, "hg19")
    adata = read_mtx_triplet(mex / "matrix.mtx", mex / "barcodes.tsv", mex / "genes.tsv")
    with open_text(find_file(folder, "68k_pbmc_barcodes_annotation.tsv")) as f:
        meta = pd.read_csv(f, sep="\t")
    return attach_labels(adata, pd.Series(meta["celltype"].to_numpy(), index=meta["barcodes"]), "cell_type")


def read_xin(folder: Path) -> anndata.AnnData:
    """GSE114297: per-sample 10x triplets ``<GSM>_<a>_<b>_{matrix.mtx,barcodes.tsv,genes.tsv}.gz``.

    GEO ships no per-cell labels for this series. Put a two-column table ``xin_labels.tsv``
    (``barcode``, ``cell_type``; barcodes as ``<GSM prefix>:<barcode>``) in the raw folder.
    """
    parts = []
    for matrix in sorted(folder.rglob("GSM*_matrix.mtx*")):
        prefix = matrix.name.split("_matrix.mtx")[0]
        part = read_mtx_triplet(
            matrix,
            find_file(matrix.parent, f"{prefix}_barcodes.tsv*"),
            find_file(matrix.parent, f"{prefix}_genes.tsv*"),
            gene_column=0,
        )
        part.obs_names = [f"{prefix}:{bc}" for bc in part.obs_names]
        parts.append(part)
    if not parts:
        raise ValueError(f"No GSM*_matrix.mtx* file under {folder}.")
    adata = anndata.concat(parts, join="outer")
    adata.X = sp.csr_matrix(adata.X).astype(np.int32)
    keep = ~adata.var_names.str.startswith(("ENSG", "chromosome"))
    adata = adata[:, keep].copy()
    labels_path = folder / "xin_labels.tsv"
    if not labels_path.exists():
        raise ManualDownloadRequired(
            f"Xin-2016 (GSE114297) has no cell-type labels on GEO. Write {labels_path} with columns "
            "'barcode' ('<GSM prefix>:<barcode>') and 'cell_type', then rerun."
        )
    table = pd.read_csv(labels_path, sep="\t")
    return attach_labels(adata, pd.Series(table["cell_type"].to_numpy(), index=table["barcode"]), "cell_type")


def read_gse117872(folder: Path, allow_tpm: bool = False) -> anndata.AnnData:
    """GSE117872 (Sharma 2018): ``good_Data_TPM`` (genes x cells) + ``good_Data_cellinfo`` labels.

    GEO and scDEAL publish TPM values only, no counts. Without ``allow_tpm`` this raises; with it, X holds
    rounded TPMs (a documented deviation) and ``layers['tpm']`` the originals. Label: ``resistant`` when the
    cellinfo ``cluster`` contains "Resistant", else ``sensitive`` (scDEAL's rule); ``origin`` is kept.
    """
    with open_text(find_file(folder, "GSE117872_good_Data_TPM.txt*")) as f:
        table = pd.read_csv(f, sep="\t", index_col=0)
    values = table.to_numpy(dtype=np.float64).T
    if not np.all(np.mod(values, 1) == 0) and not allow_tpm:
        raise ValueError(
            "GSE117872 is published as TPM only (GEO and scDEAL); there are no raw counts to download. Pass "
            "allow_tpm=True (CLI --allow-tpm) to use rounded TPMs as pseudo-counts, a deviation from "
            "raw-count training."
        )
    with open_text(find_file(folder, "GSE117872_good_Data_cellinfo.txt*")) as f:
        info = pd.read_csv(f, sep="\t", index_col="groups")
    adata = counts_adata(np.rint(values), table.columns, table.index)
    adata.layers["tpm"] = sp.csr_matrix(values)
    adata.obs["origin"] = info["origin"].reindex(adata.obs_names).astype(str).to_numpy()
    adata = attach_labels(adata, gse117872_labels(info), "drug_response")
    adata.uns["counts_kind"] = "rounded TPM (GSE117872 has no public raw counts)"
    return adata


def gse117872_labels(info: pd.DataFrame) -> pd.Series:
    """``resistant`` / ``sensitive`` from the cellinfo ``cluster`` column (indexed by cell id)."""
    cluster = info["cluster"].astype(str)
    return pd.Series(np.where(cluster.str.contains("Resistant"), "resistant", "sensitive"), index=info.index)


def read_gse149383(folder: Path) -> anndata.AnnData:
    """Read scDEAL's GSE149383 files: ``erl_total_data_2K.csv`` + ``erl_total_2K_meta.csv`` (no header).

    The meta file's first column is the cell id, the second its condition; ``resistant`` when the condition
    contains "res", else ``sensitive`` (scDEAL's rule). The matrix orientation is detected from which axis
    holds the meta's cell ids.
    """
    with open_text(find_file(folder, "erl_total_2K_meta.csv")) as f:
        meta = pd.read_csv(f, header=None, index_col=0)
    with open_text(find_file(folder, "erl_total_data_2K.csv")) as f:
        table = pd.read_csv(f, index_col=0)
    labels = gse149383_labels(meta)
    cells_in_rows = table.index.astype(str).isin(labels.index).sum() > table.columns.isin(labels.index).sum()
    if cells_in_rows:
        adata = counts_adata(table.to_numpy(), table.index, table.columns)
    else:
        adata = counts_adata(table.to_numpy().T, table.columns, table.index)
    return attach_labels(adata, labels, "drug_response")


def gse149383_labels(meta: pd.DataFrame) -> pd.Series:
    """``resistant`` / ``sensitive`` from the first value column of scDEAL's ``erl_total_2K_meta.csv``."""
    condition = meta.iloc[:, 0].astype(str)
    labels = np.where(condition.str.contains("res"), "resistant", "sensitive")
    return pd.Series(labels, index=meta.index.astype(str))


def read_ma2020(folder: Path) -> anndata.AnnData:
    """GSE140203 SHARE-seq skin: RNA UMI counts (genes x cells, ``gene`` column) + the authors' cell types.

    RNA barcodes use commas (``R1.01,R2.02,...``) where the cell-type table (``rna.bc``) uses dots.
    """
    adata = read_dense_table(find_file(folder, "GSM4156608_skin.late.anagen.rna.counts.txt*"))
    adata.obs_names = [bc.replace(",", ".") for bc in adata.obs_names]
    with open_text(find_file(folder, "GSM4156597_skin_celltype.txt*")) as f:
        meta = pd.read_csv(f, sep="\t")
    return attach_labels(adata, pd.Series(meta["celltype"].to_numpy(), index=meta["rna.bc"]), "cell_type")


def read_bastidas_ponce(folder: Path) -> anndata.AnnData:
    """Read scVelo's ``endocrinogenesis_day15.h5ad`` (GSE132188, E15.5): spliced counts, ``clusters``."""
    src = anndata.read_h5ad(find_file(folder, "endocrinogenesis_day15.h5ad"))
    X = src.layers["spliced"] if "spliced" in src.layers else src.X
    adata = counts_adata(X, src.obs_names, src.var_names)
    return attach_labels(adata, src.obs["clusters"].astype(str), "cell_type")


def read_gse110894(folder: Path) -> anndata.AnnData:
    """GSE110894 (Bell 2019, CEL-seq2): gene x cell expression table + ``GSE110894_CellInfo.xlsx``.

    Cell ids are ``<Plate#>_<well>`` (the well position before "="), as scDEAL builds them; label
    ``resistant`` when ``Sample name`` contains "RESISTANT", else ``sensitive``. Needs ``openpyxl``.
    """
    adata = read_dense_table(find_file(folder, "GSE110894_*.txt*"))
    info = pd.read_excel(find_file(folder, "GSE110894_CellInfo.xlsx"), header=3)
    return attach_labels(adata, gse110894_labels(info), "drug_response")


def gse110894_labels(info: pd.DataFrame) -> pd.Series:
    """Labels from the CellInfo sheet (header on its 4th row; merged cells forward-filled)."""
    info = info.dropna(how="all").ffill()
    wells = info["Well position"].astype(str).str.split("=").str[0].str.strip()
    index = info["Plate#"].astype(str).str.strip() + "_" + wells
    labels = np.where(info["Sample name"].astype(str).str.contains("RESISTANT"), "resistant", "sensitive")
    return pd.Series(labels, index=index.to_numpy())


def read_mouse_atlas(folder: Path) -> anndata.AnnData:
    """GSM4505404 (Tabula Muris Senis droplet, raw object) + its metadata CSV (``cell_ontology_class``)."""
    src = anndata.read_h5ad(find_file(folder, "GSM4505404_*raw-obj.h5ad*"))
    with open_text(find_file(folder, "GSM4505404_*metadata.csv*")) as f:
        meta = pd.read_csv(f, index_col=0)
    adata = counts_adata(src.X, src.obs_names, src.var_names)
    adata = attach_labels(adata, meta["cell_ontology_class"], "cell_type")
    if "tissue" in meta:
        adata.obs["organ"] = meta["tissue"].reindex(adata.obs_names).astype(str).to_numpy()
    return adata


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OriginalDataset:
    """One paper dataset: where it lives, how to read it, and what is known about it.

    Parameters
    ----------
    name, task
        Paper name and task name (:mod:`instructcell.tasks`).
    species, tissue, sequencing_method, drug
        Metadata written to ``obs`` (``drug`` only for DSP).
    source
        The landing page the paper / README cites.
    files
        Local file name -> download URL. An empty URL means there is no direct link (see ``manual``).
    reader
        ``reader(raw_folder) -> AnnData`` with raw integer counts and the label column.
    verified, caveats
        How the URLs and layout were checked, and the known deviations; shown by ``--list`` and in docs.
    manual
        How to obtain files that have no direct URL.
    """

    name: str
    task: str
    species: str
    tissue: str
    sequencing_method: str
    source: str
    files: dict[str, str]
    reader: Callable[[Path], anndata.AnnData] = field(compare=False)
    drug: str = ""
    verified: str = field(default="", compare=False)
    caveats: str = field(default="", compare=False)
    manual: str = field(default="", compare=False)

    @property
    def label_key(self) -> str:
        """Column the builder reads: the task's ``label_key``."""
        return get_task(self.task).label_key


_AHCA = (
    "https://raw.githubusercontent.com/bei-lab/scRNA-AHCA/master/"
    "Cell_barcode_and_corresponding_cell_types_of_AHCA/Annotation_AHCA_alltissues_meta.data_84363_cell.txt"
)
_TMS = "GSM4505404_tabula-muris-senis-droplet-official-raw-obj"

REGISTRY: dict[str, OriginalDataset] = {
    d.name: d
    for d in [
        OriginalDataset(
            "Xin-2016",
            "cta",
            "human",
            "pancreas",
            "10x Genomics Chromium",
            source="https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE114297",
            files={"GSE114297_RAW.tar": GEO_SERIES_TAR.format(acc="GSE114297")},
            reader=read_xin,
            verified="Layout from InstructCell HumanUnified.ipynb (per-GSM mtx/barcodes/genes, "
            "ENSG/chromosome rows dropped).",
            caveats="GEO has no per-cell labels; the original notebook's label source could not be read "
            "offline. Supply xin_labels.tsv.",
            manual="Write raw/Xin-2016/xin_labels.tsv (barcode, cell_type).",
        ),
        OriginalDataset(
            "Segerstolpe-2016",
            "cta",
            "human",
            "pancreas",
            "Smart-seq2",
            source="https://www.ebi.ac.uk/biostudies/arrayexpress/studies/E-MTAB-5061",
            files={
                "E-MTAB-5061.processed.1.zip": "https://www.ebi.ac.uk/biostudies/files/E-MTAB-5061/"
                "E-MTAB-5061.processed.1.zip",
                "E-MTAB-5061.sdrf.txt": "https://www.ebi.ac.uk/biostudies/files/E-MTAB-5061/E-MTAB-5061.sdrf.txt",
            },
            reader=read_segerstolpe,
            verified="File names and RPKM|counts column layout from hemberg-lab/scRNA.seq.datasets and other "
            "public scripts; BioStudies /files/ URL pattern not fetched.",
            caveats="Cells are not filtered on the SDRF quality column.",
        ),
        OriginalDataset(
            "He-2020-Liver",
            "cta",
            "human",
            "liver",
            "HiSeq X Ten System",
            source="https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE159929",
            files={
                "GSM4850582_Liver_Counts.csv.gz": geo_file("GSM4850582", "GSM4850582_Liver_Counts.csv.gz"),
                "Annotation_AHCA_alltissues_meta.data_84363_cell.txt": _AHCA,
            },
            reader=read_he2020_liver,
            verified="GSM4850582_Liver_Counts.csv.gz and the AHCA annotation path seen in public scripts; "
            "sequencing method from InstructCell's demo h5ad.",
        ),
        OriginalDataset(
            "PBMC68K",
            "cpcg",
            "human",
            "peripheral blood",
            "10x Genomics GemCode",
            source="https://figshare.com/s/49b29cb24b27ec8b6d72",
            files={
                "fresh_68k_pbmc_donor_a_filtered_gene_bc_matrices.tar.gz": "https://cf.10xgenomics.com/samples/"
                "cell-exp/1.1.0/fresh_68k_pbmc_donor_a/fresh_68k_pbmc_donor_a_filtered_gene_bc_matrices.tar.gz",
                "68k_pbmc_barcodes_annotation.tsv": "https://raw.githubusercontent.com/10XGenomics/"
                "single-cell-3prime-paper/master/pbmc68k_analysis/68k_pbmc_barcodes_annotation.tsv",
            },
            reader=read_pbmc68k,
            verified="Annotation URL and columns (barcodes, celltype) seen in several public loaders; 10x "
            "tarball name seen in public scripts.",
            caveats="The paper's copy is a private Figshare link; this is its 10x origin, not the same file.",
        ),
        OriginalDataset(
            "GSE117872",
            "dsp",
            "human",
            "oral squamous cell carcinoma cell lines",
            "Fluidigm C1",
            drug="Cisplatin",
            source="https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE117872",
            files={
                "GSE117872_good_Data_TPM.txt.gz": geo_file("GSE117872", "GSE117872_good_Data_TPM.txt.gz"),
                "GSE117872_good_Data_cellinfo.txt.gz": geo_file(
                    "GSE117872", "GSE117872_good_Data_cellinfo.txt.gz"
                ),
            },
            reader=read_gse117872,
            verified="File names and label rule from scDEAL (DATA_MAP, process_117872).",
            caveats="TPM only, no public raw counts: prepare() raises unless --allow-tpm (rounded TPMs).",
        ),
        OriginalDataset(
            "GSE149383",
            "dsp",
            "human",
            "lung adenocarcinoma cell line PC9",
            "Drop-seq",
            drug="Erlotinib",
            source="https://github.com/OSU-BMBL/scDEAL",
            files={"erl_total_data_2K.csv": "", "erl_total_2K_meta.csv": ""},
            reader=read_gse149383,
            verified="File names and label rule from scDEAL (DATA_MAP, process_149383); the files are not in "
            "the GitHub repository, only in scDEAL.zip on OneDrive.",
            caveats="No direct URL; count integrality is checked at read time.",
            manual="Download scDEAL.zip from the scDEAL README (OneDrive link), copy "
            "data/GSE149383/erl_total_data_2K.csv and erl_total_2K_meta.csv to raw/GSE149383/.",
        ),
        OriginalDataset(
            "Ma-2020",
            "cta",
            "mouse",
            "skin",
            "SHARE-seq",
            source="https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE140203",
            files={
                "GSM4156608_skin.late.anagen.rna.counts.txt.gz": geo_file(
                    "GSM4156608", "GSM4156608_skin.late.anagen.rna.counts.txt.gz"
                ),
                "GSM4156597_skin_celltype.txt.gz": geo_file("GSM4156597", "GSM4156597_skin_celltype.txt.gz"),
            },
            reader=read_ma2020,
            verified="File names, comma->dot barcodes and rna.bc/celltype columns from InstructCell "
            "MouseUnified.ipynb and public SHARE-seq scripts.",
        ),
        OriginalDataset(
            "Bastidas-Ponce-2019",
            "cta",
            "mouse",
            "pancreas",
            "10x Genomics Chromium",
            source="https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE132188",
            files={
                "endocrinogenesis_day15.h5ad": "https://github.com/theislab/scvelo_notebooks/raw/master/data/"
                "Pancreas/endocrinogenesis_day15.h5ad"
            },
            reader=read_bastidas_ponce,
            verified="URL cited by two R packages' data docs; same 3,696 cells as ../shared's copy.",
            caveats="scVelo's E15.5 subset of GSE132188 (spliced counts), not GEO's all-days h5ad.",
        ),
        OriginalDataset(
            "GSE110894",
            "dsp",
            "mouse",
            "bone marrow (MLL-AF9 leukaemia cells)",
            "CEL-seq2",
            drug="I-BET-762",
            source="https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE110894",
            files={"GSE110894_RAW.tar": GEO_SERIES_TAR.format(acc="GSE110894")},
            reader=read_gse110894,
            verified="CellInfo sheet layout and label rule from scDEAL (process_110894).",
            caveats="GEO supplementary file names not verified offline; needs openpyxl.",
            manual="If the series tar lacks them, download GSE110894's expression table and "
            "GSE110894_CellInfo.xlsx from the GEO page into raw/GSE110894/.",
        ),
        OriginalDataset(
            "Mouse-Atlas",
            "cpcg",
            "mouse",
            "multiple organs",
            "10x Genomics Chromium",
            source="https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSM4505404",
            files={
                f"{_TMS}.h5ad": geo_file("GSM4505404", f"{_TMS}.h5ad"),
                f"{_TMS}-metadata.csv": geo_file("GSM4505404", f"{_TMS}-metadata.csv"),
            },
            reader=read_mouse_atlas,
            verified="File names from several public scripts reading GSM4505404 "
            "(Tabula Muris Senis droplet).",
            caveats="Large (~245k cells); the original's cell subset could not be read offline.",
        ),
    ]
}


# --------------------------------------------------------------------------------------------------------
# Pipeline and CLI
# --------------------------------------------------------------------------------------------------------


def add_metadata(adata: anndata.AnnData, spec: OriginalDataset) -> anndata.AnnData:
    """Write ``species``, ``tissue``, ``sequencing_method`` and ``drug`` into ``obs``."""
    for key in ("species", "tissue", "sequencing_method", "drug"):
        adata.obs[key] = getattr(spec, key)
    return adata


def fetch(spec: OriginalDataset, raw: Path) -> None:
    """Download (resumably) and unpack the dataset's files into ``raw``."""
    for file, url in spec.files.items():
        path = raw / file
        if not url:
            if not path.exists():
                raise ManualDownloadRequired(f"{spec.name}: {file} has no direct URL. {spec.manual}")
            continue
        extract(download(url, path))


def prepare(
    name: str,
    root: str | os.PathLike,
    orthologs: dict[str, str] | None = None,
    allow_tpm: bool = False,
    preprocess: bool = True,
) -> Path:
    """Download, read, label and preprocess one dataset; return the written ``<root>/<name>.h5ad``."""
    from .preprocessing import preprocess_dataset

    spec = REGISTRY[name]
    root = Path(root)
    raw = root / "raw" / name
    fetch(spec, raw)
    adata = read_gse117872(raw, allow_tpm=allow_tpm) if name == "GSE117872" else spec.reader(raw)
    adata = add_metadata(adata, spec)
    if preprocess:
        adata = preprocess_dataset(
            adata,
            spec.species,
            spec.label_key,
            drop_rare_labels=get_task(spec.task).drop_rare_labels,
            orthologs=orthologs,
        )
    out = root / f"{name}.h5ad"
    adata.write_h5ad(out, compression="gzip")
    return out


def describe(spec: OriginalDataset) -> str:
    """One block of ``--list`` output."""
    lines = [f"{spec.name}  [{spec.task}, {spec.species}, {spec.tissue}, {spec.sequencing_method}]"]
    lines.append(f"  source:   {spec.source}")
    lines += [f"  file:     {file}  <- {url or 'manual download'}" for file, url in spec.files.items()]
    for label, text in (("verified", spec.verified), ("caveats", spec.caveats), ("manual", spec.manual)):
        if text:
            lines.append(f"  {label + ':':9} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="Describe the datasets and exit.")
    parser.add_argument("--dataset", nargs="+", choices=list(REGISTRY), help="Datasets to prepare.")
    parser.add_argument("--all", action="store_true", help="Prepare every dataset.")
    parser.add_argument("--root", default="data/original", help="Output folder (raw downloads in ROOT/raw).")
    parser.add_argument("--orthologs", help="MGI/BioMart ortholog table, file or URL (default: MGI URL).")
    parser.add_argument("--allow-tpm", action="store_true", help="GSE117872: use rounded TPMs as counts.")
    parser.add_argument("--no-preprocess", action="store_true", help="Write the labelled raw counts only.")
    args = parser.parse_args(argv)
    if args.list:
        print("\n\n".join(describe(spec) for spec in REGISTRY.values()))
        return
    names = list(REGISTRY) if args.all else args.dataset
    if not names:
        parser.error("give --list, --dataset NAME [NAME ...] or --all")
    logging.basicConfig(level=logging.INFO)
    orthologs = None
    if not args.no_preprocess and any(REGISTRY[n].species == "mouse" for n in names):
        from .preprocessing import MGI_ORTHOLOGS_URL, load_ortholog_table

        orthologs = load_ortholog_table(args.orthologs or MGI_ORTHOLOGS_URL)
    for name in names:
        out = prepare(name, args.root, orthologs, allow_tpm=args.allow_tpm, preprocess=not args.no_preprocess)
        logger.info("%s -> %s", name, out)


if __name__ == "__main__":
    main()
