"""``instructcell evaluate MODEL DATA -o OUT``: the test-split report with the same-run baselines and figures.

Writes ``metrics.json``, ``report.md``, ``saliency_top_genes.csv`` (with ``--saliency``) and ``figures/*.png``
into ``--output-dir``: per task and dataset the model's scores next to the task's baselines fitted in the same
run on the same training cells, confusion matrices, generation metrics with a UMAP of real vs generated cells
and a marker-gene dot plot; ``--robustness``: accuracy across held-out templates; ``--saliency``: top genes
per label by gradient saliency. The work is :func:`instructcell.evaluation.suite.run_evaluation`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

from instructcell.evaluation.suite import METHODS, EvaluationConfig, run_evaluation
from instructcell.tasks import parse_task_list, task_names


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_parsers(subparsers) -> None:
    """Register ``evaluate``."""
    parser = subparsers.add_parser(
        "evaluate", help="test-split report of a model on a built dataset, next to baselines"
    )
    parser.add_argument("model", type=Path, help="saved model folder (Hub layout)")
    parser.add_argument("dataset_dir", type=Path, help="built dataset (test.parquet, train.parquet, ...)")
    parser.add_argument("-o", "--output-dir", required=True, type=Path)
    parser.add_argument("--tasks", default=",".join(task_names()), help="comma-separated task names")
    parser.add_argument("--datasets", default=None, help="comma-separated dataset names (default: all)")
    parser.add_argument("--variant", default="instruct", choices=["instruct", "chat"])
    parser.add_argument(
        "--max-test-cells", type=int, default=500, help="test cells per task and dataset at most; 0 = all"
    )
    parser.add_argument(
        "--method",
        default="score",
        choices=list(METHODS),
        help="labels: most likely label (score) or greedy answer mapped to a label (generate)",
    )
    parser.add_argument(
        "--baselines",
        default="cheap",
        help="baselines beside the model: cheap (logistic regression, per-label mean, real-cell reference), "
        "all (also CellTypist and scVI when installed), none, or comma-separated names",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--robustness", action="store_true", help="accuracy across held-out templates")
    parser.add_argument("--templates-per-group", type=int, default=20)
    parser.add_argument("--saliency", action="store_true", help="marker genes by gradient saliency")
    parser.add_argument("--saliency-top-k", type=int, default=10)
    parser.add_argument(
        "--markers-per-label", type=int, default=3, help="marker genes per label in dot plots"
    )
    parser.add_argument("--max-generated-per-label", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--template-bank", default=None, help="bank the dataset was built with")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: GPU when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args, stdin: TextIO, out: TextIO) -> int:
    """Evaluate and write the report."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("modeling_instructcell").setLevel(logging.WARNING)
    config = EvaluationConfig(
        model=args.model,
        dataset_dir=args.dataset_dir,
        output_dir=args.output_dir,
        tasks=parse_task_list(args.tasks),
        datasets=_names(args.datasets) if args.datasets else None,
        variant=args.variant,
        max_test_cells=args.max_test_cells or None,
        method=args.method,
        baselines=args.baselines,
        seed=args.seed,
        robustness=args.robustness,
        templates_per_group=args.templates_per_group,
        saliency=args.saliency,
        saliency_top_k=args.saliency_top_k,
        markers_per_label=args.markers_per_label,
        max_generated_per_label=args.max_generated_per_label,
        batch_size=args.batch_size,
        template_bank=args.template_bank,
        device=args.device,
        progress=not args.quiet,
        extra={"command": " ".join(["instructcell", *sys.argv[1:]])},
    )
    metrics = run_evaluation(config)
    folder = args.output_dir
    seconds = metrics["run"]["wall_seconds"]
    print(
        f"Wrote {folder / 'report.md'}, {folder / 'metrics.json'} and {folder / 'figures'} "
        f"in {seconds:.0f} s.",
        file=out,
    )
    return 0
