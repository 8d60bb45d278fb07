"""`evaluate` module: cell type annotation / drug sensitivity metrics with unanswered predictions.

Thin wrapper: the math lives in ``instructcell.evaluation.metrics.classification`` (installed with the
project, ``pip install -e ".[eval]"``), so the module, the benchmarks and the tests share one implementation.
"""

from __future__ import annotations

import datasets
import evaluate

try:  # indented: evaluate's import scanner skips it, so a missing package gets the message below
    from instructcell.evaluation.metrics.classification import cell_classification_metrics
except ImportError as error:  # pragma: no cover - only without the project installed
    raise ImportError(
        'The cell_classification metric needs the InstructCell package: run `pip install -e ".[eval]"` '
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
Classification metrics for InstructCell's cell type annotation (CTA) and drug sensitivity prediction (DSP):
accuracy over all samples (an unanswered prediction counts as wrong), macro-F1 and weighted-F1 over the
answered samples, and the answered rate. A prediction is unanswered when it is None or blank, or, when
`labels` is given, when it is not one of the labels.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): predicted labels; None or "" = unanswered.
    references (`list` of `str`): true labels.
    labels (`list` of `str`, *optional*): the label set; predictions outside it count as unanswered.
Returns:
    accuracy (`float`): correct / all samples.
    macro_f1 (`float`): unweighted mean of per-class F1 over the answered samples.
    weighted_f1 (`float`): support-weighted mean of per-class F1 over the answered samples.
    answered_rate (`float`): answered / all samples.
Examples:
    >>> metric = evaluate.load("metrics/cell_classification")
    >>> metric.compute(
    ...     predictions=["Beta", None, "Alpha", "Beta"], references=["Beta", "Beta", "Alpha", "Alpha"]
    ... )
    {'accuracy': 0.5, 'macro_f1': 0.666..., 'weighted_f1': 0.666..., 'answered_rate': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CellClassification(evaluate.Metric):
    """Accuracy / macro-F1 / weighted-F1 / answered rate for label predictions that may be unanswered."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://arxiv.org/abs/2501.08187"],
        )

    def _compute(self, predictions, references, labels=None):  # noqa: D102
        return cell_classification_metrics(predictions, references, labels=labels)
