"""Inference on users' data: annotate or predict drug response for every cell, generate cells, perturb cells.

- :mod:`.loading`: a model folder or Hub id as the ``single-cell-instruction`` pipeline.
- :mod:`.annotation`: labels and probabilities for every cell of an AnnData or .h5ad, written into ``obs``.
- :mod:`.generation`: integer-count cells per condition.
- :mod:`.perturbation`: each control cell as it would look after a perturbation (integer counts).
- :mod:`.saliency`: the genes behind a call.
- :mod:`.files`: backed reading and atomic writing of .h5ad files.
"""

from .annotation import annotate, argmax_agreement, predict_drug
from .files import atomic_output
from .generation import generate_cells, generation_template
from .loading import load_pipeline
from .perturbation import predict_perturbation
from .saliency import gene_saliency

__all__ = [
    "annotate",
    "argmax_agreement",
    "atomic_output",
    "gene_saliency",
    "generate_cells",
    "generation_template",
    "load_pipeline",
    "predict_drug",
    "predict_perturbation",
]
