"""The Trainer of InstructCell and its callbacks: loss parts, a wall-clock cap, and checkpoint on interrupt."""

import logging
import math
import signal
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import SchedulerType, Seq2SeqTrainer, TrainerCallback
from transformers.trainer_callback import ExportableState, ProgressCallback

from .build import CELL_MODULES

logger = logging.getLogger(__name__)
# lr multiplier against the fraction of the wall-clock budget spent (``anneal_to_time_limit``)
WALL_CLOCK_SCHEDULES = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}


class InstructCellTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer that also logs the text loss and the ELBO (running means since the last log).

    With ``max_train_minutes`` it stops on the wall clock (:class:`WallClockLimitCallback`). With ``max_steps``
    (the recipes' budget) that is only a safety cap and the progress bar counts steps. Learning curves make the
    clock the budget (no ``max_steps``, or ``anneal_to_time_limit``, which decays the lr over the minutes):
    the bar then counts minutes.
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
            clock_is_budget = self.args.max_steps <= 0 or self.args.anneal_to_time_limit
            if clock_is_budget and self.pop_callback(ProgressCallback) is not None:
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
        self.stopped_training = False

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
