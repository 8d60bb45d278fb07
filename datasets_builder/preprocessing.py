"""Single-cell preprocessing as in the InstructCell paper, with scanpy.

Steps, per dataset: gene symbols wherever the file keeps them (:func:`use_gene_symbols`), quality control
(:func:`quality_control`: cells with < 200 genes, genes in < 8 cells, total-count and mitochondrial-fraction
outliers), mouse genes to human orthologs (:func:`map_mouse_genes`), labels with < 20 cells dropped or
refused (:func:`filter_rare_labels`, :func:`check_label_counts`), highly variable genes on a log-normalized
copy (:func:`highly_variable_genes`, Seurat flavour, top 3,600). The vocabulary is the sorted union of every
dataset's HVGs (:func:`build_gene_vocab`). ``X`` keeps the raw integer counts throughout. What each step did
is recorded in ``adata.uns["preprocessing"]`` (:data:`REPORT_KEY`, a JSON string).
"""

from __future__ import annotations

import io
import json
import logging
import os
import urllib.request
from collections.abc import Iterable, Mapping, Sequence

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from modeling_instructcell.feature_extraction_instructcell import SYMBOL_COLUMNS, gene_identifiers

from .anndata_source import check_gene_names, check_raw_counts

logger = logging.getLogger(__name__)

MGI_ORTHOLOGS_URL = "https://www.informatics.jax.org/downloads/reports/HOM_MouseHumanSequence.rpt"
#: ``adata.uns`` key of the preprocessing report (gene names used, orthologs mapped, cells and labels kept).
REPORT_KEY = "preprocessing"


def _mad_outlier(values: np.ndarray, n_mads: float) -> np.ndarray:
    """Cells further than ``n_mads`` median absolute deviations from the median (none when MAD is 0)."""
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    if mad == 0:
        return np.zeros(values.shape, dtype=bool)
    return np.abs(values - median) > n_mads * mad


def mito_prefix(species: str) -> str:
    """Prefix of mitochondrial gene symbols: ``"MT-"`` (human) or ``"mt-"`` (mouse), case-insensitive."""
    return "mt-" if species.lower() == "mouse" else "MT-"


def quality_control(
    adata: anndata.AnnData,
    species: str,
    min_genes: int = 200,
    min_cells: int = 8,
    n_mads_counts: float = 5.0,
    n_mads_mito: float = 3.0,
    max_pct_mito: float = 20.0,
    min_pct_mito_outlier: float = 5.0,
) -> anndata.AnnData:
    """Filter low-quality cells and rarely detected genes; ``X`` must hold raw counts.

    Parameters
    ----------
    adata
        Cells x genes, raw integer counts in ``X``, gene symbols in ``var_names``.
    species
        ``"human"`` or ``"mouse"`` (chooses the mitochondrial prefix).
    min_genes
        Drop cells with fewer detected genes.
    min_cells
        Drop genes detected in fewer cells.
    n_mads_counts
        Drop cells whose ``log1p(total counts)`` is more than this many MADs from the median.
    n_mads_mito
        Drop cells whose mitochondrial percentage is more than this many MADs above the median and above
        ``min_pct_mito_outlier`` (so that tight, low distributions lose no healthy cells) ...
    max_pct_mito
        ... and every cell above this percentage.
    min_pct_mito_outlier
        See ``n_mads_mito``.

    Returns
    -------
    anndata.AnnData
        A filtered copy; ``obs`` gains ``n_genes_by_counts``, ``total_counts``, ``pct_counts_mt``.
    """
    check_gene_names(adata.var_names, "AnnData")
    data = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X).ravel()
    check_raw_counts(data, "X")
    adata = adata.copy()
    sc.pp.filter_cells(adata, min_genes=min_genes)
    sc.pp.filter_genes(adata, min_cells=min_cells)
    adata.var["mt"] = adata.var_names.str.lower().str.startswith(mito_prefix(species).lower())
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    counts_outlier = _mad_outlier(np.log1p(adata.obs["total_counts"].to_numpy()), n_mads_counts)
    pct_mt = adata.obs["pct_counts_mt"].to_numpy()
    high = _mad_outlier(pct_mt, n_mads_mito) & (pct_mt > np.median(pct_mt)) & (pct_mt > min_pct_mito_outlier)
    mito_outlier = (pct_mt > max_pct_mito) | high
    keep = ~(counts_outlier | mito_outlier)
    logger.info(
        "QC kept %d/%d cells (%d count outliers, %d mito outliers), %d genes",
        keep.sum(),
        keep.size,
        counts_outlier.sum(),
        mito_outlier.sum(),
        adata.n_vars,
    )
    adata = adata[keep].copy()
    adata.var = adata.var.drop(columns=["mt"])
    return adata


def filter_rare_labels(adata: anndata.AnnData, label_key: str, min_cells: int = 20) -> anndata.AnnData:
    """Drop cells whose label has fewer than ``min_cells`` cells (the paper does this for cell types).

    Parameters
    ----------
    adata
        Annotated cells.
    label_key
        ``obs`` column with the labels.
    min_cells
        Minimum number of cells a label needs to be kept.

    Returns
    -------
    anndata.AnnData
        A copy without the rare labels (unused categories removed).
    """
    if label_key not in adata.obs.columns:
        raise ValueError(
            f"No obs column {label_key!r} (columns: {list(adata.obs.columns)}): pass the label column."
        )
    counts = adata.obs[label_key].astype(str).value_counts()
    rare = counts.index[counts < min_cells]
    if len(rare):
        logger.info("Dropping labels with < %d cells: %s", min_cells, dict(counts[rare]))
    adata = adata[~adata.obs[label_key].astype(str).isin(rare)].copy()
    if isinstance(adata.obs[label_key].dtype, pd.CategoricalDtype):
        adata.obs[label_key] = adata.obs[label_key].cat.remove_unused_categories()
    return adata


def check_label_counts(adata: anndata.AnnData, label_key: str, min_cells: int = 20) -> None:
    """Raise a ``ValueError`` naming every label with fewer than ``min_cells`` cells, and how to proceed.

    A label needs cells in the training, validation and test splits to be learned and scored; with a
    handful of cells it is in one split at best. Parameters as :func:`filter_rare_labels`.
    """
    if label_key not in adata.obs.columns:
        raise ValueError(
            f"No obs column {label_key!r} (columns: {list(adata.obs.columns)}): pass the label column."
        )
    counts = adata.obs[label_key].astype(str).value_counts()
    rare = counts[counts < min_cells]
    if len(rare):
        listed = ", ".join(f"{label!r}: {n} cell{'s' * (n != 1)}" for label, n in rare.items())
        raise ValueError(
            f"{len(rare)} label(s) of {label_key!r} have fewer than {min_cells} cells ({listed}): a label "
            "needs cells in the training, validation and test splits. Drop or merge those cells, lower the "
            "bar (--min-cells-per-label / min_cells_per_label), or leave such labels out "
            "(--drop-rare-labels / drop_rare_labels=True)."
        )


def highly_variable_genes(adata: anndata.AnnData, n_top_genes: int = 3600) -> list[str]:
    """Top highly variable genes (Seurat flavour) computed on a log-normalized copy of the raw counts.

    Parameters
    ----------
    adata
        Raw counts in ``X``; not modified.
    n_top_genes
        Number of genes to select; all genes when the dataset has fewer.

    Returns
    -------
    list of str
        The selected gene symbols, in the dataset's order.
    """
    if n_top_genes <= 0:
        raise ValueError(f"n_top_genes must be positive, got {n_top_genes}.")
    if n_top_genes >= adata.n_vars:
        return adata.var_names.astype(str).tolist()
    normalized = anndata.AnnData(X=adata.X.astype(np.float32), var=pd.DataFrame(index=adata.var_names))
    sc.pp.normalize_total(normalized, target_sum=1e4)
    sc.pp.log1p(normalized)
    hvg = sc.pp.highly_variable_genes(normalized, n_top_genes=n_top_genes, flavor="seurat", inplace=False)
    return adata.var_names[hvg["highly_variable"].to_numpy()].astype(str).tolist()


def build_gene_vocab(gene_lists: Iterable[Iterable[str]]) -> list[str]:
    """Union of per-dataset gene lists, sorted so that the vocabulary is reproducible."""
    return sorted({str(g) for genes in gene_lists for g in genes})


def load_ortholog_table(path_or_url: str | os.PathLike = MGI_ORTHOLOGS_URL) -> dict[str, str]:
    """Read a mouse -> human ortholog table.

    Three formats are recognised from the header:

    * MGI ``HOM_MouseHumanSequence.rpt`` / ``HOM_AllOrganism.rpt`` (``DB Class Key``,
      ``Common Organism Name``, ``Symbol``): genes sharing a class key are orthologs;
    * Ensembl BioMart export of mouse genes with ``Gene name`` and ``Human gene name`` columns;
    * any table with ``mouse_symbol`` and ``human_symbol`` columns.

    Parameters
    ----------
    path_or_url
        A local file or an ``http(s)`` URL (downloaded; needs internet). Tab- or comma-separated.

    Returns
    -------
    dict
        Mouse symbol -> human symbol. For one-to-many orthologs the first human gene in the file is kept.
    """
    text_source = str(path_or_url)
    if text_source.startswith(("http://", "https://")):
        with urllib.request.urlopen(text_source, timeout=120) as response:
            table = pd.read_csv(io.BytesIO(response.read()), sep=None, engine="python", dtype=str)
    else:
        table = pd.read_csv(text_source, sep=None, engine="python", dtype=str)
    columns = set(table.columns)
    if {"DB Class Key", "Common Organism Name", "Symbol"} <= columns:
        organism = table["Common Organism Name"].str.lower()
        mouse = table[organism.str.startswith("mouse")][["DB Class Key", "Symbol"]]
        human = table[organism == "human"][["DB Class Key", "Symbol"]].drop_duplicates("DB Class Key")
        pairs = mouse.merge(human, on="DB Class Key", suffixes=("_mouse", "_human"))
        mouse_col, human_col = pairs["Symbol_mouse"], pairs["Symbol_human"]
    elif {"Gene name", "Human gene name"} <= columns:
        pairs = table.dropna(subset=["Gene name", "Human gene name"])
        mouse_col, human_col = pairs["Gene name"], pairs["Human gene name"]
    elif {"mouse_symbol", "human_symbol"} <= columns:
        pairs = table.dropna(subset=["mouse_symbol", "human_symbol"])
        mouse_col, human_col = pairs["mouse_symbol"], pairs["human_symbol"]
    else:
        raise ValueError(
            f"Unrecognised ortholog table {text_source} (columns {sorted(columns)[:8]}): use MGI "
            "HOM_MouseHumanSequence.rpt, a BioMart export with 'Gene name' and 'Human gene name', or a table "
            "with 'mouse_symbol' and 'human_symbol' columns."
        )
    mapping: dict[str, str] = {}
    for m, h in zip(mouse_col.astype(str), human_col.astype(str), strict=True):
        mapping.setdefault(m, h)
    if not mapping:
        raise ValueError(
            f"The ortholog table {text_source} maps no mouse gene: check that it is mouse -> human."
        )
    return mapping


def rename_genes(adata: anndata.AnnData, names: Sequence[str], keep_as: str) -> anndata.AnnData:
    """Give the genes new names; genes that end up with the same name are summed (counts stay integers).

    Parameters
    ----------
    adata
        Cells x genes, raw counts.
    names
        The new name of each gene, length ``n_genes``.
    keep_as
        ``var`` column that keeps each gene's old name (the first one for summed genes).

    Returns
    -------
    anndata.AnnData
        A copy; ``var`` holds only ``keep_as`` when genes were summed.
    """
    old = adata.var_names.astype(str)
    new_index = pd.Index([str(n) for n in names])
    if not new_index.has_duplicates:
        renamed = adata.copy()
        renamed.var[keep_as] = old.to_numpy()
        renamed.var_names = new_index
        return renamed
    codes, uniques = pd.factorize(new_index)
    aggregation = sp.csr_matrix(
        (np.ones(len(codes), dtype=adata.X.dtype), (np.arange(len(codes)), codes)),
        shape=(len(codes), len(uniques)),
    )
    X = sp.csr_matrix(adata.X) @ aggregation
    first = pd.Series(old.to_numpy()).groupby(codes).first().to_numpy()
    logger.info("%d genes summed into %d names", len(codes), len(uniques))
    return anndata.AnnData(
        X=sp.csr_matrix(X), obs=adata.obs.copy(), var=pd.DataFrame({keep_as: first}, index=uniques)
    )


def use_gene_symbols(adata: anndata.AnnData) -> tuple[anndata.AnnData, str]:
    """Name the genes by symbol wherever the file keeps the symbols; the user renames nothing.

    The rules are the feature extractor's
    (:func:`~modeling_instructcell.feature_extraction_instructcell.gene_identifiers`): Ensembl ids in
    ``var_names`` take the symbols of ``var["feature_name"]`` (CELLxGENE), ``var["gene_symbols"]`` (scanpy),
    ``var["gene_name"]``...; composite ``SYMBOL_ENSG...`` names are split; row numbers take a symbol column.
    Ensembl ids without any symbol column stay ids. Genes that share a symbol are summed, as the feature
    extractor sums them at inference.

    Returns
    -------
    adata : anndata.AnnData
        The input itself when ``var_names`` are already distinct symbols, else a renamed copy (old names in
        ``var["original_var_name"]``).
    source : str
        Where the names come from, for the build report (``"var_names"``, ``"var['feature_name']"``...).
    """
    var_names = adata.var_names.astype(str).tolist()
    symbols, ids = gene_identifiers(var_names, adata.var)
    if symbols is None:
        logger.warning(
            "var_names are Ensembl ids and var has no symbol column: the genes keep their ids, so only "
            "data with ids shares genes with them."
        )
        return adata, "var_names (Ensembl ids, no symbol column)"
    n_duplicated = len(symbols) - len(set(symbols))
    if symbols == var_names:
        if not n_duplicated:
            return adata, "var_names"
        source = "var_names"
    else:
        columns = [c for c in SYMBOL_COLUMNS if c in adata.var.columns]
        agree = {
            c: sum(a == b for a, b in zip(adata.var[c].astype(str), symbols, strict=True)) for c in columns
        }
        column = max(agree, key=agree.get) if agree and max(agree.values()) > len(symbols) / 2 else None
        source = f"var[{column!r}]" if column is not None else "var_names (split composite names)"
    if n_duplicated:
        source += f", {n_duplicated} repeated symbols summed"
    logger.info("Gene symbols from %s (var_names are e.g. %s)", source, var_names[:2])
    return rename_genes(adata, symbols, keep_as="original_var_name"), source


def map_mouse_genes(
    adata: anndata.AnnData,
    orthologs: Mapping[str, str] | None = None,
    human_symbols: Iterable[str] | None = None,
) -> anndata.AnnData:
    """Rename mouse genes to their human orthologs; mouse-specific genes keep their mouse symbol.

    Parameters
    ----------
    adata
        Mouse cells x genes (raw counts).
    orthologs
        Mouse symbol -> human symbol (:func:`load_ortholog_table`). When ``None``, symbols are matched
        case-insensitively (a warning is logged): to ``human_symbols`` when given (unmatched genes keep the
        mouse symbol), else every symbol is upper-cased.
    human_symbols
        Human gene symbols to match against in the fallback (e.g. the genes of the human datasets).

    Returns
    -------
    anndata.AnnData
        A copy with renamed genes. Genes that end up with the same symbol are summed (counts stay integers);
        ``var["mouse_symbol"]`` keeps the first original symbol. ``uns["orthologs"]`` holds how many genes
        were mapped (``n_mouse_genes``, ``n_mapped``, ``method``).
    """
    names = adata.var_names.astype(str)
    if orthologs is not None:
        new = [orthologs.get(g, g) for g in names]
        n_mapped = sum(g in orthologs for g in names)
        method = "ortholog table"
        logger.info("Ortholog table mapped %d/%d mouse genes", n_mapped, len(names))
    elif human_symbols is not None:
        upper = {}
        for h in human_symbols:
            upper.setdefault(str(h).upper(), str(h))
        new = [upper.get(g.upper(), g) for g in names]
        n_mapped = sum(g.upper() in upper for g in names)
        method = "case-insensitive symbols"
        logger.warning(
            "No ortholog table: matched %d/%d mouse genes to human symbols case-insensitively. Pass an MGI "
            "or BioMart table (load_ortholog_table) for real orthology.",
            n_mapped,
            len(names),
        )
    else:
        new = [g.upper() for g in names]
        n_mapped = len(names)
        method = "upper-cased symbols"
        logger.warning(
            "No ortholog table and no human symbols: upper-cased all %d mouse symbols. Pass an MGI or "
            "BioMart table (load_ortholog_table) for real orthology.",
            len(names),
        )
    mapped = rename_genes(adata, new, keep_as="mouse_symbol")
    mapped.uns["orthologs"] = {"n_mouse_genes": len(names), "n_mapped": int(n_mapped), "method": method}
    return mapped


def preprocess_dataset(
    adata: anndata.AnnData,
    species: str,
    label_key: str,
    drop_rare_labels: bool = True,
    min_cells_per_label: int = 20,
    orthologs: Mapping[str, str] | None = None,
    human_symbols: Iterable[str] | None = None,
    **qc_kwargs: float,
) -> anndata.AnnData:
    """Gene symbols, QC, mouse-to-human gene mapping and rare labels for one dataset; ``X`` stays raw counts.

    Parameters
    ----------
    adata
        Cells x genes, raw integer counts; gene symbols as ``var_names`` or in a ``var`` column
        (:func:`use_gene_symbols`).
    species
        ``"human"`` or ``"mouse"``; mouse genes are mapped with :func:`map_mouse_genes`.
    label_key
        ``obs`` column with the labels.
    drop_rare_labels
        Drop labels with fewer than ``min_cells_per_label`` cells (the paper does this for cell types);
        otherwise such a label is an error (:func:`check_label_counts`).
    min_cells_per_label
        See ``drop_rare_labels``.
    orthologs, human_symbols
        Passed to :func:`map_mouse_genes` for mouse data.
    **qc_kwargs
        Passed to :func:`quality_control`.

    Returns
    -------
    anndata.AnnData
        Processed copy with ``X`` as CSR int32 counts and ``uns["preprocessing"]``, a JSON object of
        ``gene_names_from``, ``n_cells_in``, ``n_cells_after_qc``, ``n_cells``, ``n_genes``,
        ``dropped_labels`` ({label: cells}) and, for mouse data, ``orthologs`` (:func:`map_mouse_genes`).
    """
    if species not in ("human", "mouse"):
        raise ValueError(f"species must be 'human' or 'mouse', got {species!r}.")
    n_cells_in = adata.n_obs
    adata, gene_names_from = use_gene_symbols(adata)
    adata = quality_control(adata, species, **qc_kwargs)
    report = {"gene_names_from": gene_names_from, "n_cells_in": n_cells_in, "n_cells_after_qc": adata.n_obs}
    if species == "mouse":
        adata = map_mouse_genes(adata, orthologs, human_symbols)
        report["orthologs"] = adata.uns.pop("orthologs")
    has_labels = label_key in adata.obs
    counts = adata.obs[label_key].astype(str).value_counts() if has_labels else pd.Series(dtype=int)
    if drop_rare_labels:
        adata = filter_rare_labels(adata, label_key, min_cells_per_label)
    else:
        check_label_counts(adata, label_key, min_cells_per_label)
    report["dropped_labels"] = {str(k): int(v) for k, v in counts[counts < min_cells_per_label].items()}
    adata.X = sp.csr_matrix(adata.X).astype(np.int32)
    # a JSON string: label names may hold "/", which h5ad would read as nested groups
    adata.uns[REPORT_KEY] = json.dumps({**report, "n_cells": adata.n_obs, "n_genes": adata.n_vars})
    return adata
