"""Inference on users' data: annotate or predict drug response for every cell, generate cells per condition.

- :mod:`.loading`: a model folder or Hub id as the ``single-cell-instruction`` pipeline.
- :mod:`.annotation`: labels and probabilities for every cell of an AnnData or .h5ad, written into ``obs``.
- :mod:`.generation`: integer-count cells per condition.
- :mod:`.saliency`: the genes behind a call.
- :mod:`.files`: backed reading and atomic writing of .h5ad files.
- :mod:`.speed`: CPU speed options (threads, int8 linear layers, ``torch.compile``).
"""

from .annotation import annotate, argmax_agreement, predict_drug
from .files import atomic_output
from .generation import generate_cells, generation_template
from .loading import load_pipeline
from .saliency import gene_saliency
from .speed import SpeedOptions, apply_speed_options

__all__ = [
    "SpeedOptions",
    "annotate",
    "apply_speed_options",
    "argmax_agreement",
    "atomic_output",
    "gene_saliency",
    "generate_cells",
    "generation_template",
    "load_pipeline",
    "predict_drug",
]
