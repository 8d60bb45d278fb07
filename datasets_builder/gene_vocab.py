"""The gene vocabulary file: an ordered list of gene symbols, one per line (``gene_vocab.txt``).

Sparse gene indices in the instruction dataset index into this list, and the model's feature extractor
is built from the same list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

GENE_VOCAB_FILENAME = "gene_vocab.txt"


def check_gene_vocab(genes: Sequence[str]) -> list[str]:
    """Check that a gene vocabulary is non-empty, has no blank entries and no duplicates.

    Parameters
    ----------
    genes
        Ordered gene symbols.

    Returns
    -------
    list of str
        The same symbols as a list.
    """
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError(
            "The gene vocabulary is empty: build it with `build_gene_vocab` from at least one dataset."
        )
    blank = [i for i, g in enumerate(genes) if not g.strip() or g != g.strip()]
    if blank:
        raise ValueError(
            f"The gene vocabulary has blank or whitespace-padded symbols at positions {blank[:5]}: "
            "strip the names before writing the vocabulary."
        )
    if len(set(genes)) != len(genes):
        seen: set[str] = set()
        dups = sorted({g for g in genes if g in seen or seen.add(g)})
        raise ValueError(
            f"The gene vocabulary has duplicated symbols {dups[:5]}: make gene names unique "
            "(e.g. `adata.var_names_make_unique()`) before building it."
        )
    return genes


def write_gene_vocab(genes: Sequence[str], path: str | os.PathLike) -> None:
    """Write the vocabulary to ``path``, one symbol per line, after :func:`check_gene_vocab`."""
    genes = check_gene_vocab(genes)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(genes) + "\n")


def read_gene_vocab(path: str | os.PathLike) -> list[str]:
    """Read a vocabulary written by :func:`write_gene_vocab` (blank lines at the end are ignored)."""
    with open(path, encoding="utf-8") as f:
        genes = [line.rstrip("\n") for line in f]
    while genes and not genes[-1]:
        genes.pop()
    return check_gene_vocab(genes)
