"""``instructcell annotate`` and ``instructcell predict-drug``: a label per cell of an .h5ad or .zarr, in obs.

The input and the output are checked before the model is loaded. A stopped run resumes when the same command
is run again; ``--num-workers N`` shares the file's chunks among N processes, and so does
``accelerate launch -m instructcell annotate ...`` (rank 0 writes the output).
"""

from __future__ import annotations

import argparse
from typing import TextIO

from instructcell import inference
from instructcell.inference.files import CellFile
from instructcell.tasks import get_task

from .common import add_model_arguments, generation_kwargs, model_source, parse_labels, positive_int


def _add_arguments(parser: argparse.ArgumentParser, label_key: str, template: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("input", help=".h5ad file or .zarr store (read chunk by chunk, never modified)")
    parser.add_argument(
        "-o", "--output", required=True, help="output, same format as the input (may equal the input)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output other than the input"
    )
    parser.add_argument(
        "--template", default=template, help="instruction with {input} (default: %(default)r)"
    )
    parser.add_argument("--labels", help="comma-separated label set (also fills {choices})")
    parser.add_argument("--labels-from-obs", metavar="COLUMN", help="take the label set from an obs column")
    parser.add_argument(
        "--label-key", default=label_key, help="obs column for the label (default: %(default)s)"
    )
    parser.add_argument("--probability-key", default=None, help="obs column for the probability")
    parser.add_argument(
        "--method",
        choices=["score", "generate"],
        default=None,
        help="score: arg-max of the label distribution (fast); generate: parse the greedy answer",
    )
    parser.add_argument("--layer", default=None, help="layer with raw counts (default X)")
    parser.add_argument(
        "--chunk-size", type=positive_int, default=1024, help="rows read, annotated and saved at a time"
    )
    parser.add_argument(
        "--num-workers", type=positive_int, default=1, help="processes sharing the chunks (default 1)"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=None)


def add_parsers(subparsers) -> None:
    """Register ``annotate`` and ``predict-drug``."""
    _add_arguments(
        subparsers.add_parser("annotate", help="annotate every cell of an .h5ad or .zarr"),
        "instructcell_label",
        get_task("cta").default_instruction,
    )
    drug = subparsers.add_parser("predict-drug", help="predict drug response of every cell")
    _add_arguments(drug, "instructcell_drug_response", get_task("dsp").default_instruction)
    drug.add_argument("--drug", help="drug name for {drug} (default: obs['drug'])")
    for name in ("annotate", "predict-drug"):
        subparsers.choices[name].set_defaults(run=run)


def _label_set(args) -> list[str] | None:
    if args.labels and args.labels_from_obs:
        raise ValueError("Give either --labels or --labels-from-obs, not both.")
    if args.labels:
        return parse_labels(args.labels)
    if args.labels_from_obs:
        with CellFile(args.input) as cells:
            return cells.obs_categories(args.labels_from_obs)
    return None


def run(args, stdin: TextIO, out: TextIO) -> int:
    """Annotate (or predict drug response for) every cell and print the label counts."""
    kwargs = dict(
        labels=_label_set(args),
        template=args.template,
        output=args.output,
        label_key=args.label_key,
        probability_key=args.probability_key or f"{args.label_key}_probability",
        method=args.method,
        layer=args.layer,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        progress=not args.quiet,
        overwrite=args.overwrite,
        num_workers=args.num_workers,
        num_threads=args.threads,
        **generation_kwargs(args),
    )
    if args.command == "predict-drug":
        kwargs["labels"] = kwargs["labels"] or list(get_task("dsp").default_labels)
        path = inference.predict_drug(model_source(args), args.input, drug=args.drug, **kwargs)
    else:
        path = inference.annotate(model_source(args), args.input, **kwargs)
    if path is None:  # a launched process other than rank 0: rank 0 writes and reports
        return 0
    with CellFile(path) as result:
        written = result.obs_columns([args.label_key, kwargs["probability_key"]])
    counts = written[args.label_key].value_counts(dropna=False)
    print(f"wrote {path}: obs{list(written.columns)}", file=out)
    for label, count in counts.items():
        print(f"  {label}: {count}", file=out)
    return 0
