"""Download and preprocess the InstructCell paper's datasets from their public sources (needs internet).

The registry lists the datasets of the InstructCell README (accessions and repositories as given there).
Each entry says where the count matrix and the labels are and how they are laid out; :func:`prepare` downloads
them (cached), builds an AnnData with raw counts and the obs schema the builder expects (label column,
``species``, ``tissue``, ``sequencing_method``, ``drug``), runs :func:`~datasets_builder.preprocessing.preprocess_dataset`
and writes ``<root>/<name>.h5ad``::

    python -m datasets_builder.original_datasets --root data/original --orthologs HOM_MouseHumanSequence.rpt

Not run in CI. File names inside the GEO/ArrayExpress/GitHub archives could not be checked offline when this was
written; if a source moved, fix its ``files`` entry (a ``ValueError`` names the file it expected).
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import shutil
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from .preprocessing import MGI_ORTHOLOGS_URL, load_ortholog_table, preprocess_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OriginalDataset:
    """Where one paper dataset lives and how to read it.

    Parameters
    ----------
    name
        Dataset name (as in the paper).
    task
        ``"cta"``, ``"dsp"`` or ``"cpcg"``.
    species, tissue, sequencing_method, drug
        Metadata written to ``obs``.
    urls
        Files to download: local file name -> URL.
    matrix
        Local file name (inside an extracted archive if needed) of the counts: ``.h5ad``, a 10x ``.mtx`` folder,
        or a delimited text matrix.
    genes_in_rows
        For text matrices: genes are rows (``True``) or columns.
    labels
        ``(file, barcode column, label column)`` for labels in a separate table; empty when the matrix has them.
    label_column
        ``obs`` column holding the label when ``labels`` is empty.
    """

    name: str
    task: str
    species: str
    tissue: str
    sequencing_method: str
    urls: dict[str, str]
    matrix: str
    genes_in_rows: bool = True
    labels: tuple[str, str, str] | tuple[()] = ()
    label_column: str = ""
    drug: str = ""
    notes: str = field(default="", compare=False)

    @property
    def label_key(self) -> str:
        """Column the builder reads: ``drug_response`` for DSP, else ``cell_type``."""
        return "drug_response" if self.task == "dsp" else "cell_type"


GEO = "https://www.ncbi.nlm.nih.gov/geo/download/?acc={acc}&format=file"
GEO_SUPPL = "https://ftp.ncbi.nlm.nih.gov/geo/series/{stub}nnn/{acc}/suppl/{file}"


def geo_suppl(acc: str, file: str) -> str:
    """URL of a series-level GEO supplementary file."""
    return GEO_SUPPL.format(stub=acc[:-3], acc=acc, file=file)


REGISTRY: dict[str, OriginalDataset] = {
    d.name: d
    for d in [
        OriginalDataset(
            "Segerstolpe-2016",
            "cta",
            "human",
            "pancreas",
            "Smart-seq2",
            urls={
                "E-MTAB-5061.processed.1.zip": "https://www.ebi.ac.uk/biostudies/files/E-MTAB-5061/E-MTAB-5061.processed.1.zip",
                "E-MTAB-5061.sdrf.txt": "https://www.ebi.ac.uk/biostudies/files/E-MTAB-5061/E-MTAB-5061.sdrf.txt",
            },
            matrix="pancreas_refseq_rpkms_counts_3514sc.txt",
            labels=("E-MTAB-5061.sdrf.txt", "Source Name", "Characteristics[cell type]"),
            notes="UNVERIFIED layout: the text file holds RPKMs and counts side by side; check read_matrix's output.",
        ),
        OriginalDataset(
            "Xin-2016",
            "cta",
            "human",
            "pancreas",
            "10x Genomics Chromium",
            urls={"GSE114297_RAW.tar": GEO.format(acc="GSE114297")},
            matrix="GSE114297_RAW.tar",
            label_column="cell_type",
            notes="Per-sample 10x files; labels from the authors' metadata.",
        ),
        OriginalDataset(
            "He-2020-Liver",
            "cta",
            "human",
            "liver",
            "HiSeq X Ten System",
            urls={
                "GSE159929_RAW.tar": GEO.format(acc="GSE159929"),
                "Annotation_AHCA_alltissues_meta.data_84363_cell.txt": "https://raw.githubusercontent.com/bei-lab/scRNA-AHCA/"
                "master/Cell_barcode_and_corresponding_cell_types_of_AHCA/Annotation_AHCA_alltissues_meta.data_84363_cell.txt",
            },
            matrix="*Liver_Counts.csv.gz",
            labels=(
                "Annotation_AHCA_alltissues_meta.data_84363_cell.txt",
                "Cell_barcode",
                "Cell_type_in_each_tissue",
            ),
        ),
        OriginalDataset(
            "PBMC68K",
            "cpcg",
            "human",
            "peripheral blood",
            "10x Genomics GemCode",
            urls={
                "fresh_68k_pbmc_donor_a_filtered_gene_bc_matrices.tar.gz": "https://cf.10xgenomics.com/samples/cell-exp/"
                "1.1.0/fresh_68k_pbmc_donor_a/fresh_68k_pbmc_donor_a_filtered_gene_bc_matrices.tar.gz",
                "68k_pbmc_barcodes_annotation.tsv": "https://raw.githubusercontent.com/10XGenomics/single-cell-3prime-paper/"
                "master/pbmc68k_analysis/68k_pbmc_barcodes_annotation.tsv",
            },
            matrix="filtered_matrices_mex/hg19",
            labels=("68k_pbmc_barcodes_annotation.tsv", "barcodes", "celltype"),
            notes="The paper's copy is on Figshare (https://figshare.com/s/49b29cb24b27ec8b6d72); this is its 10x origin.",
        ),
        OriginalDataset(
            "GSE117872",
            "dsp",
            "human",
            "oral squamous cell carcinoma cell line",
            "Fluidigm C1",
            drug="Cisplatin",
            urls={
                "GSE117872_good_Data_TPM.txt.gz": geo_suppl("GSE117872", "GSE117872_good_Data_TPM.txt.gz"),
                "GSE117872_good_Data_cellinfo.txt.gz": geo_suppl(
                    "GSE117872", "GSE117872_good_Data_cellinfo.txt.gz"
                ),
            },
            matrix="GSE117872_good_Data_TPM.txt.gz",
            labels=("GSE117872_good_Data_cellinfo.txt.gz", "geo_accession", "cell_color"),
            notes="GEO has TPMs only; raw counts must be requested from the authors or taken from scDEAL's copy.",
        ),
        OriginalDataset(
            "GSE149383",
            "dsp",
            "human",
            "lung adenocarcinoma cell line PC9",
            "Drop-seq",
            drug="Erlotinib",
            urls={
                "erl_total_data_2K.csv": "https://raw.githubusercontent.com/OSU-BMBL/scDEAL/master/data/GSE149383/erl_total_data_2K.csv",
                "erl_total_2K_meta.csv": "https://raw.githubusercontent.com/OSU-BMBL/scDEAL/master/data/GSE149383/erl_total_2K_meta.csv",
            },
            matrix="erl_total_data_2K.csv",
            labels=("erl_total_2K_meta.csv", "", "response"),
        ),
        OriginalDataset(
            "Ma-2020",
            "cta",
            "mouse",
            "skin",
            "SHARE-seq",
            urls={"GSE140203_RAW.tar": GEO.format(acc="GSE140203")},
            matrix="GSE140203_RAW.tar",
            label_column="celltype",
        ),
        OriginalDataset(
            "Bastidas-Ponce-2019",
            "cta",
            "mouse",
            "pancreas",
            "10x Genomics Chromium",
            urls={
                "endocrinogenesis_day15.h5ad": "https://github.com/theislab/scvelo_notebooks/raw/master/data/Pancreas/"
                "endocrinogenesis_day15.h5ad"
            },
            matrix="endocrinogenesis_day15.h5ad",
            label_column="clusters",
            notes="scVelo's copy of GSE132188 (E15.5); X holds spliced counts.",
        ),
        OriginalDataset(
            "GSE110894",
            "dsp",
            "mouse",
            "bone marrow (MLL-AF9 leukaemia cells)",
            "CEL-seq2",
            drug="I-BET-762",
            urls={
                "GSE110894_GeneExpressions.txt.gz": geo_suppl(
                    "GSE110894", "GSE110894_GeneExpressions.txt.gz"
                ),
                "GSE110894_CellInfo.xlsx": geo_suppl("GSE110894", "GSE110894_CellInfo.xlsx"),
            },
            matrix="GSE110894_GeneExpressions.txt.gz",
            labels=("GSE110894_CellInfo.xlsx", "Sample name", "Drug response"),
        ),
        OriginalDataset(
            "Mouse-Atlas",
            "cpcg",
            "mouse",
            "multiple organs",
            "Microwell-seq",
            urls={"GSM4505404.tar": GEO.format(acc="GSM4505404")},
            matrix="GSM4505404.tar",
            label_column="cell_type",
        ),
    ]
}


def download(url: str, path: Path) -> Path:
    """Download ``url`` to ``path`` unless it exists (written to ``path.part`` first, then renamed)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s", url)
    part = path.with_name(path.name + ".part")
    with urllib.request.urlopen(url, timeout=600) as response, open(part, "wb") as f:
        shutil.copyfileobj(response, f)
    os.replace(part, path)
    return path


def extract(path: Path) -> Path:
    """Unpack ``.tar``/``.tar.gz``/``.zip`` archives next to themselves (once); return the folder or the file."""
    if tarfile.is_tarfile(path) or zipfile.is_zipfile(path):
        target = path.with_name(path.name.split(".")[0] + "_extracted")
        if not target.exists():
            tmp = target.with_name(target.name + ".part")
            if zipfile.is_zipfile(path):
                zipfile.ZipFile(path).extractall(tmp)
            else:
                with tarfile.open(path) as tar:
                    tar.extractall(tmp, filter="data")
            os.replace(tmp, target)
        return target
    return path


def find_file(folder: Path, name: str) -> Path:
    """Find the file or folder ``name`` (a glob pattern is allowed) under ``folder``, recursively."""
    direct = folder / name
    if direct.exists():
        return direct
    matches = sorted(folder.rglob(Path(name).name))
    if not matches:
        raise ValueError(f"{name} not found under {folder}: the source layout changed; update REGISTRY.")
    return matches[0]


def read_table(path: Path) -> pd.DataFrame:
    """Read a delimited or Excel table (gzip handled)."""
    if path.suffix in (".xlsx", ".xls"):
        return pd.read_excel(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return pd.read_csv(f, sep=None, engine="python")


def read_matrix(path: Path, genes_in_rows: bool) -> anndata.AnnData:
    """Read counts from an ``.h5ad``, a 10x ``.mtx`` folder or a delimited matrix (first column = names)."""
    if path.suffix == ".h5ad":
        return anndata.read_h5ad(path)
    if path.is_dir():
        return sc.read_10x_mtx(path)
    table = read_table(path)
    table = table.set_index(table.columns[0])
    adata = anndata.AnnData(sp.csr_matrix(table.to_numpy().T if genes_in_rows else table.to_numpy()))
    adata.obs_names = table.columns.astype(str) if genes_in_rows else table.index.astype(str)
    adata.var_names = table.index.astype(str) if genes_in_rows else table.columns.astype(str)
    return adata


def attach_labels(
    adata: anndata.AnnData, spec: OriginalDataset, table: pd.DataFrame | None
) -> anndata.AnnData:
    """Put the label in ``obs[spec.label_key]`` and the metadata columns; drop cells without a label."""
    if table is not None:
        _, barcode_column, label_column = spec.labels
        index = table[barcode_column].astype(str) if barcode_column else table.index.astype(str)
        labels = pd.Series(table[label_column].to_numpy(), index=index)
        labels = labels[~labels.index.duplicated()]
    else:
        if spec.label_column not in adata.obs:
            raise ValueError(
                f"{spec.name}: no obs column {spec.label_column!r}; update REGISTRY[{spec.name!r}]."
            )
        labels = adata.obs[spec.label_column]
    adata = adata.copy()
    adata.obs[spec.label_key] = labels.reindex(adata.obs_names.astype(str)).to_numpy()
    adata = adata[adata.obs[spec.label_key].notna()].copy()
    if adata.n_obs == 0:
        raise ValueError(f"{spec.name}: no cell matched a label; check the barcode column in REGISTRY.")
    adata.obs[spec.label_key] = adata.obs[spec.label_key].astype(str)
    for key in ("species", "tissue", "sequencing_method", "drug"):
        adata.obs[key] = getattr(spec, key)
    adata.var_names_make_unique()
    return adata


def prepare(name: str, root: str | os.PathLike, orthologs: dict[str, str] | None = None) -> Path:
    """Download, read, label and preprocess one dataset; return the written ``<root>/<name>.h5ad``."""
    spec = REGISTRY[name]
    root = Path(root)
    raw = root / "raw" / name
    for file, url in spec.urls.items():
        extract(download(url, raw / file))
    adata = read_matrix(find_file(raw, spec.matrix), spec.genes_in_rows)
    table = read_table(find_file(raw, spec.labels[0])) if spec.labels else None
    adata = attach_labels(adata, spec, table)
    adata = preprocess_dataset(
        adata, spec.species, spec.label_key, drop_rare_labels=spec.task != "dsp", orthologs=orthologs
    )
    out = root / f"{name}.h5ad"
    adata.write_h5ad(out, compression="gzip")
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--names", nargs="+", default=list(REGISTRY))
    parser.add_argument("--orthologs", default=MGI_ORTHOLOGS_URL, help="MGI/BioMart table, file or URL.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    orthologs = (
        load_ortholog_table(args.orthologs)
        if any(REGISTRY[n].species == "mouse" for n in args.names)
        else None
    )
    for name in args.names:
        logger.info("%s -> %s", name, prepare(name, args.root, orthologs))


if __name__ == "__main__":
    main()
