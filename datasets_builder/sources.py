"""What a dataset is built from: AnnData files, each with its tasks, label column and metadata.

A :class:`DataSource` is one ``.h5ad`` file used for one or more tasks of :mod:`instructcell.tasks`.
``instructcell build-data`` makes them from ``--h5ad`` flags, from a YAML file (:func:`read_sources_file`) and
from the shared datasets (:func:`shared_sources`). A sources file::

    sources:
      - path: pancreas.h5ad          # relative to this file
        tasks: [cta]                 # default [cta]
        label_key: cell_type         # default: the tasks' label column
        species: human               # default: obs["species"]; human or mouse
        tissue: pancreas             # default: obs["tissue"]
        sequencing_method: inDrop    # default: obs["sequencing_method"]
        layer: counts                # raw counts in a layer instead of X
        drop_rare_labels: true       # default false: a label with too few cells is an error
      - path: pc9.h5ad
        tasks: [dsp]
        drug: erlotinib

:func:`inspect_source` checks a source before any work: the file, its label column and label counts, the
metadata its tasks need, the species and a first chunk of raw counts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd

from instructcell.tasks import get_task, tasks_of_family

from .anndata_source import AnnDataSource, check_raw_counts, read_obs_fields

SPECIES = ("human", "mouse")

#: The shared datasets (``../shared/datasets/<name>/<name>.h5ad``): tasks each serves, its label column.
SHARED_DATASETS: dict[str, tuple[tuple[str, ...], str]] = {
    "bastidas_ponce_2019_pancreas": (("cta",), "cell_type"),
    "zheng2017_sorted_pbmc": (("cta", "cpcg"), "cell_type"),
    "kang2018_pbmc_ifnb_muscat": (("cta", "cpcg"), "cell_type"),
    "pc9_erlotinib_day11_dsp": (("dsp",), "drug_response"),
}
#: Shared datasets built only when named (``--datasets``), e.g. the demo's fallback.
OPTIONAL_SHARED_DATASETS: dict[str, tuple[tuple[str, ...], str]] = {
    "pbmc68k_reduced_counts": (("cta", "cpcg"), "cell_type"),
}


@dataclass(frozen=True)
class DataSource(AnnDataSource):
    """One ``.h5ad`` file (cells x genes, raw counts) used for one or more tasks.

    An :class:`~datasets_builder.anndata_source.AnnDataSource` (the file, its name, label column, metadata and
    layer) with every task it serves and the rare-label rule.

    Parameters
    ----------
    path, name, species, tissue, sequencing_method, drug, layer
        As :class:`~datasets_builder.anndata_source.AnnDataSource`.
    task
        The first task (default ``"cta"``).
    label_key
        ``obs`` column with the labels; default: the tasks' label column (they must agree).
    tasks
        Every task (:mod:`instructcell.tasks`); default ``(task,)``. Each cell gives one example per task.
    drop_rare_labels
        Leave out labels with fewer than the build's ``min_cells_per_label`` cells; otherwise they are an
        error.
    """

    task: str = "cta"
    tasks: tuple[str, ...] = ()
    drop_rare_labels: bool = False

    def __post_init__(self) -> None:
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks) or (self.task,)
        label_keys = {get_task(task).label_key for task in tasks}
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "task", tasks[0])
        if not self.label_key and len(label_keys) > 1:
            raise ValueError(
                f"{self.path}: tasks {list(tasks)} read different label columns {sorted(label_keys)}; "
                "name one (--label-key / label_key:) or list the file once per task."
            )
        super().__post_init__()
        if self.species and self.species not in SPECIES:
            raise ValueError(f"{self.path}: species must be one of {SPECIES}, got {self.species!r}.")

    def task_sources(self, path: str | os.PathLike | None = None) -> list[AnnDataSource]:
        """Return one :class:`~.anndata_source.AnnDataSource` per task, reading ``path`` or the file."""
        common = {f.name: getattr(self, f.name) for f in fields(AnnDataSource)}
        if path is not None:  # a preprocessed copy: raw counts in X
            common.update(path=os.fspath(path), layer="")
        return [AnnDataSource(**{**common, "task": task}) for task in self.tasks]

    def describe(self) -> dict:
        """Return the source's fields as plain values (for ``dataset_info.json``)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


@dataclass
class SourceInfo:
    """What :func:`inspect_source` found: the species and the label counts of the file as given."""

    species: str
    n_cells: int
    n_genes: int
    label_counts: dict[str, int] = field(default_factory=dict)


def read_sources_file(path: str | os.PathLike) -> list[DataSource]:
    """Read a YAML sources file (see the module docstring); relative paths are relative to the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"No sources file {path}.")
    content = yaml.safe_load(path.read_text()) or {}
    entries = content.get("sources") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path} must hold `sources:`, a list of entries with at least a `path:`.")
    known = {f.name for f in fields(DataSource)}
    sources = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{path}: source {i + 1} needs a `path:`.")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{path}: source {i + 1} has unknown keys {unknown}; known: {sorted(known)}.")
        entry = {**entry, "path": str(path.parent / Path(entry["path"]).expanduser())}
        sources.append(DataSource(**entry))
    return sources


def shared_sources(data_dir: str | os.PathLike, names: Sequence[str] | None = None) -> list[DataSource]:
    """Return the shared datasets as sources (default: :data:`SHARED_DATASETS`) with the paper's label rule.

    Parameters
    ----------
    data_dir
        The folder holding ``<name>/<name>.h5ad`` (``../shared/datasets``).
    names
        A subset of :data:`SHARED_DATASETS` and :data:`OPTIONAL_SHARED_DATASETS`.
    """
    known = {**SHARED_DATASETS, **OPTIONAL_SHARED_DATASETS}
    chosen = list(SHARED_DATASETS) if names is None else list(names)
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise ValueError(f"Unknown shared datasets {unknown}; choose from {sorted(known)}.")
    missing = [name for name in chosen if not (Path(data_dir) / name / f"{name}.h5ad").is_file()]
    if missing:
        raise ValueError(
            f"No {', '.join(f'{name}/{name}.h5ad' for name in missing)} in {data_dir}: pass the shared "
            "datasets folder (../shared/datasets)."
        )
    return [
        DataSource(
            str(Path(data_dir) / name / f"{name}.h5ad"),
            tasks=known[name][0],
            label_key=known[name][1],
            drop_rare_labels=any(get_task(task).drop_rare_labels for task in known[name][0]),
        )
        for name in chosen
    ]


def with_multicell_tasks(sources: Sequence[DataSource]) -> list[DataSource]:
    """Add the multi-cell and follow-up tasks to every source of cell type annotation (``--multicell``).

    They read the same label column as cell type annotation, so each such source serves them as it is;
    sources without cell type annotation are returned unchanged.

    Parameters
    ----------
    sources
        The build's sources.

    Returns
    -------
    list of DataSource
        The sources, those with ``cta`` among their tasks followed by the ``multicell`` family's tasks.
    """
    multicell = tasks_of_family("multicell")
    return [
        replace(source, tasks=(*source.tasks, *(t for t in multicell if t not in source.tasks)))
        if "cta" in source.tasks
        else source
        for source in sources
    ]


def _species(source: DataSource, obs: pd.DataFrame) -> str:
    if source.species:
        return source.species
    values = obs["species"].astype(str).unique().tolist() if "species" in obs.columns else []
    if len(values) != 1 or values[0] not in SPECIES:
        raise ValueError(
            f"{source.name} ({source.path}): the species is needed (QC, mouse genes to human) and "
            f"obs['species'] holds {values}: pass --species human or --species mouse (species: in a sources "
            "file)."
        )
    return values[0]


def _first_counts(source: DataSource, adata: anndata.AnnData, n_rows: int = 1024) -> np.ndarray:
    """Read the stored values of the first ``n_rows`` cells of ``X`` or of the source's layer."""
    if not source.layer:
        chunk = adata.X[:n_rows]
    else:
        with h5py.File(source.path, "r") as f:
            if f"layers/{source.layer}" not in f:
                layers = list(f["layers"]) if "layers" in f else []
                raise ValueError(
                    f"{source.path} has no layer {source.layer!r} (layers: {layers}): check --layer."
                )
            chunk = anndata.io.sparse_dataset(f[f"layers/{source.layer}"])[:n_rows]
    return np.asarray(chunk.data if hasattr(chunk, "data") else chunk)


def inspect_source(source: DataSource, min_cells_per_label: int) -> SourceInfo:
    """Check a source before any work is done; every problem found is a ``ValueError`` that says the fix.

    Checks: the file exists and opens, its label column exists and labels every cell, each task's metadata
    is given or in ``obs``, the species is human or mouse, the first cells hold raw integer counts, and
    (unless ``drop_rare_labels``) every label has ``min_cells_per_label`` cells. Reads ``obs`` and one chunk.
    """
    if not Path(source.path).is_file():
        raise ValueError(f"No file {source.path}: check the path of dataset {source.name!r}.")
    try:
        adata = anndata.read_h5ad(source.path, backed="r")
    except (OSError, KeyError) as err:
        raise ValueError(f"{source.path} is not a readable .h5ad file ({err}).") from err
    try:
        obs = adata.obs.copy()
        for task_source in source.task_sources():
            read_obs_fields(task_source, obs)
        species = _species(source, obs)
        where = f"{'X' if not source.layer else f'layers[{source.layer!r}]'} of {source.path}"
        check_raw_counts(_first_counts(source, adata), where)
        info = SourceInfo(species, adata.n_obs, adata.n_vars)
    finally:
        adata.file.close()
    counts = obs[source.label_key].astype(str).value_counts()
    info.label_counts = {str(label): int(n) for label, n in counts.items()}
    enough = [label for label, n in info.label_counts.items() if n >= min_cells_per_label]
    if len(enough) < 2 and any(get_task(task).answer_is_label for task in source.tasks):
        raise ValueError(
            f"{source.name} ({source.path}): {len(enough)} label(s) of {source.label_key!r} have "
            f"{min_cells_per_label} cells or more ({info.label_counts}), and {', '.join(source.tasks)} needs "
            "two: check --label-key, or lower --min-cells-per-label."
        )
    if not source.drop_rare_labels:
        from .preprocessing import check_label_counts  # scanpy is imported on demand

        try:
            check_label_counts(
                anndata.AnnData(obs=obs[[source.label_key]]), source.label_key, min_cells_per_label
            )
        except ValueError as err:
            raise ValueError(f"{source.name} ({source.path}): {err}") from None
    return info
