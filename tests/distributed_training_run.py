"""Training scenarios run in every process of a multi-process launch, for tests/test_distributed_training.py.

    accelerate launch --config_file configuration/accelerate/multi_cpu.yaml \
        tests/distributed_training_run.py DATASET_DIR WORK_DIR

Each process writes what it saw to ``WORK_DIR/rank-<rank>.json`` and its final weights of each scenario to
``WORK_DIR/<scenario>-rank-<rank>.pt``:

- ``plain``: CTA + DSP, 4 steps of 4 rows per process; the cell ids each process collated, per epoch.
- ``interrupted`` / ``resumed``: the same run, SIGINT in process 1 only before step 3, then the same call.
- ``wall_clock``: a cap of a few milliseconds over 50 planned steps; and the wall-clock callback itself
  with a clock that has run for a million seconds in process 1 only.
- ``cli``: ``instructcell train`` with all three tasks and the cell-decoder stage, its printed output and
  exit status.
"""

import io
import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState

from instructcell.cli import main as cli_main
from instructcell.training import (
    DataArguments,
    InstructCellTrainingArguments,
    ModelArguments,
    budget_report,
    run_training,
    training_budget,
)
from instructcell.training.trainer import WallClockLimitCallback


class CollatedRows(TrainerCallback):
    """Record the ``cell_id`` of every row the train dataloader collates in this process, per epoch."""

    def __init__(self):
        self.epochs: list[list[str]] = []

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        """Start a new epoch's list; wrap the collator once."""
        self.epochs.append([])
        # accelerate's DataLoaderShard wraps the DataLoader that collates
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        collate = loader.collate_fn
        if not getattr(collate, "records", False):

            def recording(rows, collate=collate):
                self.epochs[-1].extend(row["cell_id"] for row in rows)
                return collate(rows)

            recording.records = True
            loader.collate_fn = recording


class InterruptProcess(TrainerCallback):
    """Send SIGINT to this process before step ``step + 1`` if it is process ``rank``."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_begin(self, args, state, control, **kwargs):
        """Interrupt once, in one process only."""
        if args.process_index == self.rank and state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def arguments(dataset_dir: str, output_dir: Path, tasks: str = "cta,dsp", **overrides):
    """Tiny preset, offline tokenizer, CPU; 4 steps of 4 rows per process."""
    training = {
        "output_dir": str(output_dir),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "report_to": "none",
        "use_cpu": True,
        **overrides,
    }
    return (
        ModelArguments(preset="tiny", tokenizer_vocab_size=200),
        DataArguments(dataset_dir=dataset_dir, tasks=tasks),
        InstructCellTrainingArguments(**training),
    )


def train(name: str, work: Path, args, callbacks=()) -> tuple[dict, object]:
    """Run one scenario; return what this process saw and the trainer."""
    trainer, _, interrupted = run_training(*args, callbacks=callbacks)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rank = trainer.args.process_index
    torch.save(trainer.model.state_dict(), work / f"{name}-rank-{rank}.pt")
    budget = training_budget(trainer)
    seen = {
        "world_size": trainer.args.world_size,
        "rank": rank,
        "should_save": trainer.args.should_save,
        "interrupted": interrupted,
        "losses": {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry},
        "budget": budget,
        "report": budget_report(budget, trainer.args),
    }
    return seen, trainer


def wall_clock_agreement(args: InstructCellTrainingArguments) -> dict:
    """Step-end decision of a 1-minute cap whose clock has run for 1e6 s in process 1 and 0 s in process 0."""
    callback = WallClockLimitCallback(minutes=1.0, elapsed_before=1e6 if args.process_index == 1 else 0.0)
    callback.on_train_begin(args, TrainerState(), TrainerControl())
    control = callback.on_step_end(args, TrainerState(), TrainerControl())
    return {"should_training_stop": control.should_training_stop, "agreed_elapsed": callback.agreed_elapsed}


def main(dataset_dir: str, work_dir: str) -> None:
    """Run every scenario in this process and write its results."""
    work = Path(work_dir)
    results = {}
    rows = CollatedRows()
    results["plain"], _ = train("plain", work, arguments(dataset_dir, work / "plain"), [rows])
    results["plain"]["epochs"] = rows.epochs

    interrupted_args = arguments(dataset_dir, work / "interrupted")
    results["interrupted"], _ = train("interrupted", work, interrupted_args, [InterruptProcess(1, 2)])
    checkpoints = (work / "interrupted").glob("checkpoint-*")
    results["interrupted"]["checkpoints"] = sorted(path.name for path in checkpoints)
    results["resumed"], _ = train("resumed", work, interrupted_args)

    capped = arguments(dataset_dir, work / "wall_clock", max_steps=50, max_train_minutes=1e-5)
    results["wall_clock"], trainer = train("wall_clock", work, capped)
    results["wall_clock"]["callback"] = wall_clock_agreement(trainer.args)

    recipe = work / "recipe.yaml"
    recipe.write_text(
        f"dataset_dir: {dataset_dir}\npreset: tiny\ntokenizer_vocab_size: 200\nmax_steps: 3\n"
        "per_device_train_batch_size: 4\nsave_strategy: 'no'\neval_strategy: 'no'\n"
        "load_best_model_at_end: false\ndisable_tqdm: true\nreport_to: none\n"
        "cell_decoder_steps: 2\ncell_decoder_batch_size: 4\n"
    )
    out = io.StringIO()
    flags = ["--output_dir", str(work / "cli"), "--use_cpu", "true"]
    status = cli_main(["train", str(recipe), *flags], stdout=out)
    results["cli"] = {"status": status, "printed": out.getvalue()}

    rank = results["plain"]["rank"]
    (work / f"rank-{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
