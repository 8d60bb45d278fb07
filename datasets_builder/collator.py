"""Batch the builder's rows for the model: densify sparse cells per batch, tokenize, pad."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import BatchFeature

from modeling_instructcell import InstructCellProcessor

from .anndata_source import densify
from .multicell import check_cells_kept, prompt_cell_labels, prompt_cells


def _stack_targets(rows: Sequence[dict[str, Any]], n_genes: int) -> np.ndarray | None:
    """Dense ``(n_cells, n_genes)`` counts of the rows that carry a target cell."""
    cells = [
        densify(row["target_gene_indices"], row["target_gene_counts"], n_genes)
        for row in rows
        if len(row["target_gene_indices"]) > 0
    ]
    return np.stack(cells) if cells else None


@dataclass
class DataCollatorForInstructCell:
    """Turn rows of the InstructCell dataset into model inputs.

    Each row's ``instruction`` (with a ``<CELL>`` slot per cell it shows: its input cell, or the several cells
    of a multi-cell row) and ``response`` (``<SIGNAL>`` for generation) go through the processor; the sparse
    cells are densified for this batch only. Train with ``remove_unused_columns=False``: the collator needs
    the
    text and sparse columns, which are not ``forward`` arguments.

    Parameters
    ----------
    processor : InstructCellProcessor
        Its feature extractor's vocabulary must be the dataset's ``gene_vocab.txt``.
    max_length : int, optional
        Truncate prompts to this many tokens; a batch whose truncation would cut a cell slot is refused.
    with_cell_captions : bool
        Also return ``cell_caption_ids`` and ``target_caption_ids`` (each input and target cell's label text)
        for the alignment loss.
    """

    processor: InstructCellProcessor
    max_length: int | None = None
    with_cell_captions: bool = False

    def __call__(self, rows: Sequence[dict[str, Any]]) -> BatchFeature:
        """Collate rows into model inputs.

        Returns ``input_ids``, ``attention_mask``, ``labels`` (pad = -100), ``cell_values``
        ``(n_input_cells, n_genes)`` and ``target_cell_values`` ``(n_target_cells, n_genes)``.
        """
        n_genes = self.processor.feature_extractor.vocab_size
        cells = prompt_cells(rows, n_genes)
        cell_captions = target_captions = None
        if self.with_cell_captions:
            cell_captions = prompt_cell_labels(rows)
            target_captions = [row["label"] for row in rows if len(row["target_gene_indices"]) > 0] or None
        batch = self.processor(
            text=[row["instruction"] for row in rows],
            cells=cells,
            text_target=[row["response"] for row in rows],
            target_cells=_stack_targets(rows, n_genes),
            cell_captions=cell_captions,
            target_captions=target_captions,
            truncation=self.max_length is not None,
            max_length=self.max_length,
        )
        if self.max_length is not None:
            check_cells_kept(
                batch["input_ids"],
                0 if cells is None else len(cells),
                self.processor.special_token_ids["cell_token_index"],
                self.processor.num_query_tokens,
            )
        return batch
