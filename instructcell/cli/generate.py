"""``instructcell generate``: N cells per condition (cell type, species, tissue...) into an .h5ad or .zarr."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import pandas as pd

from instructcell import inference
from modeling_instructcell.processing_instructcell import is_present

from .common import add_model_arguments, generation_kwargs, model_source, non_negative_int, positive_int


def add_parsers(subparsers) -> None:
    """Register ``generate``."""
    gen = subparsers.add_parser("generate", help="generate N cells per condition")
    add_model_arguments(gen)
    gen.add_argument("-o", "--output", required=True, help="output .h5ad (or .zarr)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing output")
    gen.add_argument("--cell-type", action="append", default=[], help="a condition; repeat for several")
    gen.add_argument("--conditions", help="CSV with one condition per row (columns cell_type, species, ...)")
    gen.add_argument("--species")
    gen.add_argument("--tissue")
    gen.add_argument("--sequencing-method")
    gen.add_argument("--n-cells", type=positive_int, default=100, help="cells per condition")
    gen.add_argument("--template", default=None)
    gen.add_argument("--seed", type=non_negative_int, default=0)
    gen.add_argument(
        "--library-size", type=positive_int, default=None, help="total counts of every generated cell"
    )
    gen.add_argument("--max-new-tokens", type=positive_int, default=None)
    gen.set_defaults(run=run)


def _read_conditions(path: str) -> list[dict]:
    if not Path(path).is_file():
        raise ValueError(f"No such conditions file: {path}")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"Cannot read {path} as CSV ({err}).") from err
    if "cell_type" not in table.columns:
        raise ValueError(f"{path} needs a cell_type column; its columns are {list(table.columns)}.")
    return table.to_dict("records")


def run(args, stdin: TextIO, out: TextIO) -> int:
    """Generate the cells and write them."""
    if args.conditions and args.cell_type:
        raise ValueError("Give either --cell-type (repeatable) or --conditions <csv>, not both.")
    if args.conditions:
        rows = _read_conditions(args.conditions)
    elif args.cell_type:
        rows = [{"cell_type": cell_type} for cell_type in args.cell_type]
    else:
        raise ValueError("Give --cell-type (repeatable) or --conditions <csv>.")
    shared = {"species": args.species, "tissue": args.tissue, "sequencing_method": args.sequencing_method}
    # A flag fills what a row leaves empty; a row's own value wins.
    rows = [
        {**{k: v for k, v in shared.items() if v}, **{k: v for k, v in row.items() if is_present(v)}}
        for row in rows
    ]
    adata = inference.generate_cells(
        model_source(args),
        rows,
        n_cells=args.n_cells,
        template=args.template,
        output=args.output,
        batch_size=args.batch_size,
        seed=args.seed,
        library_size=args.library_size,
        progress=not args.quiet,
        overwrite=args.overwrite,
        **generation_kwargs(args),
    )
    print(
        f"wrote {args.output}: {adata.n_obs} cells x {adata.n_vars} genes for {len(rows)} conditions",
        file=out,
    )
    return 0
