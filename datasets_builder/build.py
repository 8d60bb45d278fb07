"""From AnnData files to a built dataset folder, in one call: :func:`build_dataset_folder`.

Steps: check every source before any work (:func:`~datasets_builder.sources.inspect_source`); preprocess each
file (:func:`~datasets_builder.preprocessing.preprocess_dataset`: gene symbols, QC, mouse genes to human,
rare labels); take the gene vocabulary (the sorted union of each file's highly variable genes, or a saved
model's vocabulary with ``gene_vocab_from``) and check each file's share of it; run
:class:`~datasets_builder.builder.InstructCellDatasetBuilder` per variant; check every row's split and
template; write ``train/validation/test.parquet``, ``gene_vocab.txt`` and ``dataset_info.json``.

The work happens in ``<output>.partial`` (preprocessed files, the builder's Arrow cache), so an interrupted
build resumes where it stopped when rerun; the output folder appears only once complete, by a rename, and
``<output>.partial`` is removed. A bad input (a ``ValueError``) removes it too and leaves nothing behind.
Input files are only read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anndata
import datasets
import pandas as pd

from instructcell.tasks import get_task
from modeling_instructcell.feature_extraction_instructcell import gene_identifiers

from .builder import InstructCellDatasetBuilder
from .gene_vocab import GENE_VOCAB_FILENAME, write_gene_vocab
from .sources import DataSource, SourceInfo, inspect_source
from .splits import SPLITS, split_of
from .templates import DEFAULT_BANK_DIR, VARIANTS, TemplateBank

logger = logging.getLogger(__name__)

COUNT_COLUMNS = ["task", "variant", "dataset", "cell_id", "split", "template_id"]
#: Smallest share of the genes of a file, or of the other files of a new vocabulary when they hold fewer,
#: that both sides hold (a 1,000-gene panel inside a whole transcriptome shares all of its genes). Below it
#: the files name genes differently (Ensembl ids against symbols, unmapped species) and the model would
#: read them as unrelated genes.
MIN_SHARED_GENE_FRACTION = 0.1
SPLIT_RULE = "int(sha1(f'{dataset}/{cell_id}').hexdigest(), 16) % 10: 0-7 train, 8 validation, 9 test"


@dataclass
class SourceReport:
    """What the build did with one source file (printed by ``instructcell build-data``)."""

    name: str
    path: str
    tasks: tuple[str, ...]
    species: str
    n_cells_in: int
    n_cells_after_qc: int
    n_cells: int
    n_genes: int
    gene_names_from: str
    labels: dict[str, int]
    dropped_labels: dict[str, int]
    n_vocab_genes_found: int = 0
    vocab_fraction: float = 0.0
    orthologs: dict[str, Any] | None = None


@dataclass
class BuildReport:
    """The result of :func:`build_dataset_folder`."""

    output: Path
    n_genes: int
    gene_vocab_from: str | None
    min_vocab_fraction: float | None
    variants: list[str]
    sources: list[SourceReport]
    rows: pd.DataFrame = field(repr=False)
    wall_seconds: float = 0.0


def _fingerprint(values: Any) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _file_key(path: str) -> list:
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def _read_counts(source: DataSource) -> anndata.AnnData:
    """Read the whole file into memory, raw counts in ``X`` (from the source's layer when it names one)."""
    adata = anndata.read_h5ad(source.path)
    if source.layer:
        adata.X = adata.layers[source.layer]
    adata.layers = {}
    return adata


def _symbols_of(path: str) -> list[str]:
    """Read a file's gene symbols as preprocessing names them (ids where it has no symbols)."""
    backed = anndata.read_h5ad(path, backed="r")
    try:
        symbols, ids = gene_identifiers(backed.var_names.astype(str).tolist(), backed.var)
    finally:
        backed.file.close()
    return symbols if symbols is not None else ids


def _preprocess(
    source: DataSource,
    info: SourceInfo,
    work_dir: Path,
    settings: Mapping[str, Any],
    vocabulary: Sequence[str] | None,
    human_symbols: Sequence[str],
    orthologs: Mapping[str, str] | None,
) -> tuple[Path, list[str], dict]:
    """Preprocess one file into ``work_dir`` (or reuse an earlier run's); return it, its HVGs and its report.

    With a fixed ``vocabulary`` no gene is filtered or selected: the file keeps every gene, as the model's
    feature extractor reads it at inference.
    """
    from .preprocessing import REPORT_KEY, highly_variable_genes, preprocess_dataset

    reference = sorted(human_symbols) if info.species == "mouse" and orthologs is None else None
    key = _fingerprint([_file_key(source.path), source.describe(), dict(settings), reference])
    out = work_dir / f"{source.name}-{key}.h5ad"
    hvg_file = out.with_suffix(".hvg.txt")
    if not (out.is_file() and hvg_file.is_file()):
        adata = _read_counts(source)
        qc = {} if vocabulary is None else {"min_cells": 0}
        adata = preprocess_dataset(
            adata,
            info.species,
            source.label_key,
            drop_rare_labels=source.drop_rare_labels,
            min_cells_per_label=settings["min_cells_per_label"],
            orthologs=orthologs,
            human_symbols=human_symbols,
            **qc,
        )
        hvgs = [] if vocabulary is not None else highly_variable_genes(adata, settings["n_top_genes"])
        tmp = out.with_suffix(".tmp.h5ad")
        adata.write_h5ad(tmp, compression="gzip")
        os.replace(tmp, out)
        hvg_file.write_text("".join(f"{g}\n" for g in hvgs))
    backed = anndata.read_h5ad(out, backed="r")
    try:
        report = json.loads(backed.uns[REPORT_KEY])
        labels = backed.obs[source.label_key].astype(str).value_counts()
        report["labels"] = {str(label): int(n) for label, n in labels.items()}
        report["genes"] = backed.var_names.astype(str).tolist()
    finally:
        backed.file.close()
    return out, [g for g in hvg_file.read_text().split("\n") if g], report


def _check_labels(source: DataSource, labels: Mapping[str, int]) -> None:
    """Refuse a source with fewer than two labels left when one of its tasks answers with a label."""
    if len(labels) < 2 and any(get_task(task).answer_is_label for task in source.tasks):
        raise ValueError(
            f"{source.name} ({source.path}) has {len(labels)} label(s) left after QC and rare-label removal "
            f"({dict(labels)}): {', '.join(source.tasks)} needs at least two; check --label-key or lower "
            "--min-cells-per-label."
        )


def _check_shared_genes(gene_sets: Mapping[str, set[str]]) -> None:
    """Refuse files of a new vocabulary that share almost no gene with the others (see the constant)."""
    if len(gene_sets) < 2:
        return
    for name, genes in gene_sets.items():
        others = set().union(*(g for other, g in gene_sets.items() if other != name))
        common = len(genes & others)
        shared = common / max(min(len(genes), len(others)), 1)
        if shared < MIN_SHARED_GENE_FRACTION:
            raise ValueError(
                f"{name} and the other files share only {common} genes, {shared:.1%} of the smaller side "
                f"({len(genes)} genes against {len(others)}; e.g. {sorted(genes)[:3]} against "
                f"{sorted(others)[:3]}): give every file gene symbols of one "
                "species (symbols in var_names or a feature_name / gene_symbols column; mouse genes with "
                "--species mouse and --orthologs TABLE), or build the files separately."
            )


def _vocab_share(genes: set[str], vocabulary: Sequence[str]) -> tuple[int, float]:
    """Count the vocabulary genes a file holds; return the count and its share of the vocabulary."""
    n_found = len(genes & set(vocabulary))
    return n_found, n_found / len(vocabulary)


def _check_vocab_overlap(
    source: DataSource, n_found: int, fraction: float, minimum: float, model: str
) -> None:
    if fraction < minimum:
        raise ValueError(
            f"{source.name} ({source.path}) holds {n_found} of the {model} model's genes ({fraction:.1%}), "
            f"below the {minimum:.1%} the model's processor accepts: give the file gene symbols of the "
            "model's species (symbols in var_names or a feature_name / gene_symbols column; mouse data with "
            "--species mouse and --orthologs TABLE), pass the full gene matrix rather than a subset, or "
            "train a model from scratch on it (build without --gene-vocab-from)."
        )


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
    keys = zip(table["task"], table["variant"], table["split"], table["template_id"], strict=True)
    bad = table[[key not in allowed for key in keys]]
    if len(bad):
        raise RuntimeError(
            f"{len(bad)} rows use a template of another split, e.g. {bad.head(3).to_dict('records')}"
        )
    if table.duplicated(["task", "variant", "dataset", "cell_id"]).any():
        raise RuntimeError("Duplicated (task, variant, dataset, cell_id) rows.")


def rows_per_task_dataset_split(rows: pd.DataFrame) -> pd.DataFrame:
    """Count rows with one row per (task, dataset) and one column per split."""
    counts = rows.groupby(["task", "dataset", "split"]).size().unstack("split", fill_value=0)
    return counts.reindex(columns=list(SPLITS), fill_value=0)


def build_dataset_folder(
    output: str | os.PathLike,
    sources: Sequence[DataSource],
    *,
    gene_vocab_from: str | os.PathLike | None = None,
    orthologs: str = "",
    n_top_genes: int = 3600,
    min_cells_per_label: int = 20,
    variants: Sequence[str] = VARIANTS,
    template_bank: str | os.PathLike = DEFAULT_BANK_DIR,
    overwrite: bool = False,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> BuildReport:
    """Build the instruction dataset of ``sources`` into the folder ``output``.

    Parameters
    ----------
    output : path
        The dataset folder to write (``train/validation/test.parquet``, ``gene_vocab.txt``,
        ``dataset_info.json``).
    sources : sequence of DataSource
        The files, with distinct names.
    gene_vocab_from : path, optional
        A saved model folder: use its gene vocabulary instead of building one, so that the model can be
        fine-tuned on the result (``instructcell train --init_from``). Each file must hold at least the
        share of it that the model's processor accepts (``min_gene_overlap``).
    orthologs : str
        Mouse -> human ortholog table (file or URL; :func:`~.preprocessing.load_ortholog_table`) for mouse
        files; without it mouse symbols are matched to human ones case-insensitively.
    n_top_genes : int
        Highly variable genes per file for a new vocabulary.
    min_cells_per_label : int
        Labels with fewer cells are an error, or dropped for sources with ``drop_rare_labels``.
    variants : sequence of {"instruct", "chat"}
    template_bank : path
        Template bank folder or ``.jsonl`` file.
    overwrite : bool
        Replace an existing ``output`` (only once the new build is complete).
    settings : mapping, optional
        What ``dataset_info.json`` records under ``settings`` to describe the inputs (default: the sources
        and the options above).
    progress : bool
        Show progress bars.

    Returns
    -------
    BuildReport

    Raises
    ------
    ValueError
        ``output`` exists (without ``overwrite``), unknown variants, duplicated source names, and every bad
        input found by :func:`~datasets_builder.sources.inspect_source`, preprocessing and the gene-overlap
        checks; nothing is left on disk then.
    """
    start = time.time()
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists: pass --overwrite (overwrite=True) or choose another output.")
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output} is a file, not a dataset folder: choose another output.")
    if not sources:
        raise ValueError("No source: pass --h5ad FILE, --sources FILE.yaml or --shared-datasets DIR.")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(
            f"Two sources share a name in {names}: rename a file or set `name:` in a sources file"
        )
    variants = list(variants)
    if not variants or set(variants) - set(VARIANTS):
        raise ValueError(f"variants must be among {VARIANTS}, got {variants}.")
    bank = TemplateBank.load(template_bank)
    vocabulary, min_fraction, model = None, None, None
    if gene_vocab_from is not None:
        from instructcell.hub import load_processor

        feature_extractor = load_processor(gene_vocab_from).feature_extractor
        vocabulary, min_fraction = list(feature_extractor.gene_names), feature_extractor.min_gene_overlap
        model = str(gene_vocab_from)
    ortholog_table = _ortholog_table(orthologs)
    infos = {s.name: inspect_source(s, min_cells_per_label) for s in sources}
    if vocabulary is not None:  # human files are checked before any work, mouse ones once mapped
        for source in sources:
            if infos[source.name].species == "human":
                share = _vocab_share(set(_symbols_of(source.path)), vocabulary)
                _check_vocab_overlap(source, *share, min_fraction, model)
    if settings is None:
        settings = {
            "sources": [s.describe() for s in sources],
            "n_top_genes": n_top_genes,
            "orthologs": orthologs,
            "gene_vocab_from": None if model is None else str(Path(model).resolve()),
            "min_cells_per_label": min_cells_per_label,
        }
    options = {
        "n_top_genes": n_top_genes,
        "min_cells_per_label": min_cells_per_label,
        "orthologs": orthologs,
        "vocabulary": None if vocabulary is None else _fingerprint(vocabulary),
    }

    work_dir = output.with_name(output.name + ".partial")
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        paths, vocabulary, reports = _preprocess_all(
            sources, infos, work_dir, options, vocabulary, ortholog_table
        )
        if min_fraction is not None:
            for source, report in zip(sources, reports, strict=True):
                _check_vocab_overlap(
                    source, report.n_vocab_genes_found, report.vocab_fraction, min_fraction, model
                )
        vocab_path = work_dir / GENE_VOCAB_FILENAME
        write_gene_vocab(vocabulary, vocab_path)
        task_sources = [t for s in sources for t in s.task_sources(paths[s.name])]
        per_split: dict[str, list[datasets.Dataset]] = {split: [] for split in SPLITS}
        for variant in variants:
            builder = InstructCellDatasetBuilder(
                config_name=f"all-{variant}",
                cache_dir=str(work_dir / "hf"),
                sources=task_sources,
                gene_vocab=str(vocab_path),
                template_bank=str(template_bank),
                progress=progress,
            )
            builder.download_and_prepare()
            for split in SPLITS:
                per_split[split].append(builder.as_dataset(split))
        info = {
            "settings": dict(settings),
            "variants": variants,
            "n_genes": len(vocabulary),
            "gene_vocab_from": model,
            "sources": [asdict(report) for report in reports],
            "features": {k: str(v) for k, v in per_split["train"][0].features.items()},
            "split_rule": SPLIT_RULE,
        }
        rows = _write_folder(output, per_split, vocabulary, bank, info, start)
    except ValueError:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
    return BuildReport(
        output=output,
        n_genes=len(vocabulary),
        gene_vocab_from=model,
        min_vocab_fraction=min_fraction,
        variants=variants,
        sources=reports,
        rows=rows,
        wall_seconds=round(time.time() - start, 1),
    )


def _ortholog_table(orthologs: str) -> dict[str, str] | None:
    if not orthologs:
        return None
    from .preprocessing import load_ortholog_table

    if not orthologs.startswith(("http://", "https://")) and not Path(orthologs).is_file():
        raise ValueError(f"No ortholog table {orthologs}: pass an MGI or BioMart mouse -> human table file.")
    return load_ortholog_table(orthologs)


def _preprocess_all(
    sources: Sequence[DataSource],
    infos: Mapping[str, SourceInfo],
    work_dir: Path,
    options: Mapping[str, Any],
    vocabulary: list[str] | None,
    orthologs: Mapping[str, str] | None,
) -> tuple[dict[str, Path], list[str], list[SourceReport]]:
    """Preprocess every source; return the files, the vocabulary and what happened to each source.

    The vocabulary is the given one, or the sorted union of the files' highly variable genes. Mouse genes
    without an ortholog table are matched to the vocabulary, or to the human files' symbols.
    """
    human_symbols = vocabulary
    if vocabulary is None:
        human = [s for s in sources if infos[s.name].species == "human"]
        human_symbols = sorted({g for s in human for g in _symbols_of(s.path)})
    paths, hvg_lists, found = {}, [], []
    for source in sources:
        path, hvgs, report = _preprocess(
            source, infos[source.name], work_dir, options, vocabulary, human_symbols, orthologs
        )
        _check_labels(source, report["labels"])
        paths[source.name] = path
        hvg_lists.append(hvgs)
        found.append(report)
    if vocabulary is None:
        _check_shared_genes({s.name: set(r["genes"]) for s, r in zip(sources, found, strict=True)})
        vocabulary = sorted({g for genes in hvg_lists for g in genes})
    reports = []
    for source, report in zip(sources, found, strict=True):
        n_found, fraction = _vocab_share(set(report["genes"]), vocabulary)
        reports.append(
            SourceReport(
                name=source.name,
                path=source.path,
                tasks=source.tasks,
                species=infos[source.name].species,
                n_cells_in=report["n_cells_in"],
                n_cells_after_qc=report["n_cells_after_qc"],
                n_cells=report["n_cells"],
                n_genes=report["n_genes"],
                gene_names_from=report["gene_names_from"],
                labels=report["labels"],
                dropped_labels=report["dropped_labels"],
                n_vocab_genes_found=n_found,
                vocab_fraction=fraction,
                orthologs=report.get("orthologs"),
            )
        )
    return paths, vocabulary, reports


def _write_folder(
    output: Path,
    per_split: Mapping[str, list[datasets.Dataset]],
    vocabulary: list[str],
    bank: TemplateBank,
    info: dict[str, Any],
    start: float,
) -> pd.DataFrame:
    """Write the folder next to ``output`` and rename it into place; return the rows' provenance columns."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    tmp.chmod(0o755)
    try:
        tables = []
        for split in SPLITS:
            rows = datasets.concatenate_datasets(list(per_split[split]))
            table = rows.select_columns(COUNT_COLUMNS).to_pandas()
            verify(table, bank)
            tables.append(table)
            rows.to_parquet(str(tmp / f"{split}.parquet"))
        provenance = pd.concat(tables, ignore_index=True)
        write_gene_vocab(vocabulary, tmp / GENE_VOCAB_FILENAME)
        counts = rows_per_task_dataset_split(provenance)
        info = {
            **info,
            "n_rows": len(provenance),
            "rows_per_split": provenance["split"].value_counts().to_dict(),
            "rows_per_task_dataset_split": {f"{t}/{d}": row.to_dict() for (t, d), row in counts.iterrows()},
            "wall_time_s": round(time.time() - start, 1),
        }
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return provenance
