"""``instructcell perturb``: each control cell of a .h5ad as it would look after a perturbation."""

from __future__ import annotations

from typing import TextIO

from instructcell import inference

from .common import add_model_arguments, model_source, positive_int


def add_parsers(subparsers) -> None:
    """Register ``perturb``."""
    parser = subparsers.add_parser("perturb", help="predict each cell's response to a perturbation")
    add_model_arguments(parser)
    parser.add_argument("input", help=".h5ad with raw counts of the cells to perturb")
    parser.add_argument("--perturbation", required=True, help='in words, as trained: "interferon beta"')
    parser.add_argument("-o", "--output", required=True, help="output .h5ad of predicted cells")
    parser.add_argument("--n-per-cell", type=positive_int, default=1, help="predicted cells per input cell")
    parser.add_argument(
        "--condition-key", default=None, help="obs column of conditions: only its control cells are read"
    )
    parser.add_argument("--control-value", default="control", help="the control cells' condition value")
    parser.add_argument("--cell-type-key", default=None, help="obs column of cell types (checked, figure)")
    parser.add_argument(
        "--compare-value", default=None, help="condition value of real perturbed cells to compare with"
    )
    parser.add_argument("--figure", default=None, help="PNG: predicted vs real top-DEG expression")
    parser.add_argument("--template", default=None, help="instruction with {input} and {perturbation}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(run=run)


def run(args, stdin: TextIO, out: TextIO) -> int:
    """Predict the perturbed cells and write them."""
    adata = inference.predict_perturbation(
        model_source(args),
        args.input,
        args.perturbation,
        output=args.output,
        n_per_cell=args.n_per_cell,
        condition_key=args.condition_key,
        control_value=args.control_value,
        cell_type_key=args.cell_type_key,
        compare_value=args.compare_value,
        figure=args.figure,
        template=args.template,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(
        f"wrote {args.output}: {adata.n_obs} predicted cells x {adata.n_vars} genes "
        f"({args.perturbation}, {args.n_per_cell} per input cell)",
        file=out,
    )
    if args.figure:
        print(f"figure: {args.figure}", file=out)
    return 0
