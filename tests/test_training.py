"""`instructcell train`'s machinery on a tiny Parquet dataset: Trainer, loss parts, interruption, resume."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import GENES
from training_data import write_training_dataset
from transformers import AutoModel, TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import ProgressCallback

from instructcell.cli import main as cli_main
from instructcell.training import (
    DataArguments,
    InstructCellTrainingArguments,
    ModelArguments,
    budget_report,
    run_training,
    train_instruction_tokenizer,
    training_budget,
)
from instructcell.training import cell_decoder as cell_decoder_fitting
from instructcell.training import run as training_run
from instructcell.training.trainer import WallClockLimitCallback

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return write_training_dataset(tmp_path_factory.mktemp("data"))


def _args(dataset_dir: Path, output_dir: Path, **overrides):
    training = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=6,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=1,
        learning_rate=3e-3,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        disable_tqdm=True,
        use_cpu=True,
    )
    training.update(overrides)
    return (
        ModelArguments(preset="tiny", tokenizer_vocab_size=200),
        DataArguments(dataset_dir=str(dataset_dir)),
        InstructCellTrainingArguments(**training),
    )


@contextlib.contextmanager
def _default_signal_handlers():
    """Put the default SIGINT/SIGTERM handlers back afterwards (training installs its own)."""
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _train(model_args, data_args, training_args, callbacks=()):
    with _default_signal_handlers():
        return run_training(model_args, data_args, training_args, callbacks=callbacks)


def test_training_logs_both_losses_and_keeps_the_best(dataset_dir, tmp_path):
    trainer, processor, interrupted = _train(*_args(dataset_dir, tmp_path / "run"))
    assert not interrupted and trainer.state.global_step == 4
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("lm_loss" in entry and "vae_loss" in entry for entry in logged)
    assert trainer.state.best_model_checkpoint is not None
    assert (tmp_path / "run" / "processor" / "processor_config.json").is_file()
    assert trainer.model.cell_vae.library_log_mean.item() > 0  # prior set from the training targets


def test_recipe_sets_the_vae_kl_weight(dataset_dir, tmp_path):
    short = dict(max_steps=1, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    assert _train(*_args(dataset_dir, tmp_path / "a", **short))[0].model.config.vae_kl_weight == 3.0
    model_args, data_args, training_args = _args(dataset_dir, tmp_path / "b", **short)
    model_args.vae_kl_weight = 1.0
    assert _train(model_args, data_args, training_args)[0].model.config.vae_kl_weight == 1.0


def test_interrupted_run_resumes_without_lost_steps(dataset_dir, tmp_path):
    class InterruptAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    args = _args(
        dataset_dir,
        tmp_path / "run",
        max_steps=6,
        save_steps=100,
        eval_strategy="no",
        load_best_model_at_end=False,
    )
    trainer, _, interrupted = _train(*args, callbacks=[InterruptAtStep3()])
    assert interrupted and trainer.state.global_step == 3
    assert (tmp_path / "run" / "checkpoint-3").is_dir()
    resumed, _, interrupted = _train(*args)
    assert not interrupted and resumed.state.global_step == 6
    steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    assert steps == sorted(set(steps)) and steps[:3] == [1, 2, 3] and steps[-1] == 6


def test_predict_with_generate_returns_ids(dataset_dir, tmp_path):
    trainer, _, _ = _train(
        *_args(
            dataset_dir,
            tmp_path / "run",
            predict_with_generate=True,
            generation_max_length=8,
            eval_strategy="no",
            load_best_model_at_end=False,
        )
    )
    predictions = trainer.predict(trainer.eval_dataset)
    assert predictions.predictions.ndim == 2 and predictions.predictions.shape[0] == len(trainer.eval_dataset)


@pytest.mark.slow
def test_accelerate_launch_trains_and_saves_hub_folder(dataset_dir, tmp_path):
    output, overridden = tmp_path / "launched", tmp_path / "overridden"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"dataset_dir: {dataset_dir}\noutput_dir: {overridden}\npreset: tiny\ntokenizer_vocab_size: 200\n"
        "max_steps: 2\nsave_strategy: 'no'\neval_strategy: 'no'\nload_best_model_at_end: false\n"
        "disable_tqdm: true\nper_device_train_batch_size: 4\n"
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configuration" / "accelerate" / "single_cpu.yaml"),
        str(REPO / "examples" / "train.py"),
        str(recipe),
        "--output_dir",
        str(output),  # flags after the recipe override it
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Trained 2 of 2 planned steps." in result.stdout
    final = output / "final"
    assert json.loads((final / "config.json").read_text())["auto_map"]["AutoModel"].endswith(
        "InstructCellForConditionalGeneration"
    )
    model = AutoModel.from_pretrained(final)
    assert model.config.n_genes == len(GENES)
    assert not overridden.exists()


def test_cell_decoder_stage_trains_only_the_vae_and_resumes(dataset_dir, tmp_path, monkeypatch):
    args = _args(
        dataset_dir,
        tmp_path / "run",
        eval_strategy="no",
        load_best_model_at_end=False,
        cell_decoder_steps=3,
        cell_decoder_batch_size=4,
        lr_scheduler_type="constant",  # so that training further still moves the weights
    )
    snapshots = {}
    original = cell_decoder_fitting.fit_cell_decoder

    def spy(model, *a, **kw):
        snapshots["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        return original(model, *a, **kw)

    monkeypatch.setattr(training_run, "fit_cell_decoder", spy)
    trainer, _, interrupted = _train(*args)
    assert not interrupted
    after = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    changed = {k for k, v in snapshots["before"].items() if not torch.equal(v, after[k])}
    assert changed and all(k.startswith("cell_vae.") for k in changed)
    stage = tmp_path / "run" / "cell-decoder" / "after-step-4"
    assert (stage / "checkpoint-3").is_dir()
    # a rerun resumes the finished stage instead of training it again
    again = original(
        trainer.model,
        trainer.processing_class,
        datasets.load_dataset("parquet", data_files=str(dataset_dir / "train.parquet"))["train"],
        args[2],
        steps=3,
        batch_size=4,
        output_dir=stage,
    )
    assert again.state.global_step == 3
    assert torch.equal(trainer.model.state_dict()["cell_vae.px_r"], after["cell_vae.px_r"])
    # training the main stage further fits a new cell decoder on the new <SIGNAL> states
    args[2].max_steps = 5
    longer, _, _ = _train(*args)
    assert longer.state.global_step == 5
    assert (tmp_path / "run" / "cell-decoder" / "after-step-5" / "checkpoint-3").is_dir()
    refitted = longer.model.state_dict()
    assert any(not torch.equal(refitted[k], after[k]) for k in changed)


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_interrupt_in_the_cell_decoder_stage_resumes_it_without_training_the_main_stage_again(
    dataset_dir, tmp_path, monkeypatch
):
    class InterruptAtDecoderStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    original = cell_decoder_fitting.fit_cell_decoder

    def interrupted_fit(*a, callbacks=(), **kw):
        return original(*a, callbacks=[*callbacks, InterruptAtDecoderStep2()], **kw)

    no_checkpoints = dict(save_strategy="no", eval_strategy="no", load_best_model_at_end=False)
    decoder = dict(cell_decoder_steps=3, cell_decoder_batch_size=4)
    args = _args(dataset_dir, tmp_path / "run", **no_checkpoints, **decoder)
    monkeypatch.setattr(training_run, "fit_cell_decoder", interrupted_fit)
    _, _, interrupted = _train(*args)
    monkeypatch.setattr(training_run, "fit_cell_decoder", original)
    stage = tmp_path / "run" / "cell-decoder" / "after-step-4"
    assert interrupted and [p.name for p in stage.iterdir()] == ["checkpoint-2"]
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-4"]  # the last step

    main_steps = CountSteps()
    resumed, _, interrupted = _train(*args, callbacks=[main_steps])
    assert not interrupted and main_steps.steps == 0 and resumed.state.global_step == 4
    assert [p.name for p in stage.iterdir()] == ["checkpoint-3"]
    uninterrupted, _, _ = _train(*_args(dataset_dir, tmp_path / "once", **no_checkpoints, **decoder))
    for name, value in uninterrupted.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, msg=name)


def test_signal_states_need_one_signal_per_generation_row(dataset_dir, tmp_path):
    from instructcell.training.cell_decoder import conditioned_cells

    trainer, processor, _ = _train(
        *_args(
            dataset_dir,
            tmp_path / "run",
            max_steps=1,
            eval_strategy="no",
            load_best_model_at_end=False,
            save_strategy="no",
        )
    )
    train = datasets.load_dataset("parquet", data_files=str(dataset_dir / "train.parquet"))["train"]
    rows = conditioned_cells(trainer.model, processor, train)
    assert len(rows) == 8 and len(rows[0]["condition_states"]) == trainer.model.config.text_config.d_model
    broken = train.map(lambda row: {"response": "T cell" if row["task"] == "cpcg" else row["response"]})
    with pytest.raises(ValueError, match="<SIGNAL> tokens but 8 target cells"):
        conditioned_cells(trainer.model, processor, broken)


def test_wall_clock_budget_survives_a_resume(tmp_path):
    callback = WallClockLimitCallback(minutes=1.0, elapsed_before=50.0)
    state = callback.state()
    assert state["args"] == {"minutes": 1.0} and state["attributes"]["elapsed_before"] >= 50.0
    restored = WallClockLimitCallback(**state["args"])
    restored.elapsed_before = 61.0  # as the Trainer restores it from the checkpoint
    args = InstructCellTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    restored.on_train_begin(args, TrainerState(), TrainerControl())
    assert restored.progress() == 1.0
    control = restored.on_step_end(args, TrainerState(), TrainerControl())
    assert control.should_training_stop and control.should_save


def test_lr_anneals_over_the_wall_clock_budget(dataset_dir, tmp_path):
    budget = dict(
        max_train_minutes=60.0,
        anneal_to_time_limit=True,
        lr_scheduler_type="cosine",
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        disable_tqdm=False,
    )
    trainer, _, _ = _train(*_args(dataset_dir, tmp_path / "run", **budget))
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert trainer.state.global_step == 4 and min(rates) > 0.99 * 3e-3  # seconds into an hour: full lr
    # the clock is the budget here: stopping on it would be the plan, not a cut
    assert budget_report(training_budget(trainer), trainer.args) == (
        "Trained 4 steps in the wall-clock budget of 60 minutes."
    )
    bars = [type(c).__name__ for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)]
    assert bars == ["WallClockProgressCallback"]  # the step bar (total: epochs x steps) is replaced
    factor = trainer.lr_scheduler.lr_lambdas[0]
    # as a resumed run restores the clock: a new callback instance that has trained 45 of 60 minutes
    trainer.callback_handler.remove_callback(WallClockLimitCallback)
    trainer.callback_handler.add_callback(WallClockLimitCallback(minutes=60.0, elapsed_before=45 * 60))
    assert factor(10) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.75)), abs=1e-3)
    trainer.callback_handler.remove_callback(WallClockLimitCallback)
    trainer.callback_handler.add_callback(WallClockLimitCallback(minutes=60.0, elapsed_before=61 * 60))
    assert factor(10) == 0.0


def test_cell_modules_train_at_their_own_learning_rate(dataset_dir, tmp_path):
    short = dict(
        max_steps=2, warmup_steps=0, eval_strategy="no", save_strategy="no", load_best_model_at_end=False
    )
    trainer, _, _ = _train(*_args(dataset_dir, tmp_path / "run", cell_modules_learning_rate=1e-4, **short))
    model = trainer.model
    groups = trainer.optimizer.param_groups
    cell = {
        id(p)
        for module in (model.cell_encoder, model.language_projection, model.cell_vae)
        for p in module.parameters()
    }
    language = {id(p) for p in model.language_model.parameters()}
    assert {id(p) for group in groups for p in group["params"]} == cell | language  # every parameter, once
    assert sum(len(group["params"]) for group in groups) == len(cell | language)
    for group in groups:
        members = {id(p) for p in group["params"]}
        assert members <= cell or members <= language
        # both peak rates, scaled alike by the linear schedule: 0 after the last of 2 steps
        peak = 1e-4 if members <= cell else 3e-3
        assert group["initial_lr"] == pytest.approx(peak)
        assert group["lr"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"anneal_to_time_limit": True}, "needs max_train_minutes"),
        (
            {"anneal_to_time_limit": True, "max_train_minutes": 1.0, "lr_scheduler_type": "constant"},
            "supports lr_scheduler_type",
        ),
    ],
)
def test_wall_clock_annealing_rejects_what_it_cannot_schedule(dataset_dir, tmp_path, overrides, message):
    short = dict(max_steps=1, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    with pytest.raises(ValueError, match=message):
        _train(*_args(dataset_dir, tmp_path / "run", **short, **overrides))


def test_progress_bar_counts_minutes_of_the_budget_not_steps():
    from instructcell.training.trainer import WallClockProgressCallback

    elapsed = [270.0]
    callback = WallClockProgressCallback(budget_minutes=9.0, elapsed_seconds=lambda: elapsed[0])
    state = type("State", (), {"is_world_process_zero": True, "global_step": 5})()
    callback.on_train_begin(None, state, None)
    callback.on_step_end(None, state, None)
    bar = callback.training_bar
    assert bar.total == 9.0 and bar.n == pytest.approx(4.5)
    assert "4.5/9 min, step 5, 04:30 left" in str(bar)
    elapsed[0] = 600.0  # past the budget: the bar stops at its end
    callback.on_step_end(None, state, None)
    assert bar.n == 9.0
    callback.on_train_end(None, state, None)


def test_the_offline_tokenizer_is_the_same_every_time():
    corpus = ["What cell type is this human cell? <CELL>", "T cell", "B cell", "sensitive", "resistant"] * 4
    first, second = (train_instruction_tokenizer(corpus, vocab_size=200) for _ in range(2))
    assert first.get_vocab() == second.get_vocab()
    assert first("Generate a T cell.").input_ids == second("Generate a T cell.").input_ids


def test_the_same_training_run_twice_gives_identical_losses_and_weights(dataset_dir, tmp_path):
    short = dict(max_steps=2, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    runs = [_train(*_args(dataset_dir, tmp_path / name, **short))[0] for name in ("a", "b")]
    losses = [
        [(e["loss"], e["lm_loss"], e["vae_loss"]) for e in run.state.log_history if "loss" in e]
        for run in runs
    ]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    first, second = (run.model.state_dict() for run in runs)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_gradient_accumulation_equals_one_batch_of_the_same_size(dataset_dir, tmp_path):
    def train(name, **batching):
        arguments = _args(
            dataset_dir,
            tmp_path / name,
            max_steps=3,
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            **batching,
        )
        arguments[1].tasks = "cta,dsp"  # no cell sampling: the two runs see the same numbers
        return _train(*arguments)[0]

    one = train("one", per_device_train_batch_size=8)
    accumulated = train("accumulated", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    losses = [[e["loss"] for e in run.state.log_history if "loss" in e] for run in (one, accumulated)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)
    weights = accumulated.model.state_dict()
    for name, value in one.model.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_a_rerun_on_a_rebuilt_gene_vocabulary_is_refused(dataset_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    short = dict(max_steps=1, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    _train(*_args(data, tmp_path / "run", **short))
    (data / "gene_vocab.txt").write_text("\n".join(["NEWGENE", *GENES[1:]]) + "\n")
    with pytest.raises(ValueError, match="is not the vocabulary the run in .* started with"):
        _train(*_args(data, tmp_path / "run", **short))


def _train_command(dataset_dir: Path, output_dir: Path, **values) -> tuple[int, list[str]]:
    """Run ``instructcell train`` on a tiny recipe with ``values``; return its status and printed lines."""
    settings = {
        "dataset_dir": str(dataset_dir),
        "preset": "tiny",
        "tokenizer_vocab_size": 200,
        "per_device_train_batch_size": 4,
        "save_strategy": "no",
        "eval_strategy": "no",
        "load_best_model_at_end": False,
        "disable_tqdm": True,
        "report_to": "none",
        "use_cpu": True,
        "cell_decoder_steps": 0,
        **values,
    }
    recipe = output_dir.parent / "recipe.yaml"
    recipe.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    out = io.StringIO()
    with _default_signal_handlers():
        status = cli_main(["train", str(recipe), "--output_dir", str(output_dir)], stdout=out)
    return status, out.getvalue().splitlines()


def test_train_command_reports_steps_done_against_planned(dataset_dir, tmp_path):
    status, printed = _train_command(dataset_dir, tmp_path / "run", max_steps=2)
    assert status == 0 and printed[0] == "Trained 2 of 2 planned steps."


def test_train_command_says_plainly_when_the_wall_clock_cap_cut_training_short(dataset_dir, tmp_path):
    status, printed = _train_command(dataset_dir, tmp_path / "run", max_steps=50, max_train_minutes=1e-5)
    assert status == 3
    assert printed == [
        "Stopped by the wall-clock cap (max_train_minutes=1e-05) at step 1 of 50 planned: this is not the "
        "recipe's model. Rerun the same command to train the remaining steps from the checkpoint.",
        "No final model was saved.",
    ]
    assert (tmp_path / "run" / "checkpoint-1").is_dir() and not (tmp_path / "run" / "final").exists()


def test_a_cell_decoder_batch_the_processes_cannot_share_is_refused_before_training(dataset_dir, tmp_path):
    short = dict(max_steps=1, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    arguments = _args(dataset_dir, tmp_path / "run", cell_decoder_steps=2, cell_decoder_batch_size=0, **short)
    with pytest.raises(ValueError, match=r"cell_decoder_batch_size \(0\) must be a positive multiple"):
        _train(*arguments)
    assert not (tmp_path / "run").exists()
