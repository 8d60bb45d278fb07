"""``instructcell generate``: N cells per condition (cell type, species, tissue...) into one .h5ad."""

from __future__ import annotations

from typing import TextIO

from instructcell import inference

from .common import add_model_arguments, generation_kwargs, load_pipeline


def add_parsers(subparsers) -> None:
    """Register ``generate``."""
    gen = subparsers.add_parser("generate", help="generate N cells per condition")
    add_model_arguments(gen)
    gen.add_argument("-o", "--output", required=True, help="output .h5ad")
    gen.add_argument("--cell-type", action="append", default=[], help="a condition; repeat for several")
    gen.add_argument("--conditions", help="CSV with one condition per row (columns cell_type, species, ...)")
    gen.add_argument("--species")
    gen.add_argument("--tissue")
    gen.add_argument("--sequencing-method")
    gen.add_argument("--n-cells", type=int, default=100, help="cells per condition")
    gen.add_argument("--template", default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--library-size", type=float, default=None)
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.set_defaults(run=run)


def run(args, stdin: TextIO, out: TextIO) -> int:
    """Generate the cells and write them."""
    import pandas as pd

    if args.conditions:
        rows = pd.read_csv(args.conditions).to_dict("records")
    elif args.cell_type:
        rows = [{"cell_type": cell_type} for cell_type in args.cell_type]
    else:
        raise SystemExit("error: give --cell-type (repeatable) or --conditions <csv>")
    shared = {"species": args.species, "tissue": args.tissue, "sequencing_method": args.sequencing_method}
    rows = [{**{k: v for k, v in shared.items() if v}, **row} for row in rows]
    adata = inference.generate_cells(
        load_pipeline(args),
        rows,
        n_cells=args.n_cells,
        template=args.template,
        output=args.output,
        batch_size=args.batch_size,
        seed=args.seed,
        library_size=args.library_size,
        progress=not args.quiet,
        **generation_kwargs(args),
    )
    print(
        f"wrote {args.output}: {adata.n_obs} cells x {adata.n_vars} genes for {len(rows)} conditions",
        file=out,
    )
    return 0
