"""Second training stage: fit the cell VAE on frozen ``<SIGNAL>`` states.

During joint training the VAE's condition, the language model's last hidden state at ``<SIGNAL>``, changes
with every optimizer step, so the VAE chases a moving target and sees each generated-cell example only a few
times; the states themselves already separate the requested cell types (docs/experiments.md has the
measurements that led to this stage).

So, after the main stage, :func:`fit_cell_decoder` computes the ``<SIGNAL>`` state of every training row
with a target cell once (teacher-forced, eval mode: the states that :meth:`generate_cells` will see) and
trains the VAE alone with a Hugging Face ``Trainer``, which brings checkpoints, resume and logging. In several
processes it is one data-parallel fit, like the main stage: every process computes the states and takes an
equal share of every batch, and only the main process writes checkpoints.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import SAFE_WEIGHTS_NAME

from datasets_builder.anndata_source import densify
from datasets_builder.collator import DataCollatorForInstructCell
from modeling_instructcell import InstructCellForConditionalGeneration, InstructCellProcessor
from modeling_instructcell.modeling_cell_vae import InstructCellConditionalVAE

from .trainer import CheckpointLastStepCallback

logger = logging.getLogger(__name__)
CELL_DECODER_DIR = "cell-decoder"


class FrozenConditionCellVAE(nn.Module):
    """The model's VAE trained on precomputed condition states (the language model is not in the graph).

    Parameters
    ----------
    cell_vae : InstructCellConditionalVAE
        Trained in place: the wrapper holds the model's own module, not a copy.
    kl_weight : float
        Weight of the latent KL term (the model's ``config.vae_kl_weight``).
    encode_input_cell : bool
        Encode a row's input cell as the source of its target (the model's ``config.vae_encode_input_cell``).
    """

    def __init__(
        self, cell_vae: InstructCellConditionalVAE, kl_weight: float, encode_input_cell: bool = True
    ):
        super().__init__()
        self.cell_vae = cell_vae
        self.kl_weight = kl_weight
        self.encode_input_cell = encode_input_cell

    def forward(
        self,
        condition_states: torch.Tensor,
        target_cell_values: torch.Tensor,
        source_cell_values: torch.Tensor | None = None,
        has_source: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return the negative ELBO of ``target_cell_values`` ``(n, n_genes)``.

        ``condition_states`` is ``(n, d_model)``; ``source_cell_values`` ``(n, n_genes)`` and ``has_source``
        ``(n,)`` are the rows' input cells (perturbation response), decoded into their targets.
        """
        if not self.encode_input_cell:
            source_cell_values = has_source = None
        output = self.cell_vae(
            target_cell_values,
            condition_states,
            kl_weight=self.kl_weight,
            source_counts=source_cell_values,
            has_source=has_source,
        )
        return {"loss": output.loss}


@dataclass
class ConditionedCellCollator:
    """Stack precomputed condition states and densify the target cells of a batch of rows."""

    n_genes: int

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Return ``condition_states`` ``(n, d_model)`` and ``target_cell_values`` ``(n, n_genes)``.

        Rows with an input cell add ``source_cell_values`` ``(n, n_genes)`` and ``has_source`` ``(n,)``.
        """
        states = np.asarray([row["condition_states"] for row in rows], dtype=np.float32)
        cells = np.stack(
            [densify(row["target_gene_indices"], row["target_gene_counts"], self.n_genes) for row in rows]
        )
        batch = {
            "condition_states": torch.from_numpy(states),
            "target_cell_values": torch.from_numpy(cells.astype(np.float32)),
        }
        has_source = np.array([len(row.get("input_gene_indices") or []) > 0 for row in rows])
        if has_source.any():
            sources = np.stack(
                [densify(row["input_gene_indices"], row["input_gene_counts"], self.n_genes) for row in rows]
            )
            batch["source_cell_values"] = torch.from_numpy(sources)
            batch["has_source"] = torch.from_numpy(has_source)
        return batch


@torch.inference_mode()
def signal_states(
    model: InstructCellForConditionalGeneration,
    processor: InstructCellProcessor,
    rows: datasets.Dataset,
    batch_size: int = 64,
) -> torch.Tensor:
    """Teacher-forced ``<SIGNAL>`` states of rows whose response holds exactly one ``<SIGNAL>``.

    The model's forward raises a clear error when a row's response has no (or several) ``<SIGNAL>``.

    Returns
    -------
    torch.Tensor
        ``(len(rows), d_model)`` float32, in eval mode (no dropout), on the CPU.
    """
    collator = DataCollatorForInstructCell(processor)
    was_training = model.training
    model.eval()
    states = []
    for start in tqdm(range(0, len(rows), batch_size), desc="<SIGNAL> states", leave=False):
        batch = collator(list(rows.select(range(start, min(start + batch_size, len(rows))))))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        states.append(model(**batch).signal_hidden_states.float().cpu())
    model.train(was_training)
    return torch.cat(states)


def conditioned_cells(
    model: InstructCellForConditionalGeneration, processor: InstructCellProcessor, train: datasets.Dataset
) -> datasets.Dataset | None:
    """Return the training rows with a target cell plus a ``condition_states`` column (None if none)."""
    rows = train.filter(lambda row: len(row["target_gene_indices"]) > 0)
    if len(rows) == 0:
        return None
    states = signal_states(model, processor, rows)
    keep = ["target_gene_indices", "target_gene_counts", "input_gene_indices", "input_gene_counts"]
    rows = rows.remove_columns([c for c in rows.column_names if c not in keep])
    return rows.add_column("condition_states", states.numpy().tolist())


def check_batch_size(batch_size: int, processes: int) -> None:
    """Refuse a batch size that ``processes`` processes cannot share equally (ValueError)."""
    if batch_size < 1 or batch_size % processes:
        raise ValueError(
            f"cell_decoder_batch_size ({batch_size}) must be a positive multiple of the number of processes "
            f"({processes}): each process fits the cell decoder on an equal share of every batch."
        )


def fit_cell_decoder(
    model: InstructCellForConditionalGeneration,
    processor: InstructCellProcessor,
    train: datasets.Dataset,
    training_args: TrainingArguments,
    steps: int,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    output_dir: str | Path | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> Trainer | None:
    """Train ``model.cell_vae`` for ``steps`` steps on frozen ``<SIGNAL>`` states; resume if interrupted.

    Checkpoints go to ``output_dir``; a rerun resumes from the last one.

    Parameters
    ----------
    model
        The trained model (not a peft wrapper: pass ``get_base_model()``); its VAE is updated in place.
    train
        Training rows of the builder's schema; only those with a target cell (CPCG, PRP) are used.
    training_args
        The main stage's arguments: seed, logging, reporting and device settings are reused.
    steps, learning_rate, batch_size
        AdamW steps, learning rate and batch size of this stage; the batch is split equally among the
        processes of a multi-process run (``batch_size`` must be a multiple of their number).
    output_dir
        The stage's checkpoints (default ``<training_args.output_dir>/cell-decoder``).
    callbacks
        Extra Trainer callbacks (e.g. the interrupt handler).

    Returns
    -------
    Trainer or None
        None when ``train`` has no generation rows.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    processes = training_args.world_size
    check_batch_size(batch_size, processes)
    dataset = conditioned_cells(model, processor, train)
    if dataset is None:
        logger.warning("No generation rows with target cells: the cell decoder stage is skipped.")
        return None
    output_dir = Path(output_dir or Path(training_args.output_dir) / CELL_DECODER_DIR)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size // processes,
        learning_rate=learning_rate,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        save_strategy="steps",
        save_steps=max(1, steps // 4),
        save_total_limit=1,
        logging_steps=max(1, min(100, steps // 10)),
        seed=training_args.seed,
        report_to=training_args.report_to,
        disable_tqdm=training_args.disable_tqdm,
        use_cpu=training_args.use_cpu,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
    )
    wrapper = FrozenConditionCellVAE(
        model.cell_vae, model.config.vae_kl_weight, model.config.vae_encode_input_cell
    )
    trainer = Trainer(
        model=wrapper,
        args=args,
        train_dataset=dataset,
        data_collator=ConditionedCellCollator(model.config.n_genes),
        callbacks=[CheckpointLastStepCallback(), *callbacks],
    )
    checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if checkpoint:
        state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE_NAME))
        if state.global_step >= steps:  # finished earlier: load it instead of training
            logger.info("The cell decoder stage already finished: loading %s", checkpoint)
            wrapper.load_state_dict(load_file(str(Path(checkpoint) / SAFE_WEIGHTS_NAME)))
            trainer.state = state
            return trainer
        logger.info("Resuming the cell decoder stage from %s", checkpoint)
    logger.info("Fitting the cell VAE on %d frozen <SIGNAL> states for %d steps", len(dataset), steps)
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer
