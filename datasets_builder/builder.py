"""``datasets`` builder for multi-task InstructCell instruction data (used as a class; no loading script).

Example
-------
>>> builder = InstructCellDatasetBuilder(                                    # doctest: +SKIP
...     config_name="all-instruct", cache_dir="cache",
...     sources=[AnnDataSource("pbmc.h5ad", task="cta"), AnnDataSource("pbmc.h5ad", task="cpcg")],
...     gene_vocab="gene_vocab.txt")
>>> builder.download_and_prepare()                                           # doctest: +SKIP
>>> train = builder.as_dataset("train")                                      # doctest: +SKIP

Every cell of a source gives one example per task; its split is :func:`~datasets_builder.splits.split_of`, and
its template is drawn (seeded by the example key) from the template bank's templates of the same split. The
multi-cell and follow-up tasks write rows of several cells of one split (:mod:`datasets_builder.multicell`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from instructcell.tasks import TASKS, get_task, is_multicell

from .anndata_source import AnnDataReader, AnnDataSource, CellRecord
from .gene_vocab import GENE_VOCAB_FILENAME, check_gene_vocab, read_gene_vocab, write_gene_vocab
from .multicell import MULTICELL_FEATURES, multicell_examples, single_cell_columns
from .perturbation_pairs import PairedCellRecord, paired_cells, pairing_design
from .splits import SPLITS, split_of
from .templates import CELL_TOKEN, DEFAULT_BANK_DIR, SIGNAL_TOKEN, VARIANTS, Template, TemplateBank, render

FEATURES = datasets.Features(
    {
        "task": datasets.Value("string"),
        "variant": datasets.Value("string"),
        "dataset": datasets.Value("string"),
        "cell_id": datasets.Value("string"),
        "split": datasets.Value("string"),
        "template_id": datasets.Value("string"),
        "instruction": datasets.Value("string"),
        "response": datasets.Value("string"),
        "label": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "options_in_prompt": datasets.Value("bool"),
        "species": datasets.Value("string"),
        "tissue": datasets.Value("string"),
        "sequencing_method": datasets.Value("string"),
        "drug": datasets.Value("string"),
        "perturbation": datasets.Value("string"),
        "input_gene_indices": datasets.List(datasets.Value("int32")),
        "input_gene_counts": datasets.List(datasets.Value("float32")),
        "target_gene_indices": datasets.List(datasets.Value("int32")),
        "target_gene_counts": datasets.List(datasets.Value("float32")),
        **MULTICELL_FEATURES,
    }
)


@dataclass
class InstructCellBuilderConfig(datasets.BuilderConfig):
    """Configuration of :class:`InstructCellDatasetBuilder`.

    Parameters
    ----------
    tasks
        Task names to include (:mod:`instructcell.tasks`); sources of other tasks are skipped.
    variant
        ``"instruct"`` (response = the answer) or ``"chat"`` (conversational response).
    sources
        :class:`~datasets_builder.anndata_source.AnnDataSource` objects (file + task + metadata).
    gene_vocab
        Path to ``gene_vocab.txt`` or the ordered list of gene symbols.
    template_bank
        Template bank folder or ``.jsonl`` file; the committed bank when empty.
    chunk_size
        Rows read at once from each ``.h5ad``.
    progress
        Show per-file progress bars.
    data_fingerprint
        Set by the builder from the input files (size, mtime) so that changed inputs get a new cache entry.
    """

    tasks: tuple[str, ...] = tuple(TASKS)
    variant: str = "instruct"
    sources: Sequence[AnnDataSource] = ()
    gene_vocab: str | Sequence[str] = ""
    template_bank: str = ""
    chunk_size: int = 2048
    progress: bool = True
    data_fingerprint: str = ""


def _configs() -> list[InstructCellBuilderConfig]:
    configs = []
    for tasks, prefix in [*(((t,), t) for t in TASKS), (tuple(TASKS), "all")]:
        for variant in VARIANTS:
            configs.append(
                InstructCellBuilderConfig(
                    name=f"{prefix}-{variant}",
                    tasks=tasks,
                    variant=variant,
                    description=f"InstructCell {variant} data for {', '.join(tasks)}.",
                )
            )
    return configs


def _fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """Hash of (path, size, mtime) of the given files, or of every .jsonl file of the given folders."""
    entries = []
    for path in paths:
        path = Path(path)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            stat = file.stat() if file.exists() else None
            entries.append(
                [str(file.resolve()), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1]
            )
    return hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:16]


def example_key(task: str, variant: str, dataset: str, cell_id: str) -> str:
    """Return the unique key of one example: ``"<task>/<variant>/<dataset>/<cell_id>"``.

    It seeds the template choice (:meth:`~datasets_builder.templates.TemplateBank.choose`) and the order of
    the options in the prompt (:func:`option_order`).
    """
    return f"{task}/{variant}/{dataset}/{cell_id}"


def option_order(choices: Sequence[str], key: str) -> list[str]:
    """Return the label options in the order an example with key ``key`` lists them in its prompt.

    A permutation of ``choices`` seeded by ``sha1(key + "/choices")``: the same for every template, so a
    cell's options read the same whichever template renders it.

    Parameters
    ----------
    choices
        The dataset's label set, length ``n_labels``.
    key
        The example key (:func:`example_key`).

    Returns
    -------
    list of str
        The ``n_labels`` labels in prompt order.
    """
    rng = np.random.default_rng(int(hashlib.sha1(f"{key}/choices".encode()).hexdigest(), 16) % 2**63)
    return [choices[i] for i in rng.permutation(len(choices))]


def make_example(
    source: AnnDataSource,
    variant: str,
    cell: CellRecord,
    split: str,
    template: Template,
    choices: Sequence[str],
    key: str,
) -> dict:
    """One dataset row from a cell and its template.

    ``choices`` is the dataset's full label set; when the template offers options they appear in the prompt
    in an order shuffled deterministically from ``key``. The task decides where the cell goes: the *input*
    of a task that reads a cell, the *target* of one that generates a cell (``{output}`` then becomes
    ``<SIGNAL>`` and the label fills the task's ``label_placeholder``, e.g. ``{cell_type}``). A
    :class:`~datasets_builder.perturbation_pairs.PairedCellRecord` is the target and its ``input_cell`` (a
    control cell) the input.
    """
    task = get_task(source.task)
    metadata = {
        "species": "", "tissue": "", "sequencing_method": "", "drug": "", "perturbation": "", **cell.metadata
    }
    if task.label_placeholder is not None:
        metadata[task.label_placeholder] = cell.label
    empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
    counts = (cell.gene_indices, cell.gene_counts)
    read = cell.input_cell if isinstance(cell, PairedCellRecord) else cell
    output = SIGNAL_TOKEN if task.output_cell else cell.label
    inputs = (read.gene_indices, read.gene_counts) if task.input_cell else empty
    target = counts if task.output_cell else empty
    options = option_order(choices, key) if template.has_choices else []
    instruction, response = render(template, metadata, output, options)
    return {
        "task": source.task,
        "variant": variant,
        "dataset": source.name,
        "cell_id": cell.obs_name,
        "split": split,
        "template_id": template.id,
        "instruction": instruction,
        "response": response,
        "label": cell.label,
        "choices": list(choices),
        "options_in_prompt": bool(options),
        "species": metadata["species"],
        "tissue": metadata["tissue"],
        "sequencing_method": metadata["sequencing_method"],
        "drug": metadata["drug"],
        "perturbation": metadata["perturbation"],
        "input_gene_indices": inputs[0],
        "input_gene_counts": inputs[1],
        "target_gene_indices": target[0],
        "target_gene_counts": target[1],
        **single_cell_columns(),
    }


class InstructCellDatasetBuilder(datasets.GeneratorBasedBuilder):
    """Builds instruction/response examples for CTA, DSP and CPCG from AnnData files and a template bank.

    Configs: ``"cta-instruct"``, ``"cta-chat"``, ``"dsp-instruct"``, ``"dsp-chat"``, ``"cpcg-instruct"``,
    ``"cpcg-chat"``, ``"all-instruct"`` (default), ``"all-chat"``. Pass ``sources=[...]`` and
    ``gene_vocab=...`` (and optionally ``template_bank=...``) as keyword arguments. ``gene_vocab.txt`` is
    written next to the prepared Arrow files.
    """

    BUILDER_CONFIG_CLASS = InstructCellBuilderConfig
    BUILDER_CONFIGS = _configs()
    DEFAULT_CONFIG_NAME = "all-instruct"
    VERSION = datasets.Version("1.0.0")

    def __init__(self, *args, **kwargs) -> None:
        sources = kwargs.get("sources") or ()
        files = [s.path for s in sources] + [kwargs.get("template_bank") or DEFAULT_BANK_DIR]
        if isinstance(kwargs.get("gene_vocab"), (str, os.PathLike)) and kwargs["gene_vocab"]:
            files.append(kwargs["gene_vocab"])
        if "sources" in kwargs:
            kwargs["sources"] = tuple(sources)
            kwargs.setdefault("data_fingerprint", _fingerprint(files))
        super().__init__(*args, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="Multi-task single-cell instruction data (InstructCell, arXiv 2501.08187): cell type "
            "annotation, drug sensitivity prediction and conditional pseudo-cell generation. Cells are "
            f"sparse rows (indices into {GENE_VOCAB_FILENAME}, raw counts); '{CELL_TOKEN}' marks the input "
            f"cell and '{SIGNAL_TOKEN}' the generated cell.",
            features=FEATURES,
            homepage="https://arxiv.org/abs/2501.08187",
        )

    def _gene_vocab(self) -> list[str]:
        vocab = self.config.gene_vocab
        if not vocab:
            raise ValueError(
                "No gene vocabulary: pass gene_vocab='path/to/gene_vocab.txt' (or a list of symbols)."
            )
        return read_gene_vocab(vocab) if isinstance(vocab, (str, os.PathLike)) else check_gene_vocab(vocab)

    def _sources(self) -> list[AnnDataSource]:
        sources = [s for s in self.config.sources if s.task in self.config.tasks]
        if not sources:
            raise ValueError(
                f"No source for tasks {self.config.tasks} in config {self.config.name!r}: pass "
                "sources=[AnnDataSource(path, task=...), ...]."
            )
        keys = [(s.task, s.name) for s in sources]
        if len(set(keys)) != len(keys):
            raise ValueError(f"Two sources share a (task, name) in {keys}: give them distinct `name`s.")
        return sources

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        for source in self._sources():
            if get_task(source.task).pairs_cells:
                pairing_design(source)  # a bad design fails here, before any cell is read
        self._gene_vocab()
        TemplateBank.load(self.config.template_bank or DEFAULT_BANK_DIR)
        return [datasets.SplitGenerator(name=split, gen_kwargs={"split": split}) for split in SPLITS]

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        bank = TemplateBank.load(self.config.template_bank or DEFAULT_BANK_DIR)
        vocab = self._gene_vocab()
        variant = self.config.variant
        for source in self._sources():
            reader = AnnDataReader(source, vocab, self.config.chunk_size, self.config.progress)
            choices = reader.label_set()
            if is_multicell(get_task(source.task)):
                cells = [cell for cell in reader if split_of(source.name, cell.obs_name) == split]
                yield from multicell_examples(source, variant, cells, split, bank, choices)
                continue
            cells = paired_cells(source, reader) if get_task(source.task).pairs_cells else reader
            for cell in cells:
                if split_of(source.name, cell.obs_name) != split:
                    continue
                key = example_key(source.task, variant, source.name, cell.obs_name)
                template = bank.choose(source.task, variant, split, key)
                yield key, make_example(source, variant, cell, split, template, choices, key)

    def _download_and_prepare(self, dl_manager, verification_mode, **prepare_splits_kwargs) -> None:
        super()._download_and_prepare(dl_manager, verification_mode, **prepare_splits_kwargs)
        write_gene_vocab(self._gene_vocab(), os.path.join(self._output_dir, GENE_VOCAB_FILENAME))
