"""Inference on users' files: annotate or predict drug response for every cell, generate cells per condition."""

from .api import (
    CTA_TEMPLATE,
    DSP_TEMPLATE,
    annotate,
    argmax_agreement,
    atomic_output,
    gene_saliency,
    generate_cells,
    generation_template,
    load_pipeline,
    predict_drug,
)

__all__ = [
    "CTA_TEMPLATE",
    "DSP_TEMPLATE",
    "annotate",
    "argmax_agreement",
    "atomic_output",
    "gene_saliency",
    "generate_cells",
    "generation_template",
    "load_pipeline",
    "predict_drug",
]
