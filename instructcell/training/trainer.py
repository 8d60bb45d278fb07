"""The Trainer of InstructCell and its callbacks: loss parts, a wall-clock cap, and checkpoint on interrupt.

The Trainer runs the same in one process and in several (DDP, :mod:`.processes`): a step's loss is that of its
whole batch over all processes, and the callbacks that stop training decide once for all processes.
"""

import logging
import math
import signal
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import SchedulerType, Seq2SeqTrainer, TrainerCallback
from transformers.trainer_callback import ExportableState, ProgressCallback

from modeling_instructcell.modeling_instructcell import IGNORE_INDEX

from .build import CELL_MODULES
from .processes import any_process, main_process_value, sum_over_processes

logger = logging.getLogger(__name__)
# lr multiplier against the fraction of the wall-clock budget spent (``anneal_to_time_limit``)
WALL_CLOCK_SCHEDULES = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


def clock_is_budget(args) -> bool:
    """Return whether the wall clock is the training budget, not only a safety cap over ``max_steps``.

    It is with ``max_train_minutes`` and either no ``max_steps`` or ``anneal_to_time_limit`` (the lr decays
    over the minutes).
    """
    return bool(args.max_train_minutes) and (args.max_steps <= 0 or args.anneal_to_time_limit)


class InstructCellTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer that also logs the text loss and the ELBO (running means since the last log).

    With ``max_train_minutes`` it stops on the wall clock (:class:`WallClockLimitCallback`). With
    ``max_steps`` (the recipes' budget) that is only a safety cap and the progress bar counts steps. Learning
    curves make the clock the budget (:func:`clock_is_budget`: no ``max_steps``, or ``anneal_to_time_limit``,
    which decays the lr over the minutes): the bar then counts minutes.
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
            # the wall clock is the budget (no max_steps, or the lr decays over it): a bar in minutes;
            # otherwise it is only a cap and the Trainer's bar counts steps done against planned
            if clock_is_budget(self.args) and self.pop_callback(ProgressCallback) is not None:
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
        """Return this batch's share of the optimizer step's loss and keep the loss parts for logging.

        The model returns the text loss as a mean over this batch's answer tokens and the ELBO and alignment
        terms as means over its rows. An optimizer step sums the gradients of its accumulated batches and
        averages them over processes. To make a step equal one batch of the same total size in one process,
        the text loss is weighted by this batch's share of the step's answer tokens (``num_items_in_batch``,
        counted over every accumulated batch and process) and the other terms by one over the number of
        accumulated batches. In evaluation (``num_items_in_batch`` None) the model's loss is returned as is.
        """
        outputs = model(**inputs)
        loss = outputs.loss
        if model.training:
            for name in self._loss_parts:
                value = getattr(outputs, name)
                if value is not None:
                    self._loss_parts[name].append(float(value.detach()))
            if num_items_in_batch is not None and outputs.lm_loss is not None:
                tokens = (inputs["labels"] != IGNORE_INDEX).sum()
                processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
                other_terms = loss - outputs.lm_loss
                loss = outputs.lm_loss * (tokens * processes / num_items_in_batch) + (
                    other_terms / self.current_gradient_accumulation_steps
                )
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean loss parts since the last log, over all processes, to the Trainer's log entry."""
        if "loss" in logs:  # every process logs the training loss at the same steps
            totals = torch.tensor(
                [[sum(values), len(values)] for values in self._loss_parts.values()], dtype=torch.float64
            )
            totals = sum_over_processes(totals, self.args)
            for (name, values), (total, count) in zip(self._loss_parts.items(), totals.tolist(), strict=True):
                if count:
                    logs[name] = round(total / count, 4)
                values.clear()
        super().log(logs, start_time)


class WallClockLimitCallback(TrainerCallback, ExportableState):
    """Stop (and checkpoint) once ``minutes`` of training wall time have passed.

    The time already trained is saved with every checkpoint, so a resumed run only trains what is left. In
    several processes the main process's clock decides, after every step, for all of them; the wall-clock
    lr schedule reads that agreed time too (:meth:`progress`), so every process applies the same lr.
    """

    def __init__(self, minutes: float, elapsed_before: float = 0.0):
        self.seconds = minutes * 60
        self.elapsed_before = elapsed_before
        self.agreed_elapsed = elapsed_before
        self.start = time.monotonic()
        self.stopped_training = False

    def elapsed(self) -> float:
        """Seconds trained so far by this process's clock, earlier runs included."""
        return self.elapsed_before + time.monotonic() - self.start

    def progress(self) -> float:
        """Return the fraction of the budget spent at the last step's end (main process's clock)."""
        return min(1.0, self.agreed_elapsed / self.seconds) if self.seconds > 0 else 1.0

    def state(self) -> dict:
        """Return the budget and the training time used so far (saved in checkpoints)."""
        return {"args": {"minutes": self.seconds / 60}, "attributes": {"elapsed_before": self.elapsed()}}

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock (after a resume, from the time trained before)."""
        self.start = time.monotonic()
        self.agreed_elapsed = self.elapsed_before

    def on_step_end(self, args, state, control, **kwargs):
        """Stop and save once the budget is spent by the main process's clock."""
        self.agreed_elapsed = main_process_value(self.elapsed(), args)
        if self.agreed_elapsed > self.seconds:
            self.stopped_training = True
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
    """On SIGINT/SIGTERM, finish the current step, write a checkpoint and stop; rerun to resume.

    In several processes a signal that reaches any of them stops all of them after the same step.
    """

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
        """After Ctrl-C (in any process), save a checkpoint and stop at the end of this step."""
        self.interrupted = any_process(self.interrupted, args)
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control


class CheckpointLastStepCallback(TrainerCallback):
    """Checkpoint the last step whatever ``save_strategy`` says, so a rerun never trains this stage again.

    What follows the stage (the cell-decoder stage, the final save) can then be interrupted and resumed:
    the rerun finds the finished stage's checkpoint and continues from there.
    """

    def on_step_end(self, args, state, control, **kwargs):
        """Save after the planned last step."""
        if state.global_step >= state.max_steps:
            control.should_save = True
        return control
