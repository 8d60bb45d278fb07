"""`evaluate` module: InstructCell's conditional pseudo-cell generation metrics (MMD, ΔsKNN, pKNN).

Thin wrapper: the math lives in ``instructcell.evaluation.metrics.generation`` (installed with the project,
``pip install -e ".[eval]"``), so the module, the benchmarks and the tests share one implementation.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

try:  # indented: evaluate's import scanner skips it, so a missing package gets the message below
    import scipy.sparse as sp

    from instructcell.evaluation.metrics.generation import DEFAULT_KS, cell_generation_metrics
except ImportError as error:  # pragma: no cover - only without the project installed
    raise ImportError(
        'The cell_generation metric needs the InstructCell package: run `pip install -e ".[eval]"` '
        "in a clone of the repository."
    ) from error

_CITATION = """\
@article{fang2025instructcell,
  title={A Multi-Modal AI Copilot for Single-Cell Analysis with Instruction Following},
  author={Fang, Yin and others},
  journal={arXiv preprint arXiv:2501.08187},
  year={2025}
}
"""

_DESCRIPTION = """\
InstructCell's protocol for conditional pseudo-cell generation (CPCG). Each cell is normalized to 1e4 counts
and log1p-transformed; PCA (50 components) and UMAP (2-D) are fitted on the real cells and the generated
cells are mapped into them (umap-learn `transform`). In the UMAP space: MMD (biased, sum of three Gaussian
kernels with gamma_i = 1 / (2^(i-2) w^2), w = median over real cells of the mean distance to their 25
nearest real neighbours), sKNN of each set (fraction of a cell's K nearest neighbours within its own set
that share its label), ΔsKNN = |sKNN(generated) - sKNN(real)| and pKNN (accuracy on the generated cells of
a K-NN classifier fitted on the real cells), averaged over K in {5, 10, 25, 50} and reported per K.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (2-D array, cells x genes): generated counts; dense, or scipy.sparse (densified per batch).
    references (`list` of `str`): the label each generated cell was conditioned on.
    real_counts (2-D array or scipy.sparse matrix, cells x genes): real (test) cells, same gene columns.
    real_labels (`list` of `str`): labels of the real cells.
    ks (`list` of `int`, default [5, 10, 25, 50]); n_pcs (default 50); umap_n_neighbors (default 40);
    center (default True: centered PCA; False: uncentered TruncatedSVD as in the original script);
    target_sum (default 1e4); log_base (default None = natural log; the original script used 10);
    bandwidth (fixed kernel width w, default estimated); bandwidth_neighbors (default 25);
    random_state (default 0).
Returns:
    mmd, delta_sknn, pknn, sknn_generated, sknn_real (averages over K), bandwidth, and per K:
    pknn_k{K}, delta_sknn_k{K}, sknn_generated_k{K}, sknn_real_k{K}.
Examples:
    >>> metric = evaluate.load("metrics/cell_generation")
    >>> result = metric.compute(predictions=generated, references=generated_labels,
    ...                         real_counts=real, real_labels=real_labels, random_state=0)
    >>> result["pknn"], result["delta_sknn"], result["mmd"]
"""


def _as_rows(cells):
    """Densify a scipy.sparse batch so that it can be written to Arrow."""
    if cells is not None and sp.issparse(cells):
        return np.asarray(cells.todense(), dtype=np.float32)
    return cells


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CellGeneration(evaluate.Metric):
    """MMD / ΔsKNN / pKNN of generated cells against real cells, in a UMAP fitted on the real cells."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("string"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2501.08187"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of generated cells (dense or scipy.sparse rows) and their labels."""
        return super().add_batch(predictions=_as_rows(predictions), references=references, **kwargs)

    def _compute(  # noqa: D102
        self,
        predictions,
        references,
        real_counts=None,
        real_labels=None,
        ks=DEFAULT_KS,
        n_pcs=50,
        umap_n_neighbors=40,
        center=True,
        target_sum=1e4,
        log_base=None,
        bandwidth=None,
        bandwidth_neighbors=25,
        random_state=0,
    ):
        if real_counts is None or real_labels is None:
            raise ValueError(
                "Pass the real cells: compute(..., real_counts=<cells x genes>, real_labels=[...])."
            )
        return cell_generation_metrics(
            np.asarray(predictions, dtype=np.float64),
            [str(label) for label in references],
            real_counts,
            real_labels,
            ks=ks,
            n_pcs=n_pcs,
            umap_n_neighbors=umap_n_neighbors,
            center=center,
            target_sum=target_sum,
            log_base=log_base,
            bandwidth=bandwidth,
            bandwidth_neighbors=bandwidth_neighbors,
            random_state=random_state,
        )
