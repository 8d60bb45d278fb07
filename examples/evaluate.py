r"""Evaluate a saved InstructCell model on the test split of a built dataset, per task and dataset.

    python examples/evaluate.py --model outputs/demo/model --dataset-dir outputs/demo/data \\
        --output-dir outputs/eval-demo --max-test-cells 200 --robustness --saliency

Writes ``metrics.json``, ``report.md``, ``saliency_top_genes.csv`` (with ``--saliency``) and ``figures/*.png``
into ``--output-dir``: CTA/DSP accuracy and F1 next to a logistic regression fitted on the training split,
confusion matrices, CPCG generation metrics with a UMAP of real vs generated cells and a marker-gene dot plot,
``--robustness``: accuracy and macro-F1 across 20 + 20 held-out templates (with / without the options in the
prompt) on the same cells, ``--saliency``: top genes per label by masked gradient saliency. The logic lives in
``instructcell.evaluate_suite``; see docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from instructcell.evaluate_suite import METHODS, TASKS, EvaluationConfig, run_evaluation


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="Saved model folder (Hub layout).")
    parser.add_argument(
        "--dataset-dir",
        required=True,
        type=Path,
        help="Built dataset (test.parquet, train.parquet, gene_vocab.txt).",
    )
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated, among cta,dsp,cpcg.")
    parser.add_argument("--datasets", default=None, help="Comma-separated dataset names (default: all).")
    parser.add_argument("--variant", default="instruct", choices=["instruct", "chat"])
    parser.add_argument(
        "--max-test-cells", type=int, default=500, help="Test cells per task and dataset at most; 0 = all."
    )
    parser.add_argument(
        "--method",
        default="score",
        choices=list(METHODS),
        help="CTA/DSP: most likely label (score) or greedy answer mapped to a label (generate).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--robustness", action="store_true", help="Accuracy across held-out templates.")
    parser.add_argument("--templates-per-group", type=int, default=20)
    parser.add_argument("--saliency", action="store_true", help="Marker genes by gradient saliency.")
    parser.add_argument("--saliency-top-k", type=int, default=10)
    parser.add_argument(
        "--markers-per-label", type=int, default=3, help="Marker genes per label in dot plots."
    )
    parser.add_argument("--max-generated-per-label", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--template-bank", default=None, help="Bank the dataset was built with (default: committed)."
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: GPU when available).")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("modeling_instructcell").setLevel(logging.WARNING)
    try:
        config = EvaluationConfig(
            model=args.model,
            dataset_dir=args.dataset_dir,
            output_dir=args.output_dir,
            tasks=_names(args.tasks),
            datasets=_names(args.datasets) if args.datasets else None,
            variant=args.variant,
            max_test_cells=args.max_test_cells or None,
            method=args.method,
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
            progress=not args.no_progress,
            extra={
                "command": " ".join(
                    ["python examples/evaluate.py", *(argv if argv is not None else sys.argv[1:])]
                )
            },
        )
        metrics = run_evaluation(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.output_dir
    seconds = metrics["run"]["wall_seconds"]
    print(f"Wrote {out / 'report.md'}, {out / 'metrics.json'} and {out / 'figures'} in {seconds:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
