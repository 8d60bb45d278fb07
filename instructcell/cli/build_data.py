"""``instructcell build-data OUT --h5ad FILE ...``: build an instruction dataset from AnnData files.

Sources: ``--h5ad FILE`` (repeatable; ``--task``, ``--label-key``, ``--species``... apply to each),
``--sources FILE.yaml`` (per-file settings, :mod:`datasets_builder.sources`) and ``--shared-datasets DIR``
(the shared datasets of ``make data``), in any combination. Each file goes through the same QC, highly
variable genes, hash splits and template bank (:func:`datasets_builder.build.build_dataset_folder`).
``--gene-vocab-from MODEL`` keeps a saved model's gene vocabulary, so that ``instructcell train --init_from
MODEL`` can fine-tune it on the result. OUT appears only when complete; an interrupted build resumes when the
command is rerun.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TextIO

import datasets

from datasets_builder.build import BuildReport, build_dataset_folder, rows_per_task_dataset_split
from datasets_builder.sources import (
    OPTIONAL_SHARED_DATASETS,
    SHARED_DATASETS,
    DataSource,
    read_sources_file,
    shared_sources,
    with_multicell_tasks,
)
from datasets_builder.templates import DEFAULT_BANK_DIR, VARIANTS
from instructcell.tasks import parse_task_list, task_names


def add_parsers(subparsers) -> None:
    """Register ``build-data``."""
    parser = subparsers.add_parser(
        "build-data",
        help="build an instruction dataset from .h5ad files",
        description="Build an instruction dataset (train/validation/test Parquet + gene_vocab.txt) from "
        ".h5ad files: QC, highly variable genes, hash splits, templates.",
    )
    parser.add_argument("output", type=Path, help="dataset folder to write")
    sources = parser.add_argument_group("sources")
    sources.add_argument(
        "--h5ad", action="append", default=[], metavar="FILE", help="AnnData file (repeatable)"
    )
    sources.add_argument("--sources", type=Path, metavar="YAML", help="a sources file (per-file settings)")
    sources.add_argument(
        "--shared-datasets", type=Path, metavar="DIR", help="the shared datasets folder (../shared/datasets)"
    )
    sources.add_argument(
        "--datasets",
        default=None,
        help="with --shared-datasets: a comma-separated subset of "
        f"{sorted({**SHARED_DATASETS, **OPTIONAL_SHARED_DATASETS})}",
    )
    each = parser.add_argument_group("settings of every --h5ad file")
    each.add_argument(
        "--task", default="cta", help=f"comma-separated tasks among {', '.join(task_names())} (default: cta)"
    )
    each.add_argument("--label-key", default="", help="obs column with the labels (default: the task's)")
    each.add_argument("--species", default="", choices=["human", "mouse"], help="default: obs['species']")
    each.add_argument("--tissue", default="", help="default: obs['tissue']")
    each.add_argument("--sequencing-method", default="", help="default: obs['sequencing_method']")
    each.add_argument("--drug", default="", help="drug name of drug-response data (default: obs['drug'])")
    each.add_argument("--layer", default="", help="layer with the raw counts (default: X)")
    each.add_argument(
        "--drop-rare-labels",
        action="store_true",
        help="leave out labels with too few cells (default: an error)",
    )
    build = parser.add_argument_group("build")
    build.add_argument(
        "--multicell",
        action="store_true",
        help="also build the multi-cell and follow-up conversation tasks for every source of cell type "
        "annotation (docs/multicell.md)",
    )
    build.add_argument(
        "--gene-vocab-from", metavar="MODEL", default=None, help="keep this saved model's gene vocabulary"
    )
    build.add_argument(
        "--orthologs", default="", metavar="TABLE", help="mouse -> human ortholog table (MGI/BioMart)"
    )
    build.add_argument("--n-top-genes", type=int, default=3600, help="highly variable genes per file")
    build.add_argument("--min-cells-per-label", type=int, default=20)
    build.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    build.add_argument("--template-bank", default=str(DEFAULT_BANK_DIR))
    build.add_argument("--overwrite", action="store_true", help="replace OUT once the new build is complete")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def collect_sources(args: argparse.Namespace) -> tuple[list[DataSource], dict | None]:
    """Return the sources named on the command line and the ``settings`` record of a shared-data build.

    A build of the shared datasets alone records ``{n_top_genes, orthologs, data_dir[, datasets][,
    multicell]}``, as ``make data`` always has, so that an identical earlier build can be recognised
    (``examples/demo.py``). ``--multicell`` adds the multi-cell tasks to every source of cell type annotation
    (:func:`~datasets_builder.sources.with_multicell_tasks`).
    """
    tasks = parse_task_list(args.task)
    if not args.task.strip():
        raise ValueError("--task is empty: name at least one task.")
    sources = [
        DataSource(
            path,
            tasks=tasks,
            label_key=args.label_key,
            species=args.species,
            tissue=args.tissue,
            sequencing_method=args.sequencing_method,
            drug=args.drug,
            layer=args.layer,
            drop_rare_labels=args.drop_rare_labels,
        )
        for path in args.h5ad
    ]
    if args.sources is not None:
        sources += read_sources_file(args.sources)
    settings = None
    if args.shared_datasets is not None:
        names = [n.strip() for n in args.datasets.split(",") if n.strip()] if args.datasets else None
        shared = shared_sources(args.shared_datasets, names)
        if not sources and args.gene_vocab_from is None:
            settings = {
                "n_top_genes": args.n_top_genes,
                "orthologs": args.orthologs,
                "data_dir": str(args.shared_datasets.resolve()),
            }
            if names:
                settings["datasets"] = sorted(names)
            if args.multicell:
                settings["multicell"] = True
        sources += shared
    elif args.datasets:
        raise ValueError("--datasets selects among the shared datasets: pass --shared-datasets DIR too.")
    if not sources:
        raise ValueError(
            "No source: pass --h5ad FILE (repeatable), --sources FILE.yaml or --shared-datasets DIR."
        )
    if args.multicell:
        if not any("cta" in source.tasks for source in sources):
            raise ValueError(
                "--multicell adds tasks to the sources of cell type annotation, and no source has cta: "
                "add cta to a source's tasks (--task cta,... or tasks: [cta] in a sources file)."
            )
        sources = with_multicell_tasks(sources)
    return sources, settings


def print_report(report: BuildReport, out: TextIO) -> None:
    """Print what was built: the vocabulary, each source's cells, labels and genes, and the rows per split."""
    if report.gene_vocab_from:
        print(
            f"Gene vocabulary: the {report.n_genes} genes of {report.gene_vocab_from} (its processor accepts "
            f"files holding {report.min_vocab_fraction:.1%} of them or more)",
            file=out,
        )
    else:
        print(
            f"Gene vocabulary: {report.n_genes} genes (union of each file's highly variable genes)", file=out
        )
    for source in report.sources:
        print(f"\n{source.name} ({source.path}), {', '.join(source.tasks)}, {source.species}", file=out)
        print(
            f"  cells: {source.n_cells_in} in, {source.n_cells_after_qc} after QC, {source.n_cells} kept; "
            f"{source.n_genes} genes named from {source.gene_names_from}",
            file=out,
        )
        if source.orthologs:
            o = source.orthologs
            print(
                f"  mouse genes: {o['n_mapped']} of {o['n_mouse_genes']} mapped to human ({o['method']})",
                file=out,
            )
        print(
            f"  vocabulary genes in this file: {source.n_vocab_genes_found} of {report.n_genes} "
            f"({source.vocab_fraction:.1%})",
            file=out,
        )
        labels = ", ".join(f"{label} {n}" for label, n in source.labels.items())
        print(f"  labels ({len(source.labels)}): {labels}", file=out)
        if source.dropped_labels:
            dropped = ", ".join(f"{label} {n}" for label, n in source.dropped_labels.items())
            print(f"  labels left out (too few cells): {dropped}", file=out)
    print(f"\nRows per task / dataset / split (variants: {', '.join(report.variants)}):", file=out)
    print(rows_per_task_dataset_split(report.rows).to_string(), file=out)
    print(
        f"\nWrote {report.output}: {len(report.rows)} rows, {report.n_genes} genes, "
        f"in {report.wall_seconds:.0f} s",
        file=out,
    )


def run(args: argparse.Namespace, stdin: TextIO, out: TextIO) -> int:
    """Build the dataset and print the report."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        datasets.disable_progress_bars()
    sources, settings = collect_sources(args)
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    try:
        report = build_dataset_folder(
            args.output,
            sources,
            gene_vocab_from=args.gene_vocab_from,
            orthologs=args.orthologs,
            n_top_genes=args.n_top_genes,
            min_cells_per_label=args.min_cells_per_label,
            variants=variants,
            template_bank=args.template_bank,
            overwrite=args.overwrite,
            settings=settings,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(f"Interrupted: rerun the same command to resume from {args.output}.partial.", file=out)
        return 130
    print_report(report, out)
    return 0
