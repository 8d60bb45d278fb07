"""Feature extractor for InstructCell: align single-cell count matrices to the model's gene vocabulary.

The feature extractor turns an expression profile (AnnData, sparse matrix, array, DataFrame, or a
single cell vector) into ``cell_values``: a dense float32 matrix of **raw counts** with shape
``(n_cells, n_vocab_genes)`` and columns in vocabulary order. Normalisation (``target_sum``,
``log1p``) happens inside the model, so the same tensor serves as encoder input, ZINB target and
library size.

One cohesive file (input parsing, gene alignment and count validation of one class), as transformers keeps a
feature extractor. This file is Hub remote code. transformers' ``check_imports`` walks the whole AST (function
bodies included) and only skips ``try:`` blocks, so the only imports are stdlib, numpy and transformers.
scipy, pandas and anndata are only touched when the input is one of their objects, and they are
looked up in ``sys.modules`` rather than imported (the one scipy import sits in a ``try:`` block).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature, FeatureExtractionMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["GeneAlignment", "InstructCellFeatureExtractor", "gene_identifiers"]

#: Columns of ``adata.var`` searched (in this order) for Ensembl gene ids.
ENSEMBL_ID_COLUMNS = (
    "gene_ids",
    "gene_id",
    "ensembl_id",
    "ensembl_ids",
    "ensembl_gene_id",
    "gene_ensembl",
    "ensembl",
    "feature_id",
)
#: Columns of ``adata.var`` searched (in this order) for gene symbols when ``var_names`` are ids.
SYMBOL_COLUMNS = (
    "gene_symbols",
    "gene_symbol",
    "symbol",
    "symbols",
    "gene_name",
    "gene_names",
    "feature_name",
)

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)
# "SYMBOL_ENSG..." / "ENSG..._SYMBOL" (also with "|" or ":"), e.g. muscat / some 10x exports.
_COMPOSITE_RE = (
    re.compile(r"^(?P<symbol>.+?)[_|:](?P<id>ENS[A-Z]*G\d{6,}(?:\.\d+)?)$", re.IGNORECASE),
    re.compile(r"^(?P<id>ENS[A-Z]*G\d{6,}(?:\.\d+)?)[_|:](?P<symbol>.+)$", re.IGNORECASE),
)
_N_EXAMPLES = 10
# Rows per chunk are chosen so that one dense chunk of the input holds about this many values.
_CHUNK_VALUES = 1 << 24


def _looks_like_ensembl(names: list[str] | None) -> bool:
    """Return True when most of ``names`` are Ensembl gene ids (ENSG..., ENSMUSG..., versioned or not)."""
    if not names:
        return False
    sample = names[:: max(1, len(names) // 1000)]
    hits = sum(bool(_ENSEMBL_RE.match(str(n).strip())) for n in sample)
    return hits > len(sample) / 2


def _normalize_id(gene_id: Any) -> str | None:
    """Upper-case an Ensembl id and drop its version (``ENSG00000141510.17`` -> ``ENSG00000141510``)."""
    if gene_id is None:
        return None
    text = str(gene_id).strip()
    if not text or text.lower() in {"nan", "none"}:
        return None
    if _ENSEMBL_RE.match(text):
        text = text.split(".", 1)[0]
    return text.upper()


def _split_composite(name: str) -> tuple[str, str] | None:
    """Split ``"TXNIP_ENSG00000117289"`` (or ``"ENSG..._TXNIP"``) into ``(symbol, id)``; None otherwise."""
    for pattern in _COMPOSITE_RE:
        m = pattern.match(name.strip())
        if m:
            return m.group("symbol"), m.group("id")
    return None


def _column_values(var: Any, column: str) -> list[str | None]:
    """One ``var`` column as strings, missing values (NaN, None, blank) as None."""
    values = []
    for value in list(var[column]):
        text = None if value is None else str(value).strip()
        values.append(None if not text or text.lower() in {"nan", "none"} else text)
    return values


def gene_identifiers(var_names: list[str], var: Any = None) -> tuple[list[str] | None, list[str] | None]:
    """Gene symbols and Ensembl ids of an AnnData's genes, wherever the usual conventions keep them.

    * Ensembl ids in ``var_names`` (CELLxGENE; scanpy's ``read_10x_*(var_names="gene_ids")``): the symbols
      come from the first column of :data:`SYMBOL_COLUMNS` in ``var`` (``feature_name``, ``gene_symbols``,
      ``gene_name``...); a gene without a symbol keeps its id.
    * Symbols in ``var_names`` (scanpy's default): the ids come from the first column of
      :data:`ENSEMBL_ID_COLUMNS` (``gene_ids``...), when there is one.
    * Composite names (``"TXNIP_ENSG00000117289"``, ``"ENSG..._TXNIP"``) are split into symbol and id.
    * Row numbers in ``var_names`` (``0, 1, 2...``, e.g. converted from R): the symbols come from a symbol
      column.

    Parameters
    ----------
    var_names : list of str
        ``adata.var_names``, length ``n_genes``.
    var : pandas.DataFrame or mapping of str to sequence, optional
        ``adata.var``: columns of length ``n_genes``.

    Returns
    -------
    symbols : list of str or None
        One symbol per gene (the name to match a symbol vocabulary with), or None when ``var_names`` are
        Ensembl ids and no symbol column exists.
    ids : list of str or None
        One Ensembl id per gene (None entries for genes without one), or None when there are no ids.
    """
    names = [str(g) for g in var_names]
    columns = [] if var is None else [str(c) for c in var.keys()]
    symbol_column = next((c for c in SYMBOL_COLUMNS if c in columns), None)
    id_column = next((c for c in ENSEMBL_ID_COLUMNS if c in columns), None)
    ids = None if id_column is None else _column_values(var, id_column)
    if _looks_like_ensembl(names):
        ids = names
        if symbol_column is None:
            return None, ids
        symbols = _column_values(var, symbol_column)
        return [symbol or gene_id for symbol, gene_id in zip(symbols, ids, strict=True)], ids
    sample = names[:: max(1, len(names) // 1000)]
    if sample and sum(_split_composite(n) is not None for n in sample) > len(sample) / 2:
        parts = [_split_composite(n) for n in names]
        symbols = [n if p is None else p[0] for n, p in zip(names, parts, strict=True)]
        return symbols, [None if p is None else p[1] for p in parts]
    if symbol_column is not None and all(n.strip().isdigit() for n in sample):
        symbols = _column_values(var, symbol_column)
        return [symbol or name for symbol, name in zip(symbols, names, strict=True)], ids
    return names, ids


def _species_style(names: list[str]) -> str | None:
    """Guess the symbol convention: "human" (ACTB), "mouse" (Actb), or None when unclear."""
    alpha = [n for n in names if isinstance(n, str) and n[:1].isalpha() and len(n) > 1]
    if not alpha:
        return None
    sample = alpha[:: max(1, len(alpha) // 2000)]
    upper = sum(n == n.upper() for n in sample)
    capital = sum(n[0].isupper() and n[1:] == n[1:].lower() and n[1:] != n[1:].upper() for n in sample)
    if upper > 0.6 * len(sample):
        return "human"
    if capital > 0.6 * len(sample):
        return "mouse"
    return None


def _examples(names, limit: int = _N_EXAMPLES) -> list[str]:
    return [str(n) for n in list(names)[:limit]]


def _row_labels(obs_names: list[str] | None, rows: np.ndarray, limit: int = _N_EXAMPLES) -> str:
    """Describe offending rows by index and (when known) obs name, e.g. ``[3 ('AAAC-1'), 7 ('AGTC-1')]``."""
    rows = np.asarray(rows)[:limit]
    if obs_names is None:
        parts = [str(int(r)) for r in rows]
    else:
        parts = [f"{int(r)} ({obs_names[int(r)]!r})" for r in rows]
    return "[" + ", ".join(parts) + "]"


@dataclass
class GeneAlignment:
    """How the genes of an input matrix map onto the feature extractor's vocabulary.

    Build it with :meth:`InstructCellFeatureExtractor.align_genes` and pass it back through
    ``InstructCellFeatureExtractor.__call__(..., alignment=...)`` to align many chunks of the same
    matrix without re-matching names.

    Attributes
    ----------
    n_vocab : int
        Number of genes in the vocabulary (width of ``cell_values``).
    n_input_genes : int
        Number of genes (columns) in the input.
    n_matched : int
        Number of distinct vocabulary genes found in the input.
    fraction_vocab_matched : float
        ``n_matched / n_vocab``; compared against ``min_gene_overlap``. Unmatched vocabulary genes are
        zero-filled, which the model cannot tell from dropout, so this is the fraction that decides whether
        the output is meaningful.
    fraction_input_genes_matched : float
        Fraction of input columns that map onto some vocabulary gene (informational only: a full
        transcriptome aligned to a 2,000-gene vocabulary legitimately keeps a small fraction).
    fraction_counts_kept : float or None
        Fraction of the input's total counts that land in ``cell_values``. Needs the counts, so it is
        None on a report from :meth:`align_genes` and filled in by ``__call__``.
    n_duplicate_genes : int
        Number of vocabulary genes that receive more than one input column (their counts are summed).
    n_matched_by_id : int
        Input columns matched through Ensembl ids (the rest of the matches are by symbol).
    unmatched_input_examples : list of str
        Up to 10 input genes not in the vocabulary.
    missing_vocab_examples : list of str
        Up to 10 vocabulary genes absent from the input (zero-filled).
    duplicate_examples : list of str
        Up to 10 vocabulary genes that received summed duplicate columns.
    input_index : numpy.ndarray of shape (n_matched_columns,)
        Input column indices that are kept.
    vocab_index : numpy.ndarray of shape (n_matched_columns,)
        Vocabulary column receiving each kept input column (``cell_values[:, vocab_index[k]] +=
        counts[:, input_index[k]]``).
    """

    n_vocab: int
    n_input_genes: int
    n_matched: int
    fraction_vocab_matched: float
    fraction_input_genes_matched: float
    fraction_counts_kept: float | None = None
    n_duplicate_genes: int = 0
    n_matched_by_id: int = 0
    unmatched_input_examples: list[str] = field(default_factory=list)
    missing_vocab_examples: list[str] = field(default_factory=list)
    duplicate_examples: list[str] = field(default_factory=list)
    input_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    vocab_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)

    def summary(self) -> str:
        """One-line human-readable summary, as logged by the feature extractor."""
        text = (
            f"gene alignment: {self.n_matched}/{self.n_vocab} vocabulary genes matched "
            f"({self.fraction_vocab_matched:.1%}) from {self.n_input_genes} input genes "
            f"({self.fraction_input_genes_matched:.1%} of input genes used"
        )
        if self.n_matched_by_id:
            text += f", {self.n_matched_by_id} matched by Ensembl id"
        text += ")"
        if self.fraction_counts_kept is not None:
            text += f"; {self.fraction_counts_kept:.1%} of input counts kept"
        if self.n_duplicate_genes:
            text += f"; {self.n_duplicate_genes} duplicated genes summed (e.g. {self.duplicate_examples[:3]})"
        if self.missing_vocab_examples:
            text += f"; missing vocabulary genes zero-filled, e.g. {self.missing_vocab_examples[:5]}"
        if self.unmatched_input_examples:
            text += f"; unused input genes e.g. {self.unmatched_input_examples[:5]}"
        return text


@dataclass
class _Input:
    """Internal normalised view of one call's input."""

    matrix: Any  # numpy 2-d array, scipy sparse matrix/array, h5py dataset or anndata backed sparse dataset
    n_cells: int
    n_genes: int
    gene_names: list[str] | None
    gene_ids: list[str] | None
    obs_names: list[str] | None
    is_sparse: bool


class InstructCellFeatureExtractor(FeatureExtractionMixin):
    r"""Align single-cell raw counts to InstructCell's gene vocabulary.

    Parameters
    ----------
    gene_names : list of str, optional
        Ordered gene vocabulary (gene symbols). Column ``j`` of ``cell_values`` is gene ``gene_names[j]``.
        Saved to ``preprocessor_config.json`` by ``save_pretrained``.
    gene_ids : list of str, optional
        Ensembl gene ids aligned with ``gene_names`` (same length; ``None`` entries allowed). When both the
        vocabulary and the input carry ids, genes are matched by id first (version suffixes ignored) and the
        remaining vocabulary genes by symbol.
    min_gene_overlap : float, default 0.5
        Smallest accepted fraction of the **vocabulary** found in the input. Missing vocabulary genes are
        zero-filled and look like dropout to the model, so a low vocabulary coverage silently degrades
        predictions; the fraction of input genes used is not checked, since a full transcriptome aligned
        to a small vocabulary legitimately uses few of its genes.
    case_sensitive : bool, default False
        Match gene symbols case-sensitively. Ids are always compared case-insensitively.
    **kwargs
        Passed to :class:`~transformers.FeatureExtractionMixin` (stored as attributes and saved).

    Notes
    -----
    * Duplicated input genes (several columns that map to one vocabulary gene, e.g. two Ensembl ids
      sharing a symbol, or ``"Actb"`` and ``"ACTB"`` under case-insensitive matching) are **summed**, so the
      per-cell library size is preserved; a warning names them. Names made unique by
      ``var_names_make_unique`` (``"GENE-1"``) do not match and are dropped.
    * Composite names such as ``"TXNIP_ENSG00000117289"`` (muscat, some 10x exports) are split and matched
      by id (when the vocabulary has ids) or by symbol.
    * Inputs must be raw, non-negative, integer counts. Log-normalised, scaled, NaN/inf or all-zero cells
      raise ``ValueError`` with a hint instead of producing silently wrong ``cell_values``.
    * Sparse and backed inputs are processed in row chunks; checks run on the stored ``.data`` only, and
      only the output is dense.

    Examples
    --------
    >>> fe = InstructCellFeatureExtractor(gene_names=["CD3E", "MS4A1", "LYZ"])
    >>> fe([[1, 0, 5]], return_tensors="np")["cell_values"].shape
    (1, 3)
    """

    model_input_names = ["cell_values"]

    def __init__(
        self,
        gene_names: list[str] | None = None,
        gene_ids: list[str] | None = None,
        min_gene_overlap: float = 0.5,
        case_sensitive: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= float(min_gene_overlap) <= 1.0:
            raise ValueError(f"min_gene_overlap must be in [0, 1], got {min_gene_overlap}.")
        self.gene_names = [str(g) for g in gene_names] if gene_names is not None else None
        self.gene_ids = [None if g is None else str(g) for g in gene_ids] if gene_ids is not None else None
        self.min_gene_overlap = float(min_gene_overlap)
        self.case_sensitive = bool(case_sensitive)
        self._build_lookups()

    # ------------------------------------------------------------------ vocabulary
    def _symbol_key(self, name: Any) -> str:
        text = str(name).strip()
        return text if self.case_sensitive else text.casefold()

    def _build_lookups(self) -> None:
        self._symbol_lookup: dict[str, int] | None = None
        self._id_lookup: dict[str, int] | None = None
        if self.gene_names is None:
            if self.gene_ids is not None:
                raise ValueError(
                    "gene_ids was given without gene_names; pass the gene symbols too (same order)."
                )
            return
        if len(self.gene_names) == 0:
            raise ValueError("gene_names is empty; pass the ordered list of vocabulary gene symbols.")
        lookup: dict[str, int] = {}
        clashes = []
        for j, name in enumerate(self.gene_names):
            key = self._symbol_key(name)
            if key in lookup:
                clashes.append(f"{self.gene_names[lookup[key]]!r}/{name!r}")
            else:
                lookup[key] = j
        if clashes:
            hint = "" if self.case_sensitive else " (or pass case_sensitive=True if they differ only by case)"
            raise ValueError(
                f"The gene vocabulary has {len(clashes)} duplicated symbols, e.g. {clashes[:_N_EXAMPLES]}; "
                f"make gene_names unique{hint}."
            )
        self._symbol_lookup = lookup
        if self.gene_ids is None and _looks_like_ensembl(self.gene_names):
            # A vocabulary of Ensembl ids: match inputs by id (version suffixes ignored).
            self._id_lookup = {_normalize_id(g): j for j, g in enumerate(self.gene_names)}
            if len(self._id_lookup) != len(self.gene_names):
                raise ValueError(
                    "The vocabulary holds Ensembl ids that repeat once version suffixes are dropped "
                    "(e.g. ENSG00000141510.16 and .17); keep one version per gene."
                )
        if self.gene_ids is not None:
            if len(self.gene_ids) != len(self.gene_names):
                raise ValueError(
                    f"gene_ids has {len(self.gene_ids)} entries but gene_names has {len(self.gene_names)}; "
                    "they must be aligned one-to-one (use None for genes without an id)."
                )
            id_lookup: dict[str, int] = {}
            dup_ids = []
            for j, gid in enumerate(self.gene_ids):
                key = _normalize_id(gid)
                if key is None:
                    continue
                if key in id_lookup:
                    dup_ids.append(str(gid))
                else:
                    id_lookup[key] = j
            if dup_ids:
                raise ValueError(
                    f"The vocabulary has {len(dup_ids)} duplicated gene ids, e.g. {dup_ids[:_N_EXAMPLES]}; "
                    "make gene_ids unique."
                )
            self._id_lookup = id_lookup

    @property
    def vocab_size(self) -> int:
        """Number of vocabulary genes, i.e. the width of ``cell_values`` (0 without a vocabulary)."""
        return 0 if self.gene_names is None else len(self.gene_names)

    def _require_vocab(self) -> None:
        if self.gene_names is None:
            raise ValueError(
                "This feature extractor has no gene vocabulary; create it with "
                "InstructCellFeatureExtractor(gene_names=[...]) or load one with from_pretrained."
            )

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a dict (private lookup tables are rebuilt on load, not saved)."""
        output = super().to_dict()
        for key in [k for k in output if k.startswith("_")]:
            del output[key]
        return output

    def __repr__(self) -> str:
        ids = "" if self.gene_ids is None else ", with gene_ids"
        head = _examples(self.gene_names or [], 5)
        return (
            f"{self.__class__.__name__}(vocab_size={self.vocab_size}{ids}, first genes={head}, "
            f"min_gene_overlap={self.min_gene_overlap}, case_sensitive={self.case_sensitive})"
        )

    # ------------------------------------------------------------------ alignment
    def align_genes(
        self,
        gene_names: list[str] | None = None,
        gene_ids: list[str] | None = None,
        *,
        check_overlap: bool = True,
    ) -> GeneAlignment:
        """Match input genes to the vocabulary.

        Parameters
        ----------
        gene_names : list of str, optional
            Gene symbols of the input columns, length ``n_input_genes``. If they look like Ensembl ids and
            ``gene_ids`` is not given, they are used as ids.
        gene_ids : list of str, optional
            Ensembl ids of the input columns, length ``n_input_genes``. Used only when the vocabulary has
            ``gene_ids``; matched first, then the still-missing vocabulary genes are matched by symbol.
        check_overlap : bool, default True
            Raise ``ValueError`` when ``fraction_vocab_matched < min_gene_overlap``. Set to False to just
            inspect the report.

        Returns
        -------
        GeneAlignment
            The report, including ``input_index`` / ``vocab_index`` (shape ``(n_matched_columns,)``), which
            can be passed to ``__call__(..., alignment=...)`` for every chunk of the same matrix.
        """
        self._require_vocab()
        if gene_names is None and gene_ids is None:
            raise ValueError("align_genes needs gene_names and/or gene_ids of the input columns.")
        gene_names = None if gene_names is None else [str(g) for g in gene_names]
        gene_ids = None if gene_ids is None else list(gene_ids)
        if gene_names is not None and gene_ids is None and _looks_like_ensembl(gene_names):
            gene_names, gene_ids = None, gene_names
        if gene_names is not None and gene_ids is not None and len(gene_names) != len(gene_ids):
            raise ValueError(
                f"gene_names has {len(gene_names)} entries but gene_ids has {len(gene_ids)}; "
                "both describe the input columns and must have the same length."
            )
        n_input = len(gene_names) if gene_names is not None else len(gene_ids)
        if n_input == 0:
            raise ValueError("The input has no genes (0 columns).")

        target = np.full(n_input, -1, dtype=np.int64)
        n_by_id = 0
        if gene_ids is not None and self._id_lookup:
            for i, gid in enumerate(gene_ids):
                key = _normalize_id(gid)
                if key is not None:
                    target[i] = self._id_lookup.get(key, -1)
            n_by_id = int((target >= 0).sum())
        if gene_names is not None:
            taken = np.zeros(self.vocab_size, dtype=bool)
            taken[target[target >= 0]] = True
            lookup = self._symbol_lookup
            for i, name in enumerate(gene_names):
                if target[i] >= 0:
                    continue
                j = lookup.get(self._symbol_key(name), -1)
                if j < 0 and (parts := _split_composite(name)) is not None:
                    if self._id_lookup:
                        j = self._id_lookup.get(_normalize_id(parts[1]), -1)
                    if j < 0:
                        j = lookup.get(self._symbol_key(parts[0]), -1)
                if j >= 0 and not taken[j]:
                    target[i] = j

        input_index = np.flatnonzero(target >= 0)
        vocab_index = target[input_index]
        matched, counts = np.unique(vocab_index, return_counts=True)
        dup_vocab = matched[counts > 1]
        present = np.zeros(self.vocab_size, dtype=bool)
        present[matched] = True
        display = gene_names if gene_names is not None else [str(g) for g in gene_ids]
        alignment = GeneAlignment(
            n_vocab=self.vocab_size,
            n_input_genes=n_input,
            n_matched=int(matched.size),
            fraction_vocab_matched=float(matched.size) / self.vocab_size,
            fraction_input_genes_matched=float(input_index.size) / n_input,
            n_duplicate_genes=int(dup_vocab.size),
            n_matched_by_id=n_by_id,
            unmatched_input_examples=[display[i] for i in np.flatnonzero(target < 0)[:_N_EXAMPLES]],
            missing_vocab_examples=[self.gene_names[j] for j in np.flatnonzero(~present)[:_N_EXAMPLES]],
            duplicate_examples=[self.gene_names[j] for j in dup_vocab[:_N_EXAMPLES]],
            input_index=input_index,
            vocab_index=vocab_index,
        )
        if check_overlap and alignment.fraction_vocab_matched < self.min_gene_overlap:
            raise ValueError(self._low_overlap_message(alignment, gene_names, gene_ids))
        return alignment

    def _low_overlap_message(
        self, alignment: GeneAlignment, gene_names: list[str] | None, gene_ids: list | None
    ) -> str:
        hints = []
        names_for_style = gene_names if gene_names is not None else []
        if gene_names is None and self._id_lookup is None:
            hints.append(
                "the input genes look like Ensembl ids but this vocabulary only has symbols: set "
                "var_names to gene symbols (e.g. adata.var_names = adata.var['gene_symbols']) or pass "
                "gene_names=<symbols>"
            )
        if self._id_lookup is not None and gene_ids is None:
            hints.append(
                "pass gene_ids=<Ensembl ids> (or add a 'gene_ids' column to adata.var) to match by id"
            )
        if gene_ids is not None and self._id_lookup:
            vocab_prefix = _id_prefix(list(self._id_lookup))
            input_prefix = _id_prefix([_normalize_id(g) or "" for g in gene_ids])
            if vocab_prefix and input_prefix and vocab_prefix != input_prefix:
                hints.append(
                    f"input ids look like {input_prefix}* but the vocabulary uses {vocab_prefix}*: map the "
                    "genes "
                    "to the vocabulary's species (orthologs) first"
                )
        if self.case_sensitive and gene_names is not None:
            folded = {g.strip().casefold() for g in self.gene_names}
            n_ci = sum(g.strip().casefold() in folded for g in gene_names)
            if n_ci > alignment.n_matched:
                hints.append(f"pass case_sensitive=False ({n_ci} input genes match ignoring case)")
        input_style, vocab_style = _species_style(names_for_style), _species_style(self.gene_names)
        if input_style and vocab_style and input_style != vocab_style:
            hints.append(
                f"the input symbols look {input_style} (e.g. {_examples(names_for_style, 3)}) and the "
                "vocabulary "
                f"looks {vocab_style} (e.g. {_examples(self.gene_names, 3)}): map {input_style} genes to "
                f"{vocab_style} orthologs (e.g. with an Ensembl BioMart / MGI homology table) before calling"
            )
        if alignment.n_input_genes < self.min_gene_overlap * alignment.n_vocab:
            hints.append(
                f"the input has only {alignment.n_input_genes} genes: pass the full gene matrix "
                "(e.g. adata.raw.to_adata() or the unfiltered counts), not a highly-variable-gene subset"
            )
        hints.append(
            "check that the gene names are symbols (not row numbers or probe ids) of the vocabulary's species"
        )
        hints.append(
            f"or lower min_gene_overlap (now {self.min_gene_overlap}) if a partial overlap is expected"
        )
        return (
            f"Only {alignment.n_matched} of the {alignment.n_vocab} vocabulary genes "
            f"({alignment.fraction_vocab_matched:.1%}) were found among the {alignment.n_input_genes} input "
            "genes, "
            f"below min_gene_overlap={self.min_gene_overlap}. Input genes e.g. "
            f"{alignment.unmatched_input_examples[:5]}, vocabulary e.g. {_examples(self.gene_names, 5)}. "
            "To fix: " + "; ".join(hints) + "."
        )

    # ------------------------------------------------------------------ input parsing
    def _parse_input(self, cells, gene_names, gene_ids, layer) -> _Input:
        obs_names = None
        names = None if gene_names is None else [str(g) for g in gene_names]
        ids = None if gene_ids is None else list(gene_ids)
        pd = sys.modules.get("pandas")

        if hasattr(cells, "var_names") and hasattr(cells, "X"):  # AnnData, AnnData view / backed, adata.raw
            if layer is None:
                matrix = cells.X
                if matrix is None:
                    raise ValueError("adata.X is None; pass layer=<name of the raw-count layer>.")
            else:
                layers = getattr(cells, "layers", None)
                if layers is None or layer not in layers:
                    available = [] if layers is None else list(layers.keys())
                    raise ValueError(
                        f"Unknown layer {layer!r}; available layers: {available}. Pass layer=None to use "
                        "adata.X."
                    )
                matrix = layers[layer]
            if names is None or ids is None:
                symbols, var_ids = gene_identifiers(list(cells.var_names), getattr(cells, "var", None))
                names = symbols if names is None else names
                ids = var_ids if ids is None else ids
            if hasattr(cells, "obs_names"):
                obs_names = [str(o) for o in cells.obs_names]
        elif pd is not None and isinstance(cells, pd.DataFrame):
            if names is None:
                names = [str(c) for c in cells.columns]
            obs_names = [str(o) for o in cells.index]
            if cells.shape[1] > 0 and all(isinstance(dt, pd.SparseDtype) for dt in cells.dtypes):
                matrix = cells.sparse.to_coo()
            else:
                matrix = cells.to_numpy()
        elif pd is not None and isinstance(cells, pd.Series):  # one cell, index = genes
            if names is None:
                names = [str(c) for c in cells.index]
            matrix = cells.to_numpy()[None, :]
            obs_names = None if cells.name is None else [str(cells.name)]
        elif _is_sparse(cells):
            matrix = cells
        elif _is_backed_dataset(cells):
            matrix = cells
        else:
            if hasattr(cells, "detach") and hasattr(cells, "cpu"):  # torch tensor
                cells = cells.detach().cpu().numpy()
            try:
                matrix = np.asarray(cells)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"Cannot read cells of type {type(cells).__name__}; pass an AnnData, scipy sparse "
                    "matrix, numpy array, pandas DataFrame or a 1-d count vector."
                ) from err
            if matrix.dtype == object:
                raise ValueError(
                    "cells could not be read as a numeric matrix (ragged or non-numeric values); pass a "
                    "2-d array of shape (n_cells, n_genes) or a 1-d vector for one cell."
                )
            if matrix.ndim == 1:
                matrix = matrix[None, :]
            elif matrix.ndim != 2:
                raise ValueError(
                    f"cells must be 1-d (one cell) or 2-d (n_cells, n_genes); got shape {matrix.shape}."
                )

        if _is_sparse(matrix):
            sparse = sys.modules["scipy.sparse"]
            if matrix.ndim != 2:
                matrix = sparse.csr_matrix(matrix.reshape(1, -1))
            if matrix.format != "csr":
                matrix = matrix.tocsr()
            is_sparse = True
        elif _is_backed_dataset(matrix):
            backed_format = getattr(matrix, "format", None)
            is_sparse = backed_format in ("csr", "csc")
            if backed_format == "csc" and hasattr(matrix, "to_memory"):
                # Row slices of a backed CSC matrix touch every column: load it (still sparse) once instead.
                logger.info("Backed CSC matrix: loading it into memory as CSR to read cells by rows.")
                matrix = matrix.to_memory().tocsr()
        else:
            matrix = np.asarray(matrix)
            is_sparse = False
        if len(matrix.shape) != 2:
            raise ValueError(f"cells must be 2-d (n_cells, n_genes); got shape {tuple(matrix.shape)}.")
        n_cells, n_genes = int(matrix.shape[0]), int(matrix.shape[1])

        if names is not None and len(names) != n_genes:
            raise ValueError(
                f"gene_names has {len(names)} entries but the count matrix has {n_genes} columns; "
                "pass one name per column (genes are columns, cells are rows: transpose a genes x "
                "cells matrix)."
            )
        if ids is not None and len(ids) != n_genes:
            raise ValueError(
                f"gene_ids has {len(ids)} entries but the count matrix has {n_genes} columns; "
                "pass one id per column."
            )
        return _Input(matrix, n_cells, n_genes, names, ids, obs_names, is_sparse)

    # ------------------------------------------------------------------ main entry point
    def __call__(
        self,
        cells,
        gene_names: list[str] | None = None,
        layer: str | None = None,
        return_tensors: str | None = None,
        return_alignment: bool = False,
        *,
        gene_ids: list[str] | None = None,
        alignment: GeneAlignment | None = None,
    ) -> BatchFeature | tuple[BatchFeature, GeneAlignment]:
        """Align cells to the vocabulary and return raw counts.

        Parameters
        ----------
        cells : AnnData, scipy.sparse matrix, numpy.ndarray, pandas.DataFrame, torch.Tensor or list
            Raw counts of shape ``(n_cells, n_input_genes)`` (cells are rows), or one cell of shape
            ``(n_input_genes,)``; also ``adata.raw`` and a ``pandas.Series`` (one cell, index = genes).
            AnnData may be a view or backed (``read_h5ad(..., backed="r")``): rows are
            read in chunks. Gene names come from ``columns`` (DataFrame), ``index`` (Series) or, for
            AnnData, from :func:`gene_identifiers`: Ensembl ids in ``var_names`` with symbols in a ``var``
            column (``feature_name``, ``gene_symbols``, ``gene_name``...), or symbols in ``var_names`` with
            ids in ``var["gene_ids"]``, used as they are.
        gene_names : list of str, optional
            Gene symbols of the input columns, length ``n_input_genes``. Required for unnamed arrays unless
            ``n_input_genes == vocab_size`` (then the columns are assumed to be in vocabulary order).
            Overrides ``var_names`` / ``columns`` when given.
        layer : str, optional
            For AnnData: read ``adata.layers[layer]`` instead of ``adata.X``.
        return_tensors : {"pt", "np"} or None, optional
            Tensor type of ``cell_values``; None returns a numpy array.
        return_alignment : bool, default False
            Also return the :class:`GeneAlignment` report.
        gene_ids : list of str, optional
            Ensembl ids of the input columns (keyword-only), used when the vocabulary has ``gene_ids``.
        alignment : GeneAlignment, optional
            A report from :meth:`align_genes` for inputs with these columns; skips name matching (for
            processing one matrix chunk by chunk).

        Returns
        -------
        BatchFeature or tuple of (BatchFeature, GeneAlignment)
            ``cell_values`` of shape ``(n_cells, vocab_size)``, float32 raw counts in vocabulary order, with
            missing vocabulary genes set to 0 and duplicated input genes summed. With
            ``return_alignment=True`` the alignment report (``fraction_counts_kept`` filled in) is returned
            as a second element.

        Raises
        ------
        ValueError
            On empty input, unknown ``layer``, unnamed columns whose count differs from the vocabulary,
            gene-name / width mismatch, vocabulary overlap below ``min_gene_overlap``, negative, NaN/inf or
            non-integer values, and cells whose aligned counts are all zero.
        """
        self._require_vocab()
        parsed = self._parse_input(cells, gene_names, gene_ids, layer)
        if parsed.n_cells == 0:
            raise ValueError("The input has 0 cells; pass at least one cell (row).")
        if parsed.n_genes == 0:
            raise ValueError("The input has 0 genes (columns).")

        if alignment is not None:
            if alignment.n_input_genes != parsed.n_genes or alignment.n_vocab != self.vocab_size:
                raise ValueError(
                    f"The given alignment was computed for {alignment.n_input_genes} input genes and a "
                    "vocabulary "
                    f"of {alignment.n_vocab}, but the input has {parsed.n_genes} genes and the vocabulary "
                    f"{self.vocab_size}; recompute it with align_genes(<this input's gene names>)."
                )
            alignment = GeneAlignment(**{**alignment.__dict__, "fraction_counts_kept": None})
        elif parsed.gene_names is None and parsed.gene_ids is None:
            if parsed.n_genes != self.vocab_size:
                raise ValueError(
                    f"The input has {parsed.n_genes} unnamed gene columns but the vocabulary has "
                    f"{self.vocab_size} "
                    "genes; pass gene_names=<one gene symbol per column> (or an AnnData / DataFrame with "
                    "gene "
                    "names) so the columns can be aligned."
                )
            logger.info("Input columns are unnamed and match the vocabulary size: assuming vocabulary order.")
            identity = np.arange(self.vocab_size, dtype=np.int64)
            alignment = GeneAlignment(
                n_vocab=self.vocab_size,
                n_input_genes=parsed.n_genes,
                n_matched=self.vocab_size,
                fraction_vocab_matched=1.0,
                fraction_input_genes_matched=1.0,
                input_index=identity,
                vocab_index=identity,
            )
        else:
            alignment = self.align_genes(parsed.gene_names, parsed.gene_ids)

        values, total_in, total_out = self._extract(parsed, alignment)
        alignment.fraction_counts_kept = float(total_out / total_in) if total_in > 0 else 0.0

        zero_rows = np.flatnonzero(values.sum(axis=1) == 0)
        if zero_rows.size:
            raise ValueError(
                f"{zero_rows.size} of {parsed.n_cells} cells have no counts in the vocabulary genes after "
                f"alignment, e.g. cells {_row_labels(parsed.obs_names, zero_rows)}. Remove them first (e.g. "
                "sc.pp.filter_cells(adata, min_counts=1) on the vocabulary genes) or check the gene "
                "alignment "
                f"({alignment.n_matched}/{alignment.n_vocab} vocabulary genes matched)."
            )
        if alignment.n_duplicate_genes:
            logger.warning(
                f"{alignment.n_duplicate_genes} vocabulary genes matched several input columns; their counts "
                "were "
                f"summed (e.g. {alignment.duplicate_examples[:5]})."
            )
        logger.info(alignment.summary())

        features = BatchFeature({"cell_values": values}, tensor_type=return_tensors)
        if return_alignment:
            return features, alignment
        return features

    # ------------------------------------------------------------------ extraction
    def _extract(self, parsed: _Input, alignment: GeneAlignment) -> tuple[np.ndarray, float, float]:
        """Validate the input and scatter it into a dense ``(n_cells, vocab_size)`` float32 array by rows."""
        out = np.zeros((parsed.n_cells, self.vocab_size), dtype=np.float32)
        in_idx, voc_idx = alignment.input_index, alignment.vocab_index
        # First input column per vocabulary gene is assigned; later duplicates are added.
        _, first = np.unique(voc_idx, return_index=True)
        is_first = np.zeros(voc_idx.size, dtype=bool)
        is_first[first] = True
        mapping = None
        if parsed.is_sparse:
            sparse = sys.modules.get("scipy.sparse")
            if sparse is None:  # backed sparse dataset: anndata depends on scipy
                try:  # a try block keeps transformers' check_imports from requiring scipy
                    import scipy.sparse as sparse
                except ImportError as err:  # pragma: no cover - anndata always brings scipy
                    raise ImportError("Sparse input needs scipy: pip install scipy") from err
            mapping = sparse.csr_matrix(
                (np.ones(in_idx.size, dtype=np.float32), (in_idx, voc_idx)),
                shape=(parsed.n_genes, self.vocab_size),
            )
        step = max(1, _CHUNK_VALUES // max(parsed.n_genes, 1))
        total_in = 0.0
        total_out = 0.0
        for start in range(0, parsed.n_cells, step):
            stop = min(start + step, parsed.n_cells)
            chunk = parsed.matrix[start:stop]
            if parsed.is_sparse:
                if not _is_sparse(chunk):
                    chunk = sys.modules["scipy.sparse"].csr_matrix(chunk)
                chunk = chunk.tocsr()
                data = np.asarray(chunk.data)
                _validate_values(data, parsed.obs_names, start, indptr=chunk.indptr)
                total_in += float(data.sum(dtype=np.float64))
                block = (chunk.astype(np.float32, copy=False) @ mapping).toarray()
                out[start:stop] = block
            else:
                chunk = np.asarray(chunk)
                _validate_values(chunk, parsed.obs_names, start)
                total_in += float(chunk.sum(dtype=np.float64))
                target = out[start:stop]
                target[:, voc_idx[is_first]] = chunk[:, in_idx[is_first]]
                if not is_first.all():
                    np.add.at(target, (slice(None), voc_idx[~is_first]), chunk[:, in_idx[~is_first]])
            total_out += float(out[start:stop].sum(dtype=np.float64))
        return out, total_in, total_out


def _id_prefix(ids: list[str]) -> str | None:
    """Most common Ensembl species prefix (``ENSG``, ``ENSMUSG``...) among ``ids``."""
    prefixes = {}
    for gid in ids[:: max(1, len(ids) // 1000)]:
        m = re.match(r"^(ENS[A-Z]*G)\d", gid or "")
        if m:
            prefixes[m.group(1)] = prefixes.get(m.group(1), 0) + 1
    return max(prefixes, key=prefixes.get) if prefixes else None


def _is_sparse(obj) -> bool:
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and sparse.issparse(obj)


def _is_backed_dataset(obj) -> bool:
    """Tell whether ``obj`` is an h5py dataset or an anndata backed sparse dataset (read lazily by rows)."""
    module = type(obj).__module__ or ""
    return (
        (module.startswith("h5py") or module.startswith("anndata"))
        and hasattr(obj, "shape")
        and not isinstance(obj, np.ndarray)
    )


def _validate_values(
    values: np.ndarray, obs_names, row_offset: int, indptr: np.ndarray | None = None
) -> None:
    """Raise ValueError unless ``values`` are finite, non-negative integers.

    Parameters
    ----------
    values : numpy.ndarray
        A dense chunk of shape ``(n_rows, n_genes)``, or the ``.data`` of a CSR chunk of shape ``(nnz,)``.
    obs_names : list of str or None
        Cell names of the whole input, for error messages.
    row_offset : int
        Index of the chunk's first row in the whole input.
    indptr : numpy.ndarray of shape (n_rows + 1,), optional
        CSR row pointers when ``values`` is ``.data``; used to report offending cells.
    """
    if values.size == 0:
        return
    if values.dtype == bool:
        return
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"Counts must be numeric; got dtype {values.dtype}.")

    def rows_of(mask: np.ndarray) -> np.ndarray:
        if indptr is None:
            rows = np.flatnonzero(mask.any(axis=1)) if mask.ndim == 2 else np.zeros(1, dtype=np.int64)
        else:
            positions = np.flatnonzero(mask)[:_N_EXAMPLES]
            rows = np.unique(np.searchsorted(indptr, positions, side="right") - 1)
        return rows + row_offset

    raw_hint = "pass raw counts, e.g. adata.layers['counts'] (layer='counts') or adata.raw.to_adata()"
    if np.issubdtype(values.dtype, np.integer):
        bad = values < 0
        if bad.any():
            raise ValueError(
                f"Counts must be non-negative, found {int(bad.sum())} negative values (min {values.min()}) "
                "in cells "
                f"{_row_labels(obs_names, rows_of(bad))}; the data look scaled or centered: {raw_hint}."
            )
        return
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"Counts must be finite, found {int(bad.sum())} NaN/inf values in cells "
            f"{_row_labels(obs_names, rows_of(bad))}; replace or drop them, or {raw_hint}."
        )
    bad = values < 0
    if bad.any():
        raise ValueError(
            f"Counts must be non-negative, found {int(bad.sum())} negative values (min {values.min():.4g}) "
            "in cells "
            f"{_row_labels(obs_names, rows_of(bad))}; the data look scaled or centered (e.g. sc.pp.scale): "
            f"{raw_hint}."
        )
    bad = values != np.rint(values)
    if bad.any():
        example = float(values[bad].flat[0])
        looks = "log-normalized" if float(values.max()) < 30 else "normalized (e.g. CPM / normalize_total)"
        raise ValueError(
            f"Counts must be integers, found {int(bad.sum())} non-integer values (e.g. {example:.4g}) in "
            "cells "
            f"{_row_labels(obs_names, rows_of(bad))}; the data look {looks}: {raw_hint}. If these are "
            "estimated counts (e.g. salmon/kallisto), round them first (np.rint)."
        )
