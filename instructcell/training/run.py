"""A training run: the built dataset's splits, the processor and model, the Trainer, then the cell decoder.

``instructcell train`` and ``examples/train.py`` call :func:`run_training` with the arguments of
:func:`~instructcell.training.arguments.parse_training_arguments`. Rerunning the same command resumes from the
last checkpoint in ``output_dir``; Ctrl-C writes one first.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from datasets_builder.collator import DataCollatorForInstructCell
from datasets_builder.dataset_folder import cap_rows, load_split
from datasets_builder.perturbation_pairs import perturbation_names
from instructcell.tasks import parse_task_list
from modeling_instructcell import InstructCellProcessor

from .arguments import DataArguments, InstructCellTrainingArguments, ModelArguments
from .build import build_model, build_processor
from .cell_decoder import fit_cell_decoder
from .trainer import InstructCellTrainer, SaveOnInterruptCallback, WallClockLimitCallback

logger = logging.getLogger(__name__)
PROCESSOR_DIR = "processor"


def load_training_splits(data_args: DataArguments) -> datasets.DatasetDict:
    """The built dataset's train and validation rows of the requested tasks, variant and datasets, capped."""
    names = [name.strip() for name in data_args.datasets.split(",")] if data_args.datasets else None
    filters = {
        "tasks": parse_task_list(data_args.tasks),
        "variant": data_args.variant,
        "datasets_names": names,
    }
    splits = datasets.DatasetDict(
        {split: load_split(data_args.dataset_dir, split, **filters) for split in ("train", "validation")}
    )
    for split, cap in (("train", data_args.max_train_examples), ("validation", data_args.max_eval_examples)):
        splits[split] = cap_rows(splits[split], cap, seed=0)
    return splits


def training_cells(
    train: datasets.Dataset, processor: InstructCellProcessor, prefix: str, n_rows: int = 4096
) -> torch.Tensor | None:
    """Return dense counts ``(n, n_genes)`` of the ``prefix`` ("input" or "target") training cells.

    They come from the first ``n_rows`` shuffled training rows; None when there are none.
    """
    sample = train.shuffle(seed=0).select(range(min(n_rows, len(train))))
    rows = [row for row in sample if len(row[f"{prefix}_gene_indices"])]
    if not rows:
        return None
    collated = DataCollatorForInstructCell(processor)(rows)
    return collated["target_cell_values" if prefix == "target" else "cell_values"]


def training_budget(trainer: InstructCellTrainer) -> dict[str, int | bool]:
    """Steps done, steps planned and whether the wall-clock cap stopped training before the plan."""
    caps = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WallClockLimitCallback)]
    planned = trainer.state.max_steps
    done = trainer.state.global_step
    return {
        "steps": done,
        "planned_steps": planned,
        "stopped_by_time_cap": bool(caps and caps[0].stopped_training and done < planned),
    }


def resume_checkpoint(training_args: InstructCellTrainingArguments) -> str | None:
    """Return the checkpoint to resume from: the explicit one, else the last one in ``output_dir``."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    output = Path(training_args.output_dir)
    return get_last_checkpoint(str(output)) if output.is_dir() else None


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: InstructCellTrainingArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[InstructCellTrainer, InstructCellProcessor, bool]:
    """Train (or resume) and return the trainer, the processor and whether the run was interrupted.

    ``callbacks`` are added to the Trainer's (e.g. a wall-clock evaluation for learning curves). With
    ``training_args.cell_decoder_steps``, a second stage then fits the cell VAE on frozen ``<SIGNAL>`` states
    (:func:`instructcell.training.cell_decoder.fit_cell_decoder`).
    """
    splits = load_training_splits(data_args)
    processor_dir = Path(training_args.output_dir) / PROCESSOR_DIR
    if processor_dir.is_dir():  # a resumed run keeps its tokenizer
        processor = InstructCellProcessor.from_pretrained(processor_dir)
    else:
        processor = build_processor(model_args, data_args, splits["train"])
        if training_args.process_index == 0:
            processor.save_pretrained(processor_dir)
    model = build_model(model_args, processor)
    base_model = model.get_base_model() if model_args.use_lora else model
    base_model.config.perturbation_names = perturbation_names(splits["train"]) or None
    targets = training_cells(splits["train"], processor, "target")
    if targets is not None:
        base_model.cell_vae.set_library_prior(targets)
    if model_args.standardize_genes:
        inputs = training_cells(splits["train"], processor, "input")
        if inputs is None:
            raise ValueError("standardize_genes needs training rows with input cells (CTA or DSP).")
        base_model.cell_encoder.set_gene_statistics(inputs)
    interrupt = SaveOnInterruptCallback()
    callbacks = [interrupt, *callbacks]
    trainer = InstructCellTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=DataCollatorForInstructCell(
            processor,
            with_cell_captions=model_args.alignment_loss_weight > 0,
        ),
        processing_class=processor,
        callbacks=callbacks,
    )
    checkpoint = resume_checkpoint(training_args)
    if checkpoint:
        logger.info("Resuming from %s", checkpoint)
    torch.manual_seed(training_args.seed)
    trainer.train(resume_from_checkpoint=checkpoint)
    budget = training_budget(trainer)
    if budget["stopped_by_time_cap"]:
        logger.warning(
            "Stopped by the wall-clock cap (max_train_minutes=%s) at step %d of %d planned: this is not the "
            "recipe's model. Rerun the same command to train the remaining steps from the checkpoint.",
            training_args.max_train_minutes,
            budget["steps"],
            budget["planned_steps"],
        )
    elif not interrupt.interrupted:
        logger.info("Trained %d of %d planned steps.", budget["steps"], budget["planned_steps"])
    if (
        training_args.cell_decoder_steps > 0
        and not interrupt.interrupted
        and not budget["stopped_by_time_cap"]
    ):
        fit_cell_decoder(
            base_model,
            processor,
            splits["train"],
            training_args,
            steps=training_args.cell_decoder_steps,
            learning_rate=training_args.cell_decoder_learning_rate,
            batch_size=training_args.cell_decoder_batch_size,
            callbacks=[interrupt],
        )
    return trainer, processor, interrupt.interrupted
