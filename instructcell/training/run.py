"""A training run: the built dataset's splits, the processor and model, the Trainer, then the cell decoder.

``instructcell train`` and ``examples/train.py`` call :func:`run_training` with the arguments of
:func:`~instructcell.training.arguments.parse_training_arguments`. Rerunning the same command resumes where
the last one stopped; Ctrl-C writes a checkpoint first. What a rerun resumes from, in ``output_dir``:

- ``processor/``: the tokenizer and the gene vocabulary the run started with (a rerun refuses a dataset
  whose ``gene_vocab.txt`` has changed since);
- ``checkpoint-<step>/``: the main stage (its last step is always checkpointed);
- ``cell-decoder/after-step-<step>/checkpoint-<step>/``: the cell-decoder stage that follows that main-stage
  step (training the main stage further starts a new cell-decoder stage).

The same command gives the same model: everything random is seeded with ``seed`` before the model is built,
and the offline tokenizer is deterministic. Launched in several processes (:mod:`.processes`), every process
trains on its own share of each batch and only the main process writes files.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from datasets_builder.collator import DataCollatorForInstructCell
from datasets_builder.dataset_folder import cap_rows, dataset_genes, load_split
from datasets_builder.perturbation_pairs import perturbation_names
from instructcell.tasks import parse_task_list
from modeling_instructcell import InstructCellProcessor

from .arguments import DataArguments, InstructCellTrainingArguments, ModelArguments
from .build import build_model, build_processor
from .cell_decoder import CELL_DECODER_DIR, check_batch_size, fit_cell_decoder
from .processes import check_launch
from .trainer import (
    CheckpointLastStepCallback,
    InstructCellTrainer,
    SaveOnInterruptCallback,
    WallClockLimitCallback,
    clock_is_budget,
)

logger = logging.getLogger(__name__)
PROCESSOR_DIR = "processor"


def load_training_splits(data_args: DataArguments) -> datasets.DatasetDict:
    """Return the train and validation rows of the requested tasks, variant and datasets, capped."""
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


def training_processor(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: InstructCellTrainingArguments,
    train: datasets.Dataset,
) -> InstructCellProcessor:
    """Return the run's processor: the one in ``output_dir/processor`` or a new one saved there.

    The main process builds and saves it; the other processes then read it, so all use the same ids.

    Raises
    ------
    ValueError
        The saved processor's gene vocabulary is not the dataset's ``gene_vocab.txt`` any more: the
        checkpoints in ``output_dir`` were trained on other genes.
    """
    processor_dir = Path(training_args.output_dir) / PROCESSOR_DIR
    with training_args.main_process_first(desc="the processor", local=False):
        if not processor_dir.is_dir():
            processor = build_processor(model_args, data_args, train)
            if training_args.should_save:
                processor.save_pretrained(processor_dir)
            return processor
        processor = InstructCellProcessor.from_pretrained(processor_dir)
    saved = list(processor.feature_extractor.gene_names)
    genes = dataset_genes(data_args.dataset_dir)
    if saved != genes:
        differing = (i for i, (a, b) in enumerate(zip(saved, genes, strict=False)) if a != b)
        first = next(differing, min(len(saved), len(genes)))
        raise ValueError(
            f"{data_args.dataset_dir}/gene_vocab.txt ({len(genes)} genes) is not the vocabulary the run in "
            f"{training_args.output_dir} started with ({len(saved)} genes; they differ from position {first} "
            "on), so its checkpoints read other genes than the dataset holds now. Train into a new "
            "--output_dir, or rebuild the dataset with the vocabulary of that run."
        )
    return processor


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
    """Return the steps done, the steps planned and whether the wall-clock cap cut the plan short.

    ``stopped_by_time_cap`` is only True when the minutes were a safety cap over a plan in steps; when the
    clock is the budget (no ``max_steps``, or ``anneal_to_time_limit``), stopping on it is the plan.
    """
    caps = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WallClockLimitCallback)]
    planned = trainer.state.max_steps
    done = trainer.state.global_step
    cut_short = bool(caps and caps[0].stopped_training and done < planned)
    return {
        "steps": done,
        "planned_steps": planned,
        "stopped_by_time_cap": cut_short and not clock_is_budget(trainer.args),
    }


def budget_report(budget: dict[str, int | bool], training_args: InstructCellTrainingArguments) -> str:
    """One line on the steps done against the steps planned, saying plainly when the time cap cut it short."""
    if budget["stopped_by_time_cap"]:
        return (
            f"Stopped by the wall-clock cap (max_train_minutes={training_args.max_train_minutes:g}) at step "
            f"{budget['steps']} of {budget['planned_steps']} planned: this is not the recipe's model. Rerun "
            "the same command to train the remaining steps from the checkpoint."
        )
    if clock_is_budget(training_args):
        return (
            f"Trained {budget['steps']} steps in the wall-clock budget of "
            f"{training_args.max_train_minutes:g} minutes."
        )
    return f"Trained {budget['steps']} of {budget['planned_steps']} planned steps."


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
    (:func:`instructcell.training.cell_decoder.fit_cell_decoder`). The main process logs the steps done
    against the steps planned (:func:`budget_report`).
    """
    check_launch(training_args)
    if training_args.cell_decoder_steps > 0:  # before any training
        check_batch_size(training_args.cell_decoder_batch_size, training_args.world_size)
    with training_args.main_process_first(desc="the training splits", local=False):
        splits = load_training_splits(data_args)  # the main process writes the datasets cache first
    processor = training_processor(model_args, data_args, training_args, splits["train"])
    set_seed(training_args.seed)
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
        callbacks=[interrupt, CheckpointLastStepCallback(), *callbacks],
    )
    checkpoint = resume_checkpoint(training_args)
    if checkpoint:
        logger.info("Resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    budget = training_budget(trainer)
    if trainer.is_world_process_zero() and not interrupt.interrupted:
        report = budget_report(budget, training_args)
        (logger.warning if budget["stopped_by_time_cap"] else logger.info)(report)
    if (
        training_args.cell_decoder_steps > 0
        and not interrupt.interrupted
        and not budget["stopped_by_time_cap"]
    ):
        stage_dir = Path(training_args.output_dir) / CELL_DECODER_DIR / f"after-step-{budget['steps']}"
        fit_cell_decoder(
            base_model,
            processor,
            splits["train"],
            training_args,
            steps=training_args.cell_decoder_steps,
            learning_rate=training_args.cell_decoder_learning_rate,
            batch_size=training_args.cell_decoder_batch_size,
            output_dir=stage_dir,
            callbacks=[interrupt],
        )
    return trainer, processor, interrupt.interrupted
