"""Annotate every cell of an AnnData, an .h5ad file or a .zarr store: labels and probabilities in ``obs``.

A file is never loaded whole. Its counts are checked once (any NaN, negative or non-integer value is refused
before the first model call), then read ``chunk_size`` rows at a time by a background thread that stays at
most two chunks ahead of the model; genes are aligned once. Each finished chunk's labels are saved at once
(:class:`~instructcell.inference.partial.PartialResults`), so memory does not grow with the file and a
stopped run resumes where it stopped. Chunks can be shared among worker processes (``num_workers``, or
processes started by ``accelerate launch``). When every chunk is done, rank 0 writes the output: a copy of
the input whose ``obs`` gains the new columns, moved into place in one step (it may replace the input).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from instructcell.outputs import check_destination, is_zarr_path
from instructcell.tasks import CELL_TYPE_ANNOTATION, DRUG_SENSITIVITY_PREDICTION
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.feature_extraction_instructcell import GeneAlignment
from modeling_instructcell.pipeline_instructcell import DEFAULT_BATCH_SIZE, resolve_label_set
from modeling_instructcell.processing_instructcell import (
    CELL_PLACEHOLDER,
    METADATA_PLACEHOLDERS,
    metadata_from_obs,
    template_fields,
)

from .arguments import check_whole_number
from .files import CellFile, InMemoryCells, check_counts, write_anndata, write_obs_columns
from .heap import release_freed_memory
from .loading import ModelSource, load_pipeline, model_fingerprint
from .partial import PartialResults
from .prefetch import prefetched
from .workers import (
    WorkerProcesses,
    launched_rank,
    orphaned,
    rank_device,
    threads_per_worker,
    torch_threads,
)

__all__ = ["annotate", "argmax_agreement", "predict_drug"]

#: Chunks read ahead of the model by the background reader.
PREFETCH_CHUNKS = 2
_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class _Request:
    """What the answers depend on, as the user gave it (the same in every worker process)."""

    template: str
    labels: tuple[str, ...] | None
    metadata: dict[str, Any] | None
    method: str | None
    layer: str | None
    chunk_size: int
    batch_size: int
    call_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Plan:
    """The request resolved against a model and an input: label set, method, gene alignment, metadata."""

    label_set: list[str] | None
    method: str
    alignment: GeneAlignment
    obs: pd.DataFrame  # the obs columns the instruction names, one row per cell


@dataclass
class _Chunk:
    index: int
    start: int
    stop: int
    cells: sp.csr_matrix | np.ndarray  # the rows with counts in the model's genes
    kept: np.ndarray  # their positions in the chunk
    metadata: list[dict[str, Any]]  # one dict per kept row


@dataclass(frozen=True)
class _FileJob:
    """Everything a worker process needs to annotate its share of a file's chunks."""

    model: ModelSource
    fingerprint: str
    input: Path
    output: Path
    request: _Request
    settings: dict[str, Any]


def _plan(pipe: InstructCellPipeline, cells: CellFile | InMemoryCells, request: _Request) -> _Plan:
    """Resolve the request; raise every input error that does not need the model to run."""
    if cells.n_obs == 0:
        raise ValueError("The input has 0 cells; nothing to annotate.")
    extractor = pipe.processor.feature_extractor
    parsed = extractor._parse_input(cells.gene_table(), None, None, None)
    if parsed.gene_names is None and parsed.gene_ids is None:
        raise ValueError("The input has no gene names (var_names); they are needed to align genes.")
    alignment = extractor.align_genes(parsed.gene_names, parsed.gene_ids)  # raises on low overlap
    fields = [name for name in template_fields(request.template) if name != CELL_PLACEHOLDER]
    obs = cells.obs_columns([name for name in METADATA_PLACEHOLDERS if name in fields])
    metadata = dict(request.metadata or {})
    first = {**metadata_from_obs(obs.iloc[:1], 1)[0], **metadata}
    labels = None if request.labels is None else list(request.labels)
    label_set = resolve_label_set(request.template, labels, [first], pipe.model.config)
    method = request.method or ("score" if label_set is not None else "generate")
    if method not in ("score", "generate"):
        raise ValueError(f"method must be 'score' or 'generate', got {method!r}.")
    if method == "score" and label_set is None:
        raise ValueError(
            "method='score' needs a label set: pass labels=[...], a template with {choices}, or a model "
            "whose config has label_names; or use method='generate' for free-text answers."
        )
    for name in fields:
        if not name:  # "{}": the processor's error says how to name it
            continue
        if name in metadata or (name == "choices" and label_set is not None):
            continue
        missing = np.flatnonzero(obs[name].isna().to_numpy()) if name in obs else np.arange(cells.n_obs)
        if missing.size:
            where = (
                "obs has no such column"
                if name not in obs
                else f"{missing.size} cells lack it, e.g. {missing[:5].tolist()}"
            )
            raise ValueError(
                f"The instruction needs {{{name}}} for every cell, but {where}; pass "
                f"metadata={{'{name}': ...}} or fill obs['{name}']."
            )
    return _Plan(label_set, method, alignment, obs)


def _chunk_bounds(index: int, request: _Request, n_obs: int) -> tuple[int, int]:
    start = index * request.chunk_size
    return start, min(start + request.chunk_size, n_obs)


def _read_chunks(
    cells: CellFile | InMemoryCells, request: _Request, plan: _Plan, indices: Sequence[int]
) -> Iterator[_Chunk]:
    """Read the chunks ``indices``, setting aside their rows without counts in the model's genes."""
    for index in indices:
        start, stop = _chunk_bounds(index, request, cells.n_obs)
        block = cells.rows(start, stop)
        totals = np.asarray(block[:, plan.alignment.input_index].sum(axis=1)).ravel()
        kept = np.flatnonzero(totals > 0)
        rows = metadata_from_obs(plan.obs.iloc[start:stop], stop - start)
        metadata = [{**rows[i], **(request.metadata or {})} for i in kept]
        yield _Chunk(index, start, stop, block[kept], kept, metadata)


def _annotate_chunk(
    pipe: InstructCellPipeline, request: _Request, plan: _Plan, chunk: _Chunk
) -> dict[str, Any]:
    """One chunk's result: per row a label index (or free-text answer) and a probability, JSON-ready."""
    n = chunk.stop - chunk.start
    labels: list[Any] = [-1 if plan.label_set is not None else None] * n
    probabilities: list[float | None] = [None] * n
    if chunk.kept.size:
        results = pipe(
            request.template,
            cells=chunk.cells,
            alignment=plan.alignment,
            metadata=chunk.metadata,
            labels=plan.label_set,
            generate=plan.method == "generate",
            batch_size=request.batch_size,
            **request.call_kwargs,
        )
        for row, result in zip(chunk.kept.tolist(), results, strict=True):
            if plan.label_set is None:
                labels[row] = result["answer"]
            elif result["label"] is not None:
                labels[row] = plan.label_set.index(result["label"])
                probabilities[row] = result["probability"]
    return {"labels": labels, "probabilities": probabilities, "empty": n - int(chunk.kept.size)}


def _columns(
    results: Iterable[dict[str, Any]], n_obs: int, plan: _Plan, label_key: str, probability_key: str
) -> dict[str, Any]:
    """Build the obs columns from the chunks' results, read one at a time in order; warn about empty cells.

    With a label set only two arrays of ``n_obs`` numbers are held (label codes and probabilities), whatever
    the number of chunks.
    """
    codes = np.full(n_obs, -1, dtype=np.int32)
    probabilities = np.full(n_obs, np.nan, dtype=np.float32)
    answers: list[str | None] = []
    start = n_empty = 0
    for result in results:
        stop = start + len(result["labels"])
        if plan.label_set is None:
            answers.extend(result["labels"])
        else:
            codes[start:stop] = result["labels"]
            probabilities[start:stop] = [np.nan if p is None else p for p in result["probabilities"]]
        n_empty += result["empty"]
        start = stop
    if n_empty:
        warnings.warn(
            f"{n_empty} cells have no counts in the model's genes; they were left unannotated (NaN).",
            stacklevel=4,
        )
    if plan.label_set is None:  # free text: categorical, which every AnnData version reads and writes
        return {label_key: pd.Categorical(answers)}
    return {
        label_key: pd.Categorical.from_codes(codes, categories=plan.label_set),
        probability_key: probabilities,
    }


def _annotate_in_memory(
    pipe: InstructCellPipeline, adata: anndata.AnnData, request: _Request, progress: bool
) -> tuple[_Plan, list[dict[str, Any]]]:
    cells = InMemoryCells(adata, request.layer)
    plan = _plan(pipe, cells, request)
    check_counts(cells)
    n_chunks = -(-cells.n_obs // request.chunk_size)
    results = []
    with tqdm(total=cells.n_obs, unit="cell", disable=not progress, desc="instructcell annotate") as bar:
        for chunk in prefetched(_read_chunks(cells, request, plan, range(n_chunks)), PREFETCH_CHUNKS):
            results.append(_annotate_chunk(pipe, request, plan, chunk))
            bar.update(chunk.stop - chunk.start)
            release_freed_memory()
    return plan, results


def _run_chunks(
    pipe: InstructCellPipeline,
    cells: CellFile,
    request: _Request,
    plan: _Plan,
    partial: PartialResults,
    indices: Sequence[int],
    on_chunk=None,
) -> None:
    """Annotate and save the chunks ``indices`` (a worker stops early when its starting process died)."""
    for chunk in prefetched(_read_chunks(cells, request, plan, indices), PREFETCH_CHUNKS):
        partial.save(chunk.index, _annotate_chunk(pipe, request, plan, chunk))
        release_freed_memory()  # otherwise resident memory creeps up with the number of chunks
        if on_chunk is not None:
            on_chunk()
        if orphaned():
            return


def _cells_done(partial: PartialResults, request: _Request, n_obs: int) -> int:
    return sum(stop - start for start, stop in (_chunk_bounds(i, request, n_obs) for i in partial.done()))


def _own_chunks(n_chunks: int, done: set[int], rank: int, world: int) -> list[int]:
    return [index for index in range(rank, n_chunks, world) if index not in done]


def _file_worker(job: _FileJob, rank: int, world: int) -> None:
    """Rank ``rank`` of a ``num_workers`` run, in a spawned process."""
    pipe = replace(job.model, device=rank_device(job.model.device, rank)).load()
    if model_fingerprint(pipe) != job.fingerprint:
        raise ValueError(
            f"Workers load the model from {job.model.path}, which differs from the pipeline that was passed; "
            "pass the model folder instead of a modified pipeline, or use num_workers=1."
        )
    with CellFile(job.input, job.request.layer) as cells:
        plan = _plan(pipe, cells, job.request)
        partial = PartialResults(job.output, job.settings)
        n_chunks = -(-cells.n_obs // job.request.chunk_size)
        _run_chunks(
            pipe, cells, job.request, plan, partial, _own_chunks(n_chunks, partial.done(), rank, world)
        )


def _model_folder_of(pipe: InstructCellPipeline) -> ModelSource:
    """Where worker processes load a passed pipeline's model from (they check it is the same model)."""
    folder = str(getattr(pipe.model, "name_or_path", "") or "")
    if not folder or not (Path(folder) / "config.json").is_file():
        raise ValueError(
            "num_workers > 1 loads the model in every worker: pass the model folder (or a ModelSource) "
            "instead of a pipeline built in memory."
        )
    return ModelSource(folder)


def _annotate_file(
    source: InstructCellPipeline | ModelSource,
    path: Path,
    output: Path,
    request: _Request,
    keys: tuple[str, str],
    progress: bool,
    num_workers: int,
    num_threads: int | None,
) -> Path | None:
    """Annotate a file into ``output`` (see the module docstring); ``None`` on launched ranks other than 0."""
    rank, world = launched_rank()
    if num_workers > 1 and world > 1:
        raise ValueError("Use either num_workers / --num-workers or accelerate launch, not both.")
    with CellFile(path, request.layer) as cells:
        if isinstance(source, ModelSource):
            source = replace(source, device=rank_device(source.device, rank))
        pipe = load_pipeline(source)
        plan = _plan(pipe, cells, request)
        check_counts(cells)
        fingerprint = model_fingerprint(pipe)
        settings = {
            "input": str(path.resolve()),
            "input_file": cells.fingerprint(),
            "n_obs": cells.n_obs,
            "model": fingerprint,
            "template": request.template,
            "labels": plan.label_set,
            "method": plan.method,
            "metadata": request.metadata,
            "layer": request.layer,
            "chunk_size": request.chunk_size,
            "call_kwargs": request.call_kwargs,
        }
        try:
            partial = PartialResults(output, settings)
        except TypeError as err:  # json could not write a call argument
            raise ValueError(f"Annotating a file needs JSON-serializable call arguments ({err}).") from err
        n_chunks = -(-cells.n_obs // request.chunk_size)
        world = max(world, num_workers)
        own = _own_chunks(n_chunks, partial.done(), rank, world)
        workers = None
        if num_threads is None and num_workers > 1:
            num_threads = threads_per_worker(num_workers)
        if num_workers > 1:
            model = source if isinstance(source, ModelSource) else _model_folder_of(source)
            job = _FileJob(model, fingerprint, path, output, request, settings)
            workers = WorkerProcesses(_file_worker, job, num_workers, num_threads)
        try:
            with (
                torch_threads(num_threads),
                tqdm(
                    total=cells.n_obs,
                    initial=_cells_done(partial, request, cells.n_obs),
                    unit="cell",
                    disable=not (progress and rank == 0),
                    desc="instructcell annotate",
                ) as bar,
            ):

                def refresh() -> None:  # every rank's progress, read from the saved chunks
                    bar.update(_cells_done(partial, request, cells.n_obs) - bar.n)
                    if workers is not None:
                        workers.check()

                _run_chunks(pipe, cells, request, plan, partial, own, on_chunk=refresh)
                if rank != 0:
                    return None
                while len(partial.done()) < n_chunks:
                    refresh()
                    if workers is not None and not workers.running():
                        workers.check()
                        if len(partial.done()) < n_chunks:
                            raise RuntimeError(
                                "The workers stopped before every chunk was done; rerun to resume."
                            )
                    time.sleep(_POLL_SECONDS)
                refresh()
        finally:
            if workers is not None:
                workers.stop()
        columns = _columns((partial.load(i) for i in range(n_chunks)), cells.n_obs, plan, *keys)
        write_obs_columns(cells, output, columns)
    partial.remove()
    return output


def annotate(
    pipe: InstructCellPipeline | ModelSource | str | os.PathLike,
    data: anndata.AnnData | str | os.PathLike,
    labels: Sequence[str] | None = None,
    template: str | None = None,
    output: str | os.PathLike | None = None,
    label_key: str = "instructcell_label",
    probability_key: str = "instructcell_probability",
    method: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    layer: str | None = None,
    chunk_size: int = 1024,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    overwrite: bool = False,
    num_workers: int = 1,
    num_threads: int | None = None,
    **call_kwargs,
) -> anndata.AnnData | Path | None:
    """Annotate every cell; write the label and its probability into ``obs``.

    Parameters
    ----------
    pipe : InstructCellPipeline, ModelSource, or a model folder / Hub id
        A folder or :class:`ModelSource` is loaded only after the input and the output were checked.
    data : AnnData, or path to an .h5ad file or a .zarr store
        An AnnData is updated in place. A file is read ``chunk_size`` rows at a time and never loaded or
        modified (unless ``output`` is the file itself): see the module docstring.
    labels : list of str, optional
        The label set. Default: ``{choices}`` metadata or ``model.config.label_names``. It also fills a
        ``{choices}`` placeholder.
    template : str, optional
        Instruction with ``{input}``; other placeholders are filled from ``obs`` columns / ``metadata``.
        Default: the cell type annotation task's instruction.
    output : path, optional
        Destination for file input (required; same format as the input; may be the input itself): written
        when every chunk is done, in one step. For AnnData input, where to write it as well (optional).
        The results of finished chunks are kept in ``<output>.instructcell-partial/`` until then: rerunning
        the same call after an interruption resumes.
    label_key, probability_key : str
        ``obs`` columns to write. Cells the model does not name a label for (``method="generate"``) or with
        no counts in the model's genes get NaN (the latter with a warning).
    method : {"score", "generate"}, optional
        ``"score"`` (default with a label set): label = arg-max of the label distribution (one encoder and
        one decoder pass per batch, no generation). ``"generate"``: greedy answer parsed with
        ``extract_label``, probability = that label's probability; without a label set the answers are
        written (a categorical column) and no probability.
    metadata : dict, optional
        Placeholder values for all cells (override ``obs``).
    layer : str, optional
        Layer with raw counts (default X).
    chunk_size, batch_size : int
        Rows read per chunk (the unit of saving and resuming); prompts per model call.
    progress : bool
        Show a progress bar (cells/s and the time left).
    overwrite : bool
        Replace an existing ``output`` other than the input.
    num_workers : int
        Processes sharing the chunks of a file (each loads the model and gets ``cores // num_workers``
        threads). Processes started by ``accelerate launch`` share them the same way without it.
    num_threads : int, optional
        Torch threads of each process (default: torch's own choice for one process, ``cores //
        num_workers`` for several). On a machine shared with other jobs one thread per process is often
        much faster: threads that wait for each other lose their turn on busy cores.
    **call_kwargs
        Passed to the pipeline (``answer_template``, ``max_new_tokens``, ``max_rows_per_pass``...).

    Returns
    -------
    AnnData (AnnData input), Path (file input), or None (file input, launched processes other than rank 0)

    Raises
    ------
    ValueError
        Bad input, detected before the first model call: an unreadable file, an output that may not be
        written, counts that are not raw (NaN, negative, non-integer), too few of the model's genes, a
        placeholder without a value, a bad label set or number.
    """
    chunk_size = check_whole_number("chunk_size", chunk_size)
    batch_size = check_whole_number("batch_size", batch_size)
    num_workers = check_whole_number("num_workers", num_workers)
    if num_threads is not None:
        num_threads = check_whole_number("num_threads", num_threads)
    if label_key == probability_key:
        raise ValueError(f"label_key and probability_key must differ, both are {label_key!r}.")
    if labels is not None and isinstance(labels, str):
        raise ValueError("labels must be a list of label strings, not one string.")
    request = _Request(
        template=template or CELL_TYPE_ANNOTATION.default_instruction,
        labels=None if labels is None else tuple(str(label) for label in labels),
        metadata=None if metadata is None else dict(metadata),
        method=method,
        layer=layer,
        chunk_size=chunk_size,
        batch_size=batch_size,
        call_kwargs=dict(call_kwargs),
    )
    keys = (label_key, probability_key)
    if isinstance(data, anndata.AnnData):
        if output is not None:
            output = check_destination(output, overwrite, in_place_of=getattr(data, "filename", None))
        with torch_threads(num_threads):
            plan, results = _annotate_in_memory(load_pipeline(pipe), data, request, progress)
        for name, values in _columns(results, data.n_obs, plan, *keys).items():
            data.obs[name] = values
        if output is not None:
            write_anndata(data, output)
        return data
    path = Path(data).expanduser()
    if output is None:
        raise ValueError("Annotating a file needs output=<path> (it may be the input path itself).")
    if is_zarr_path(output) != is_zarr_path(path):
        suffix = ".zarr" if is_zarr_path(path) else ".h5ad"
        raise ValueError(
            f"The output {output} must have the input's format ({suffix}): convert the input with anndata "
            "first to change formats."
        )
    CellFile(path, layer).close()  # a clear error for a missing or unreadable input, before anything else
    output = check_destination(output, overwrite, in_place_of=path)
    if not isinstance(pipe, InstructCellPipeline) and not isinstance(pipe, ModelSource):
        pipe = ModelSource(str(pipe))
    return _annotate_file(pipe, path, output, request, keys, progress, num_workers, num_threads)


def predict_drug(
    pipe: InstructCellPipeline | ModelSource | str | os.PathLike,
    data: anndata.AnnData | str | os.PathLike,
    drug: str | None = None,
    labels: Sequence[str] | None = None,
    template: str | None = None,
    label_key: str = "instructcell_drug_response",
    probability_key: str = "instructcell_drug_response_probability",
    **kwargs,
) -> anndata.AnnData | Path | None:
    """Predict drug response for every cell (:func:`annotate` with the DSP instruction and labels).

    ``drug`` fills ``{drug}`` for all cells; without it an ``obs["drug"]`` column is used. ``labels`` and
    ``template`` default to the drug sensitivity task's (sensitive / resistant).
    """
    metadata = dict(kwargs.pop("metadata", None) or {})
    if drug is not None:
        metadata["drug"] = drug
    return annotate(
        pipe,
        data,
        labels=labels or list(DRUG_SENSITIVITY_PREDICTION.default_labels),
        template=template or DRUG_SENSITIVITY_PREDICTION.default_instruction,
        label_key=label_key,
        probability_key=probability_key,
        metadata=metadata or None,
        **kwargs,
    )


def argmax_agreement(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """How often the label distribution's arg-max equals the label parsed from the greedy answer.

    Parameters
    ----------
    results : list of dict
        Pipeline outputs made with ``generate=True`` and a label set.

    Returns
    -------
    dict
        ``agreement`` (over all cells; an unparseable greedy answer counts as disagreement),
        ``agreement_answered`` (over cells whose greedy answer names a label), ``answered`` (fraction of such
        cells) and ``n``.
    """
    scored = [r for r in results if r.get("argmax_label") is not None and r.get("answer") is not None]
    if not scored:
        raise ValueError(
            "No results with both a greedy answer and a label distribution (generate=True, labels=...)."
        )
    answered = [r for r in scored if r["label"] is not None]
    agree = sum(r["label"] == r["argmax_label"] for r in answered)
    return {
        "agreement": agree / len(scored),
        "agreement_answered": agree / len(answered) if answered else float("nan"),
        "answered": len(answered) / len(scored),
        "n": float(len(scored)),
    }
