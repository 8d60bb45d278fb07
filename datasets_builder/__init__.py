"""Instruction data for InstructCell: AnnData sources, preprocessing, templates and a ``datasets`` builder.

``datasets_builder.preprocessing`` (scanpy) and ``datasets_builder.original_datasets`` are imported on demand.
"""

from .anndata_source import AnnDataReader, AnnDataSource, CellRecord, densify
from .builder import (
    FEATURES,
    InstructCellBuilderConfig,
    InstructCellDatasetBuilder,
    example_key,
    make_example,
    option_order,
)
from .gene_vocab import GENE_VOCAB_FILENAME, read_gene_vocab, write_gene_vocab
from .perturbation_pairs import PerturbationSource
from .splits import SPLITS, split_of, template_split_of
from .templates import CELL_TOKEN, SIGNAL_TOKEN, Template, TemplateBank, render

__all__ = [
    "AnnDataReader",
    "AnnDataSource",
    "CELL_TOKEN",
    "CellRecord",
    "FEATURES",
    "GENE_VOCAB_FILENAME",
    "InstructCellBuilderConfig",
    "InstructCellDatasetBuilder",
    "PerturbationSource",
    "SIGNAL_TOKEN",
    "SPLITS",
    "Template",
    "TemplateBank",
    "densify",
    "example_key",
    "make_example",
    "option_order",
    "read_gene_vocab",
    "render",
    "split_of",
    "template_split_of",
    "write_gene_vocab",
]
