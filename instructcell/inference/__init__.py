"""Inference on users' data: annotate or predict drug response for every cell, generate cells, perturb cells.

- :mod:`.loading`: a model folder or Hub id as the ``single-cell-instruction`` pipeline.
- :mod:`.annotation`: labels and probabilities for every cell of an AnnData, .h5ad or .zarr, written into
  ``obs``; files are read in chunks, shared among worker processes and resumed after an interruption.
- :mod:`.generation`: integer-count cells per condition.
- :mod:`.perturbation`: each control cell as it would look after a perturbation (integer counts).
- :mod:`.saliency`: the genes behind a call.
- :mod:`.files`, :mod:`.partial`, :mod:`.prefetch`, :mod:`.workers`: reading and writing files by chunks,
  per-chunk results of a run, the background reader, worker processes.
- :mod:`.speed`: CPU speed options (threads, int8 linear layers, ``torch.compile``).

Where results may be written, and how they are written atomically: :mod:`instructcell.outputs`.
"""

from instructcell.outputs import atomic_output

from .annotation import annotate, argmax_agreement, predict_drug
from .generation import generate_cells, generation_template
from .loading import ModelSource, load_pipeline
from .perturbation import predict_perturbation
from .saliency import gene_saliency
from .speed import SpeedOptions, apply_speed_options

__all__ = [
    "ModelSource",
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
    "predict_perturbation",
]
