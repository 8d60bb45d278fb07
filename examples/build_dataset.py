"""Build the multi-task instruction dataset from the shared datasets (``make data``); a thin wrapper.

    python examples/build_dataset.py --data-dir ../shared/datasets --output outputs/instructcell-data

is ``instructcell build-data outputs/instructcell-data --shared-datasets ../shared/datasets``; the flags
below are translated to it. Any other data: ``instructcell build-data OUT --h5ad FILE ...``
(``instructcell build-data --help``).
"""

from __future__ import annotations

import argparse
import sys

from datasets_builder.templates import DEFAULT_BANK_DIR
from instructcell.cli import main as instructcell


def main() -> int:
    """Translate the flags to ``instructcell build-data`` and run it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="the shared datasets folder")
    parser.add_argument("--output", required=True)
    parser.add_argument("--n-top-genes", default="3600")
    parser.add_argument("--variant", choices=["instruct", "chat", "both"], default="both")
    parser.add_argument("--datasets", default=None, help="comma-separated subset of the shared datasets")
    parser.add_argument("--orthologs", default="", help="MGI/BioMart mouse->human table (file or URL)")
    parser.add_argument(
        "--multicell",
        action="store_true",
        help="also build the multi-cell and follow-up tasks for every dataset with cell type annotation",
    )
    parser.add_argument("--template-bank", default=str(DEFAULT_BANK_DIR))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    argv = ["build-data", args.output, "--shared-datasets", args.data_dir, "--n-top-genes", args.n_top_genes]
    argv += ["--variant", args.variant, "--orthologs", args.orthologs, "--template-bank", args.template_bank]
    argv += ["--datasets", args.datasets] if args.datasets else []
    argv += ["--multicell"] if args.multicell else []
    argv += ["--overwrite"] if args.overwrite else []
    return instructcell(argv)


if __name__ == "__main__":
    sys.exit(main())
