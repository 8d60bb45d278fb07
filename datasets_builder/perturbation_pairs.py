"""Pair perturbed cells with control cells: the examples of perturbation response prediction (``prp``).

A perturbation experiment measures different cells before and after the perturbation, so there is no true
(control, perturbed) pair of the same cell. Each perturbed cell is paired with one control cell of the same
cell type, and of the same donor or sample when the file says which (``pair_key``): the pair then differs
only by the perturbation and by cell-to-cell variation, not by cell type or donor. The control is picked
deterministically from ``sha1("<dataset>/<perturbed cell>/control")`` among the candidates of the perturbed
cell's split (split by :func:`~datasets_builder.splits.split_of`, so test rows read test controls), or among
all candidates when that split has none. Every control cell also gives one row that maps it onto itself
under :data:`~instructcell.tasks.CONTROL_PERTURBATION` (``control_rows``): the model sees the control cells
of every cell type, also those never seen perturbed, and learns what "unchanged" is.

>>> source = PerturbationSource("kang.h5ad", task="prp", condition_key="condition",   # doctest: +SKIP
...                             control_value="control", pair_key="donor", perturbation="interferon beta")
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import anndata
import datasets
import numpy as np

from instructcell.tasks import CONTROL_PERTURBATION, get_task

from .anndata_source import AnnDataReader, AnnDataSource, CellRecord
from .splits import split_of

__all__ = [
    "PairedCellRecord",
    "PairingDesign",
    "PerturbationSource",
    "paired_cells",
    "pairing_design",
    "perturbation_names",
]


@dataclass(frozen=True)
class PerturbationSource(AnnDataSource):
    """An ``.h5ad`` file of control and perturbed cells for the ``prp`` task.

    Parameters
    ----------
    condition_key : str
        ``obs`` column saying which condition each cell is in.
    control_value : str
        The value of ``condition_key`` of the control (unperturbed) cells.
    pair_key : str
        Optional ``obs`` column that a perturbed cell and its control must share (donor, sample); "" pairs
        within cell types only.
    perturbation : str
        The perturbation in words, as instructions name it ("interferon beta"); default: the perturbed cells'
        ``condition_key`` value. Needs a single perturbed condition.
    control_rows : bool
        Also write one row per control cell mapping it onto itself under ``CONTROL_PERTURBATION``.

    Other parameters are :class:`~datasets_builder.anndata_source.AnnDataSource`'s; ``label_key`` is the cell
    type column.
    """

    condition_key: str = "condition"
    control_value: str = "control"
    pair_key: str = ""
    perturbation: str = ""
    control_rows: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not get_task(self.task).pairs_cells:
            raise ValueError(
                f"PerturbationSource is for tasks that pair cells (prp), not {self.task!r}: use "
                "AnnDataSource."
            )
        if self.perturbation.strip().lower() == CONTROL_PERTURBATION:
            raise ValueError(
                f"perturbation={self.perturbation!r} is the name of the control rows: rename it."
            )


@dataclass
class PairedCellRecord(CellRecord):
    """A perturbed (or control) cell as the target, with the control cell the instruction reads."""

    input_cell: CellRecord


@dataclass
class PairingDesign:
    """Who is a control, which group (cell type, donor) each cell is in, and the words of each condition.

    Attributes
    ----------
    conditions : numpy.ndarray
        ``(n_cells,)`` condition values.
    is_control : numpy.ndarray
        ``(n_cells,)`` bool.
    groups : list of (str, str)
        ``(n_cells,)`` (cell type, ``pair_key`` value or "").
    texts : dict of str to str
        Perturbed condition value -> the perturbation in words.
    pools : dict
        Group -> rows of its control cells.
    """

    conditions: np.ndarray
    is_control: np.ndarray
    groups: list[tuple[str, str]]
    texts: dict[str, str]
    pools: dict[tuple[str, str], list[int]]


def pairing_design(source: AnnDataSource) -> PairingDesign:
    """Read and check a source's design from its ``obs``, before any cell is read.

    Raises
    ------
    ValueError
        A plain :class:`AnnDataSource` (says what to pass instead), a missing or incomplete cell type,
        condition or pair column, no control or no perturbed cells, or perturbed cells of a cell type (and
        donor) without any control cell.
    """
    where = f"{source.name} ({source.path})"
    if not isinstance(source, PerturbationSource):
        raise ValueError(
            f"{where}: the {source.task} task pairs perturbed with control cells; describe the file with "
            "datasets_builder.PerturbationSource(path, task=..., condition_key=..., control_value=...)."
        )
    adata = anndata.read_h5ad(source.path, backed="r")
    try:
        columns = {
            option: _column(adata.obs, key, option, where)
            for option, key in (
                ("label_key", source.label_key),
                ("condition_key", source.condition_key),
                ("pair_key", source.pair_key),
            )
            if key
        }
    finally:
        adata.file.close()
    conditions = columns["condition_key"]
    texts = _perturbation_texts(source, conditions, where)
    is_control = conditions == source.control_value
    pairs = columns.get("pair_key", np.full(conditions.shape, "", dtype=object))
    groups = list(zip(columns["label_key"], pairs, strict=True))
    pools: dict[tuple[str, str], list[int]] = {}
    for index in np.flatnonzero(is_control):
        pools.setdefault(groups[index], []).append(int(index))
    _check_pools(source, where, pools, groups, is_control)
    return PairingDesign(conditions, is_control, groups, texts, pools)


_COLUMN_PURPOSE = {
    "label_key": "holds each cell's type",
    "condition_key": "says which cells are controls",
    "pair_key": "holds each cell's donor or sample",
}


def _column(obs, key: str, option: str, where: str) -> np.ndarray:
    """Return an ``obs`` column as strings; a ``ValueError`` when it is missing or has missing values."""
    if key not in obs.columns:
        raise ValueError(
            f"{where} has no obs column {key!r} ({option}); columns: {list(obs.columns)}. Pass {option}=... "
            f"naming the column that {_COLUMN_PURPOSE[option]}."
        )
    missing = obs[key].isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"{where}: {int(missing.sum())} cells have no {key!r} value (e.g. {obs.index[missing][0]!r}): "
            "fill it in or drop those cells before building."
        )
    return obs[key].astype(str).to_numpy()


def _perturbation_texts(source: PerturbationSource, conditions: np.ndarray, where: str) -> dict[str, str]:
    """Map every perturbed condition value to its words."""
    values = sorted(set(conditions.tolist()) - {source.control_value})
    if source.control_value not in set(conditions.tolist()):
        raise ValueError(
            f"{where}: no cell has {source.condition_key} == {source.control_value!r} (values: "
            f"{sorted(set(conditions.tolist()))}): pass control_value=... naming the control condition."
        )
    if not values:
        raise ValueError(f"{where}: every cell is a control ({source.control_value!r}); no perturbed cells.")
    if source.perturbation and len(values) > 1:
        raise ValueError(
            f"{where} has {len(values)} perturbed conditions {values} but one "
            f"perturbation={source.perturbation!r}: "
            "build one source per condition (filter the file) or leave perturbation empty to use the values."
        )
    texts = {value: source.perturbation or value for value in values}
    clash = [value for value, text in texts.items() if text.strip().lower() == CONTROL_PERTURBATION]
    if clash:
        raise ValueError(f"{where}: condition {clash[0]!r} is the name of the control rows: rename it.")
    return texts


def _check_pools(
    source: PerturbationSource,
    where: str,
    pools: dict[tuple[str, str], list[int]],
    groups: list[tuple[str, str]],
    is_control: np.ndarray,
) -> None:
    """Raise for perturbed cells whose cell type (and donor) has no control cell, naming every such group."""
    orphans: dict[tuple[str, str], int] = {}
    for key, control in zip(groups, is_control, strict=True):
        if not control and key not in pools:
            orphans[key] = orphans.get(key, 0) + 1
    if not orphans:
        return
    shown = "; ".join(
        f"{source.label_key} {label!r}"
        + (f", {source.pair_key} {pair!r}" if source.pair_key else "")
        + f" ({n} perturbed cells)"
        for (label, pair), n in sorted(orphans.items())
    )
    fix = f", or build without pair_key={source.pair_key!r}" if source.pair_key else ""
    raise ValueError(
        f"{where}: no control cells ({source.condition_key} == {source.control_value!r}) for {shown}: their "
        f"perturbed cells cannot be paired. Add control cells of that type, drop those cells{fix}."
    )


def _pick(key: str, n: int) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % n


def paired_cells(source: AnnDataSource, reader: AnnDataReader) -> Iterator[PairedCellRecord]:
    """Yield the rows of a ``prp`` source in file order: perturbed cells paired with controls, control rows.

    Parameters
    ----------
    source : PerturbationSource
        The file and its design (checked by :func:`pairing_design`).
    reader : AnnDataReader
        The source's cells aligned to the gene vocabulary; read once, kept in memory as sparse rows.

    Yields
    ------
    PairedCellRecord
        Target = the perturbed cell (``metadata["perturbation"]`` its words) or, for control rows, the control
        cell itself (``CONTROL_PERTURBATION``); ``input_cell`` = the control the instruction reads.
    """
    design = pairing_design(source)
    records = list(reader)
    splits = [split_of(source.name, record.obs_name) for record in records]
    for index, record in enumerate(records):
        if design.is_control[index]:
            if source.control_rows:
                metadata = {**record.metadata, "perturbation": CONTROL_PERTURBATION}
                yield _paired(record, metadata, record)
            continue
        pool = design.pools[design.groups[index]]
        same_split = [c for c in pool if splits[c] == splits[index]] or pool
        control = records[same_split[_pick(f"{source.name}/{record.obs_name}/control", len(same_split))]]
        text = design.texts[design.conditions[index]]
        yield _paired(record, {**record.metadata, "perturbation": text}, control)


def _paired(record: CellRecord, metadata: dict[str, str], control: CellRecord) -> PairedCellRecord:
    return PairedCellRecord(
        obs_name=record.obs_name,
        label=record.label,
        metadata=metadata,
        gene_indices=record.gene_indices,
        gene_counts=record.gene_counts,
        input_cell=control,
    )


def perturbation_names(rows: datasets.Dataset) -> list[str]:
    """List the perturbations (in words) of the rows that pair cells, sorted; ``[]`` without any."""
    if "perturbation" not in rows.column_names:
        return []
    pairing = {name for name in rows.unique("task") if get_task(name).pairs_cells}
    names = rows.filter(lambda task: task in pairing, input_columns=["task"]).unique("perturbation")
    return sorted(name for name in names if name)
