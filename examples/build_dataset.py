"""Build the multi-task InstructCell instruction dataset from the shared AnnData files and write Parquet.

    python examples/build_dataset.py --data-dir ../shared/datasets --output outputs/instructcell-data

Steps: QC / rare-label removal / mouse-to-human gene mapping and HVGs per dataset
(``datasets_builder.preprocessing``), gene vocabulary = sorted union of HVGs, then
``InstructCellDatasetBuilder`` for each variant. OUT receives ``train.parquet``, ``validation.parquet``,
``test.parquet``, ``gene_vocab.txt`` and ``dataset_info.json``. Every row's split is checked against the hash
rule and every template against its split. Intermediate results are cached in ``OUT.cache`` (a rerun
resumes from them); OUT itself is written to a temporary folder and renamed only when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import anndata
import datasets
import pandas as pd

from datasets_builder import (
    GENE_VOCAB_FILENAME,
    AnnDataSource,
    InstructCellDatasetBuilder,
    TemplateBank,
    split_of,
    write_gene_vocab,
)
from datasets_builder.preprocessing import (
    build_gene_vocab,
    highly_variable_genes,
    load_ortholog_table,
    preprocess_dataset,
)
from datasets_builder.templates import DEFAULT_BANK_DIR
from instructcell.tasks import tasks_of_family

# dataset name -> tasks it serves and its label column
DATASETS: dict[str, tuple[tuple[str, ...], str]] = {
    "bastidas_ponce_2019_pancreas": (("cta",), "cell_type"),
    "zheng2017_sorted_pbmc": (("cta", "cpcg"), "cell_type"),
    "kang2018_pbmc_ifnb_muscat": (("cta", "cpcg"), "cell_type"),
    "pc9_erlotinib_day11_dsp": (("dsp",), "drug_response"),
}
# built only when named in --datasets (e.g. by examples/demo.py when ../shared/datasets is absent)
OPTIONAL_DATASETS: dict[str, tuple[tuple[str, ...], str]] = {
    "pbmc68k_reduced_counts": (("cta", "cpcg"), "cell_type"),
}
COUNT_COLUMNS = ["task", "variant", "dataset", "cell_id", "split", "template_id"]
logger = logging.getLogger("build_dataset")


def _species(adata: anndata.AnnData, name: str) -> str:
    values = adata.obs["species"].astype(str).unique() if "species" in adata.obs else []
    if len(values) != 1:
        raise ValueError(
            f"{name}: expected one value in obs['species'], got {list(values)}; set it before building."
        )
    return values[0]


def select_datasets(names: str | None) -> dict[str, tuple[tuple[str, ...], str]]:
    """Return the ``{name: (tasks, label_key)}`` entries named in ``names`` (default: DATASETS)."""
    if not names:
        return dict(DATASETS)
    known = {**DATASETS, **OPTIONAL_DATASETS}
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise ValueError(f"Unknown datasets {unknown}; choose from {sorted(known)}.")
    return {name: known[name] for name in chosen}


def preprocess_all(
    data_dir: Path,
    work_dir: Path,
    n_top_genes: int,
    orthologs_path: str,
    selected: dict[str, tuple[tuple[str, ...], str]] | None = None,
) -> list[str]:
    """Preprocess every dataset into ``work_dir`` (reusing finished files) and return the gene vocabulary."""
    selected = DATASETS if selected is None else selected
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: data_dir / name / f"{name}.h5ad" for name in selected}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise ValueError(
            f"Missing input files {missing}: pass --data-dir pointing to the shared datasets folder."
        )
    orthologs = load_ortholog_table(orthologs_path) if orthologs_path else None
    human_symbols: set[str] = set()
    for path in paths.values():
        backed = anndata.read_h5ad(path, backed="r")
        if _species(backed, path.stem) == "human":
            human_symbols.update(backed.var_names.astype(str))
        backed.file.close()
    hvg_lists = []
    for name, (_, label_key) in selected.items():
        out, hvg_file = work_dir / f"{name}.h5ad", work_dir / f"{name}.hvg.txt"
        if not (out.exists() and hvg_file.exists()):
            adata = anndata.read_h5ad(paths[name])
            species = _species(adata, name)
            n_before = adata.shape
            adata = preprocess_dataset(
                adata,
                species,
                label_key,
                drop_rare_labels=label_key == "cell_type",
                orthologs=orthologs,
                human_symbols=human_symbols,
            )
            logger.info("%s: %s -> %s after preprocessing", name, n_before, adata.shape)
            hvgs = highly_variable_genes(adata, n_top_genes)
            tmp = out.with_suffix(".tmp.h5ad")
            adata.write_h5ad(tmp, compression="gzip")
            os.replace(tmp, out)
            hvg_file.write_text("\n".join(hvgs) + "\n")
        hvg_lists.append(hvg_file.read_text().split("\n")[:-1])
    return build_gene_vocab(hvg_lists)


def verify(table: pd.DataFrame, bank: TemplateBank) -> None:
    """Check every row's split against the hash rule and its template against the same split."""
    wrong = [
        (d, c, s)
        for d, c, s in zip(table["dataset"], table["cell_id"], table["split"], strict=True)
        if split_of(d, c) != s
    ]
    if wrong:
        raise RuntimeError(f"{len(wrong)} rows break the split rule, e.g. {wrong[:3]}")
    allowed = {(t.task, t.variant, t.split, t.id) for t in bank.templates}
    bad = table[
        [
            (t, v, s, i) not in allowed
            for t, v, s, i in zip(
                table["task"], table["variant"], table["split"], table["template_id"], strict=True
            )
        ]
    ]
    if len(bad):
        raise RuntimeError(
            f"{len(bad)} rows use a template of another split, e.g. {bad.head(3).to_dict('records')}"
        )
    if table.duplicated(["task", "variant", "dataset", "cell_id"]).any():
        raise RuntimeError("Duplicated (task, variant, dataset, cell_id) rows.")


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--n-top-genes", type=int, default=3600)
    parser.add_argument("--variant", choices=["instruct", "chat", "both"], default="both")
    parser.add_argument(
        "--datasets",
        default=None,
        help=f"Comma-separated subset of {sorted({**DATASETS, **OPTIONAL_DATASETS})} "
        f"(default: {sorted(DATASETS)}).",
    )
    parser.add_argument(
        "--multicell",
        action="store_true",
        help="Also build the multi-cell and follow-up tasks for every dataset with cell type annotation.",
    )
    parser.add_argument("--orthologs", default="", help="MGI/BioMart mouse->human table (file or URL).")
    parser.add_argument("--template-bank", default=str(DEFAULT_BANK_DIR))
    parser.add_argument("--cache-dir", type=Path, default=None, help="Default: OUTPUT.cache")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    output = args.output.resolve()
    if output.exists() and not args.overwrite:
        raise SystemExit(f"{output} exists: pass --overwrite or choose another --output.")
    cache = (args.cache_dir or output.with_name(output.name + ".cache")).resolve()
    selected = select_datasets(args.datasets)
    if args.multicell:
        selected = {
            name: ((*tasks, *tasks_of_family("multicell")) if "cta" in tasks else tasks, label_key)
            for name, (tasks, label_key) in selected.items()
        }
    settings = {
        "n_top_genes": args.n_top_genes,
        "orthologs": args.orthologs,
        "data_dir": str(args.data_dir.resolve()),
    }
    if args.datasets:  # only then, so that default builds keep their cache key
        settings["datasets"] = sorted(selected)
    work_dir = cache / (
        "preprocessed-" + hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    )

    vocab = preprocess_all(args.data_dir, work_dir, args.n_top_genes, args.orthologs, selected)
    vocab_path = work_dir / GENE_VOCAB_FILENAME
    write_gene_vocab(vocab, vocab_path)
    logger.info("Gene vocabulary: %d genes", len(vocab))
    sources = [
        AnnDataSource(str(work_dir / f"{name}.h5ad"), task=task, name=name, label_key=label_key)
        for name, (tasks, label_key) in selected.items()
        for task in tasks
    ]
    variants = ["instruct", "chat"] if args.variant == "both" else [args.variant]
    per_split: dict[str, list[datasets.Dataset]] = {}
    for variant in variants:
        builder = InstructCellDatasetBuilder(
            config_name=f"all-{variant}",
            cache_dir=str(cache / "hf"),
            sources=sources,
            gene_vocab=str(vocab_path),
            template_bank=args.template_bank,
        )
        builder.download_and_prepare()
        for split in ("train", "validation", "test"):
            per_split.setdefault(split, []).append(builder.as_dataset(split))

    bank = TemplateBank.load(args.template_bank)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    tmp.chmod(0o755)
    try:
        tables = []
        for split, parts in per_split.items():
            ds = datasets.concatenate_datasets(parts)
            table = ds.select_columns(COUNT_COLUMNS).to_pandas()
            verify(table, bank)
            tables.append(table)
            ds.to_parquet(str(tmp / f"{split}.parquet"))
        table = pd.concat(tables)
        counts = table.groupby(["task", "dataset", "split"]).size().unstack("split", fill_value=0)
        counts = counts[["train", "validation", "test"]]
        write_gene_vocab(vocab, tmp / GENE_VOCAB_FILENAME)
        info = {
            "settings": settings,
            "variants": variants,
            "n_genes": len(vocab),
            "n_rows": len(table),
            "rows_per_split": table["split"].value_counts().to_dict(),
            "rows_per_task_dataset_split": {f"{t}/{d}": row.to_dict() for (t, d), row in counts.iterrows()},
            "features": {k: str(v) for k, v in per_split["train"][0].features.items()},
            "split_rule": "int(sha1(f'{dataset}/{cell_id}').hexdigest(), 16) % 10: 0-7 train, 8 validation, "
            "9 test",
            "wall_time_s": round(time.time() - start, 1),
        }
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(
        f"\nRows per task / dataset / split (variants: {', '.join(variants)}; counts include every variant):"
    )
    print(counts.to_string())
    print(
        f"\ntotal: {len(table)} rows, {len(vocab)} genes; every split matches the hash rule; wrote {output}"
    )
    print(f"wall time: {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
