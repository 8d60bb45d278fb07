"""The ``instructcell`` command: one module per sub-command, each adding its parser and its ``run``.

::

    instructcell build-data OUT --h5ad cells.h5ad --task cta [--gene-vocab-from MODEL]
    instructcell train [RECIPE] [--flag value ...]
    instructcell evaluate MODEL DATA -o OUT
    instructcell annotate MODEL data.h5ad -o annotated.h5ad --labels "B cells,CD14+ Monocytes,..."
    instructcell predict-drug MODEL pc9.h5ad -o pc9_pred.h5ad --drug erlotinib
    instructcell generate MODEL -o fake.h5ad --cell-type "naive B cell" --species human --n-cells 50
    instructcell chat MODEL data.h5ad --labels-from-obs cell_type
    instructcell perturb MODEL cells.h5ad --perturbation "interferon beta" -o predicted.h5ad

A ``ValueError`` (bad input) is printed as ``error: ...`` with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from . import annotate, build_data, chat, evaluate, generate, perturb, train

SUBCOMMANDS = (build_data, train, evaluate, annotate, generate, perturb, chat)


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="instructcell", description="Talk to single-cell data with InstructCell."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Entry point of the ``instructcell`` console script; streams are injectable for tests."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "pass_through", False):  # `train` parses its own flags (the training arguments)
        args.arguments = argv[argv.index(args.command) + 1 :]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args, stdin or sys.stdin, stdout or sys.stdout)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
