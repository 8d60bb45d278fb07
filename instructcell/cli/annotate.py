"""``instructcell annotate`` and ``instructcell predict-drug``: one label per cell of an .h5ad, in obs."""

from __future__ import annotations

import argparse
from typing import TextIO

import anndata

from instructcell import inference
from instructcell.tasks import get_task

from .common import add_model_arguments, generation_kwargs, label_set, load_pipeline


def _add_arguments(parser: argparse.ArgumentParser, label_key: str, template: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("input", help=".h5ad file (read in backed mode, chunk by chunk)")
    parser.add_argument("-o", "--output", required=True, help="output .h5ad (may equal the input)")
    parser.add_argument(
        "--template", default=template, help="instruction with {input} (default: %(default)r)"
    )
    parser.add_argument("--labels", help="comma-separated label set")
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
    parser.add_argument("--layer", default=None, help="AnnData layer with raw counts (default X)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows read per chunk")
    parser.add_argument("--max-new-tokens", type=int, default=None)


def add_parsers(subparsers) -> None:
    """Register ``annotate`` and ``predict-drug``."""
    _add_arguments(
        subparsers.add_parser("annotate", help="annotate every cell of an .h5ad"),
        "instructcell_label",
        get_task("cta").default_instruction,
    )
    drug = subparsers.add_parser("predict-drug", help="predict drug response of every cell")
    _add_arguments(drug, "instructcell_drug_response", get_task("dsp").default_instruction)
    drug.add_argument("--drug", help="drug name for {drug} (default: obs['drug'])")
    for name in ("annotate", "predict-drug"):
        subparsers.choices[name].set_defaults(run=run)


def run(args, stdin: TextIO, out: TextIO) -> int:
    """Annotate (or predict drug response for) every cell and print the label counts."""
    pipe = load_pipeline(args)
    kwargs = dict(
        labels=label_set(args),
        template=args.template,
        output=args.output,
        label_key=args.label_key,
        method=args.method,
        layer=args.layer,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        progress=not args.quiet,
        **generation_kwargs(args),
    )
    kwargs["probability_key"] = args.probability_key or f"{args.label_key}_probability"
    if args.command == "predict-drug":
        kwargs["labels"] = kwargs["labels"] or list(get_task("dsp").default_labels)
        path = inference.predict_drug(pipe, args.input, drug=args.drug, **kwargs)
    else:
        path = inference.annotate(pipe, args.input, **kwargs)
    result = anndata.read_h5ad(path, backed="r")
    counts = result.obs[args.label_key].value_counts(dropna=False)
    result.file.close()
    print(f"wrote {path}: obs[{args.label_key!r}] and obs[{kwargs['probability_key']!r}]", file=out)
    for label, count in counts.items():
        print(f"  {label}: {count}", file=out)
    return 0
