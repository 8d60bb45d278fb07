"""Fine-tuning InstructCell with the Hugging Face Trainer (single CPU, DDP or DeepSpeed through Accelerate).

The pieces ``examples/train.py`` is made of: argument dataclasses (with ``help`` metadata, as in peft),
dataset loading, processor/model construction, a Trainer that logs both loss parts, and callbacks for
a wall-clock budget and for saving a checkpoint when the job is interrupted.
"""

import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    SchedulerType,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)
from transformers.trainer_callback import ExportableState, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from datasets_builder import read_gene_vocab
from datasets_builder.collator import DataCollatorForInstructCell
from instructcell.cell_decoder_fitting import fit_cell_decoder
from instructcell.presets import config_for_processor, load_preset
from instructcell.tokenization import train_instruction_tokenizer
from modeling_instructcell import (
    InstructCellFeatureExtractor,
    InstructCellForConditionalGeneration,
    InstructCellProcessor,
)

logger = logging.getLogger(__name__)
TASKS = ("cta", "dsp", "cpcg")
# submodules of InstructCellForConditionalGeneration that are new next to the language model
CELL_MODULES = frozenset({"cell_encoder", "language_projection", "cell_vae"})
PROCESSOR_DIR = "processor"
# lr multiplier against the fraction of the wall-clock budget spent (``anneal_to_time_limit``)
WALL_CLOCK_SCHEDULES = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


@dataclass
class ModelArguments:
    """Which model to build."""

    preset: str = field(default="small", metadata={"help": "Preset name (tiny, small, base) or JSON path."})
    backbone: str | None = field(
        default=None,
        metadata={
            "help": "Start the language model from pretrained weights, e.g. google-t5/t5-base "
            "(its tokenizer is used too). Default: random weights of the preset's size."
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer name or path. Default: the backbone's, or one trained offline on the "
            "training instructions."
        },
    )
    tokenizer_vocab_size: int = field(default=2000, metadata={"help": "Vocabulary of the offline tokenizer."})
    alignment_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the cell-label contrastive loss (0 = the paper's objective)."},
    )
    standardize_genes: bool = field(
        default=False,
        metadata={"help": "Center and scale each gene by training-cell statistics before the cell MLP."},
    )
    vae_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the ELBO relative to the text loss."}
    )
    vae_kl_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of KL(q(z|x) || p(z)) in the ELBO (default: the preset's, 3.0 as the original)."
        },
    )
    use_lora: bool = field(
        default=False, metadata={"help": "LoRA on the backbone's q/v; cell modules in full."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})


@dataclass
class DataArguments:
    """Which examples to train on."""

    dataset_dir: str = field(
        default="outputs/instructcell-data",
        metadata={
            "help": "Output of examples/build_dataset.py: {train,validation}.parquet + gene_vocab.txt."
        },
    )
    tasks: str = field(default="cta,dsp,cpcg", metadata={"help": "Comma-separated tasks to mix."})
    variant: str = field(default="instruct", metadata={"help": "instruct (answer only) or chat."})
    datasets: str | None = field(
        default=None, metadata={"help": "Comma-separated dataset names to keep (default: all)."}
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Cap on training rows."})
    max_eval_examples: int | None = field(default=512, metadata={"help": "Cap on validation rows."})


@dataclass
class InstructCellTrainingArguments(Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments with the paper's defaults (Adafactor, lr 1e-3) and resumable checkpoints."""

    optim: str = field(default="adafactor", metadata={"help": "The paper uses Adafactor."})
    learning_rate: float = field(default=1e-3, metadata={"help": "The paper's learning rate."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs."})
    eval_strategy: str = field(default="epoch", metadata={"help": "Validate every epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "Checkpoint every epoch."})
    save_total_limit: int | None = field(
        default=2, metadata={"help": "Checkpoints kept (the best is kept too)."}
    )
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Keep the best model by eval_loss."})
    metric_for_best_model: str | None = field(default="eval_loss", metadata={"help": "Best-model metric."})
    logging_steps: float = field(default=20, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads the text and sparse columns."}
    )
    max_train_minutes: float | None = field(default=None, metadata={"help": "Stop after this wall time."})
    anneal_to_time_limit: bool = field(
        default=False,
        metadata={
            "help": "With max_train_minutes: run the lr schedule (linear or cosine, after the warmup "
            "steps) over the wall-clock budget, so the lr reaches 0 when the time is up, instead of over "
            "num_train_epochs."
        },
    )
    cell_modules_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak lr of the modules InstructCell adds to the language model (cell encoder, "
            "language projection, cell VAE); default: learning_rate for all, as the paper."
        },
    )
    restore_callback_states_from_checkpoint: bool = field(
        default=True, metadata={"help": "Resume the wall-clock budget where the checkpoint left it."}
    )
    cell_decoder_steps: int = field(
        default=0,
        metadata={
            "help": "Steps of a second stage that fits the cell VAE on frozen <SIGNAL> states "
            "(instructcell/cell_decoder_fitting.py); 0 skips it (the paper's joint training only)."
        },
    )
    cell_decoder_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW lr of that stage."})
    cell_decoder_batch_size: int = field(default=64, metadata={"help": "Batch size of that stage."})


def load_splits(data_args: DataArguments) -> datasets.DatasetDict:
    """Read the builder's Parquet export and keep the requested tasks and variant."""
    root = Path(data_args.dataset_dir)
    files = {split: root / f"{split}.parquet" for split in ("train", "validation")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise ValueError(
            f"Missing {missing}: build the data first with examples/build_dataset.py --output {root}."
        )
    tasks = {task.strip() for task in data_args.tasks.split(",") if task.strip()}
    unknown = tasks - set(TASKS)
    if unknown:
        raise ValueError(f"Unknown tasks {sorted(unknown)}; choose from {TASKS}.")
    splits = datasets.load_dataset("parquet", data_files={k: str(v) for k, v in files.items()})
    names = {name.strip() for name in data_args.datasets.split(",")} if data_args.datasets else None
    splits = splits.filter(
        lambda row: (
            row["task"] in tasks
            and row["variant"] == data_args.variant
            and (names is None or row["dataset"] in names)
        )
    )
    if len(splits["train"]) == 0:
        raise ValueError(
            f"No training rows for tasks {sorted(tasks)}, variant {data_args.variant!r} and datasets {names}."
        )
    for split, cap in (("train", data_args.max_train_examples), ("validation", data_args.max_eval_examples)):
        if cap is not None and len(splits[split]) > cap:
            splits[split] = splits[split].shuffle(seed=0).select(range(cap))
    return splits


def build_processor(model_args: ModelArguments, data_args: DataArguments, train: datasets.Dataset):
    """Processor over the dataset's gene vocabulary with a pretrained or offline-trained tokenizer."""
    genes = read_gene_vocab(Path(data_args.dataset_dir) / "gene_vocab.txt")
    name = model_args.tokenizer or model_args.backbone
    if name is not None:
        tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        corpus = list(train["instruction"]) + list(train["response"]) + list(train["label"])
        tokenizer = train_instruction_tokenizer(corpus, vocab_size=model_args.tokenizer_vocab_size)
    num_query_tokens = load_preset(model_args.preset).get("num_query_tokens", 8)
    feature_extractor = InstructCellFeatureExtractor(
        gene_names=genes, min_gene_overlap=min_gene_overlap_for(train, len(genes))
    )
    return InstructCellProcessor(feature_extractor, tokenizer, num_query_tokens=num_query_tokens)


def min_gene_overlap_for(train: datasets.Dataset, n_genes: int) -> float:
    """Half the vocabulary coverage of the least-covered training dataset.

    A vocabulary merged from several datasets is covered only in part by each of them (the model saw the
    other genes as zeros), so the featurizer's default 50 % threshold would reject the training data itself.
    """
    coverage = []
    for name in sorted(set(train["dataset"])):
        rows = train.filter(lambda row, n=name: row["dataset"] == n)
        seen = set()
        for column in ("input_gene_indices", "target_gene_indices"):
            for indices in rows[column]:
                seen.update(indices)
        coverage.append(len(seen) / n_genes)
    return round(0.5 * min(coverage), 4)


def build_model(
    model_args: ModelArguments, processor: InstructCellProcessor
) -> InstructCellForConditionalGeneration:
    """Build the preset's model; with ``backbone``, its language model starts from pretrained weights."""
    overrides = {}
    if model_args.backbone is not None:
        backbone = AutoModelForSeq2SeqLM.from_pretrained(model_args.backbone)
        overrides["text_config"] = backbone.config.to_dict()
    overrides["alignment_loss_weight"] = model_args.alignment_loss_weight
    overrides["vae_loss_weight"] = model_args.vae_loss_weight
    overrides["standardize_genes"] = model_args.standardize_genes
    if model_args.vae_kl_weight is not None:
        overrides["vae_kl_weight"] = model_args.vae_kl_weight
    config = config_for_processor(model_args.preset, processor, **overrides)
    model = InstructCellForConditionalGeneration(config)
    if model_args.backbone is not None:
        backbone.resize_token_embeddings(config.text_config.vocab_size)
        model.language_model.load_state_dict(backbone.state_dict())
    if model_args.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=r".*language_model.*\.(q|v)",
            modules_to_save=sorted(CELL_MODULES),
        )
        model = get_peft_model(model, lora)
    return model


class InstructCellTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer that also logs the text loss and the ELBO (running means since the last log).

    With ``max_train_minutes`` it stops on the wall clock (:class:`WallClockLimitCallback`), shows its
    progress bar in minutes of that budget, and with ``anneal_to_time_limit`` decays the lr over it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_parts: dict[str, list[float]] = {"lm_loss": [], "vae_loss": [], "alignment_loss": []}
        if self.args.anneal_to_time_limit:
            if not self.args.max_train_minutes:
                raise ValueError(
                    "anneal_to_time_limit needs max_train_minutes: the budget the lr decays over."
                )
            schedule = SchedulerType(self.args.lr_scheduler_type).value
            if schedule not in WALL_CLOCK_SCHEDULES:
                raise ValueError(
                    f"anneal_to_time_limit supports lr_scheduler_type {sorted(WALL_CLOCK_SCHEDULES)}, "
                    f"got {schedule!r}."
                )
        budget = self.args.max_train_minutes
        if budget:
            self.add_callback(WallClockLimitCallback(budget))
            if self.pop_callback(ProgressCallback) is not None:
                self.add_callback(WallClockProgressCallback(budget, lambda: self._wall_clock().elapsed()))

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Create the Trainer's optimizer; with ``cell_modules_learning_rate``, the cell modules get that lr.

        The Trainer's two groups (with and without weight decay) are each split into language-model and
        cell-module parameters, so the schedulers scale both peak rates by the same factor.
        """
        cell_lr = self.args.cell_modules_learning_rate
        if self.optimizer is None and cell_lr is not None:
            opt_model = self.model if model is None else model
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = {}
            for name, parameter in opt_model.named_parameters():
                if parameter.requires_grad:
                    is_cell = not CELL_MODULES.isdisjoint(name.split("."))
                    groups.setdefault((name in decay, is_cell), []).append(parameter)
            params = [
                {
                    "params": parameters,
                    "weight_decay": self.args.weight_decay if decays else 0.0,
                    "lr": cell_lr if is_cell else self.args.learning_rate,
                }
                for (decays, is_cell), parameters in sorted(groups.items())
            ]
            # the Trainer builds the optimizer from "params" when its kwargs carry them
            self.optimizer_cls_and_kwargs = (optimizer_cls, {**kwargs, "params": params})
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """Create the Trainer's scheduler, or with ``anneal_to_time_limit`` one driven by the time budget.

        Wall-clock progress is read from the :class:`WallClockLimitCallback` registered at the time of the
        call (a resumed run restores it, with the time trained before), so the decay picks up where it left.
        """
        if self.lr_scheduler is not None or not self.args.anneal_to_time_limit:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup_steps = self.args.get_warmup_steps(num_training_steps)
        shape = WALL_CLOCK_SCHEDULES[SchedulerType(self.args.lr_scheduler_type).value]

        def factor(step: int) -> float:
            warmup = 1.0 if step >= warmup_steps else step / max(1, warmup_steps)
            return min(warmup, shape(self._wall_clock().progress()))

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _wall_clock(self) -> "WallClockLimitCallback":
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, WallClockLimitCallback):
                return callback
        raise RuntimeError(
            "The wall-clock lr schedule and progress bar need the WallClockLimitCallback that "
            "InstructCellTrainer adds under max_train_minutes; do not remove it from the callbacks."
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Return the model's total loss and keep its parts (text, ELBO, alignment) for logging."""
        outputs = model(**inputs)
        if model.training:
            for name in self._loss_parts:
                value = getattr(outputs, name)
                if value is not None:
                    self._loss_parts[name].append(float(value.detach()))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean loss parts since the last log to the Trainer's log entry."""
        if "loss" in logs:
            for name, values in self._loss_parts.items():
                if values:
                    logs[name] = round(sum(values) / len(values), 4)
                values.clear()
        super().log(logs, start_time)


class WallClockLimitCallback(TrainerCallback, ExportableState):
    """Stop (and checkpoint) once ``minutes`` of training wall time have passed.

    The time already trained is saved with every checkpoint, so a resumed run only trains what is left.
    """

    def __init__(self, minutes: float, elapsed_before: float = 0.0):
        self.seconds = minutes * 60
        self.elapsed_before = elapsed_before
        self.start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds trained so far, earlier runs included."""
        return self.elapsed_before + time.monotonic() - self.start

    def progress(self) -> float:
        """Fraction of the budget spent, in ``[0, 1]``."""
        return min(1.0, self.elapsed() / self.seconds) if self.seconds > 0 else 1.0

    def state(self) -> dict:
        """Return the budget and the training time used so far (saved in checkpoints)."""
        return {"args": {"minutes": self.seconds / 60}, "attributes": {"elapsed_before": self.elapsed()}}

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock."""
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        """Stop and save once the budget is spent."""
        if self.elapsed() > self.seconds:
            control.should_training_stop = True
            control.should_save = True
        return control


class WallClockProgressCallback(ProgressCallback):
    """The Trainer's progress bar, in minutes of the wall-clock budget instead of optimizer steps.

    Under ``max_train_minutes``, ``num_train_epochs`` is only an upper bound, so a bar over its steps would
    forecast hours for a 9-minute run. This bar shows the minutes trained (earlier runs of a resumed job
    included) out of the budget, the step reached and the time left; evaluation bars and log lines are the
    Trainer's.
    """

    def __init__(self, budget_minutes: float, elapsed_seconds: Callable[[], float]):
        super().__init__()
        self.budget_minutes = budget_minutes
        self.elapsed_seconds = elapsed_seconds

    def on_train_begin(self, args, state, control, **kwargs):
        """Open the bar over the budget."""
        if state.is_world_process_zero:
            self.training_bar = tqdm(
                total=self.budget_minutes,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:g} min{postfix}",
                dynamic_ncols=True,
            )
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        """Move the bar to the minutes trained so far."""
        if state.is_world_process_zero:
            minutes = min(self.elapsed_seconds() / 60, self.budget_minutes)
            left = tqdm.format_interval((self.budget_minutes - minutes) * 60)
            self.training_bar.n = minutes
            self.training_bar.set_postfix_str(f"step {state.global_step}, {left} left")
        self.current_step = state.global_step


class SaveOnInterruptCallback(TrainerCallback):
    """On SIGINT/SIGTERM, finish the current step, write a checkpoint and stop; rerun to resume."""

    def __init__(self):
        self.interrupted = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        logger.warning("Interrupted: saving a checkpoint after this step (Ctrl-C again to abort).")
        self.interrupted = True

    def on_step_end(self, args, state, control, **kwargs):
        """After Ctrl-C, save a checkpoint and stop at the end of this step."""
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control


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
    (:func:`instructcell.cell_decoder_fitting.fit_cell_decoder`).
    """
    splits = load_splits(data_args)
    processor_dir = Path(training_args.output_dir) / PROCESSOR_DIR
    if processor_dir.is_dir():  # a resumed run keeps its tokenizer
        processor = InstructCellProcessor.from_pretrained(processor_dir)
    else:
        processor = build_processor(model_args, data_args, splits["train"])
        if training_args.process_index == 0:
            processor.save_pretrained(processor_dir)
    model = build_model(model_args, processor)
    base_model = model.get_base_model() if model_args.use_lora else model
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
    if training_args.cell_decoder_steps > 0 and not interrupt.interrupted:
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
