"""`instructcell train`'s machinery on a tiny Parquet dataset: Trainer, loss parts, interruption and resume."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import GENES
from transformers import AutoModel, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from instructcell.training import DataArguments, InstructCellTrainingArguments, ModelArguments, run_training

REPO = Path(__file__).resolve().parents[1]


def _row(task: str, counts: np.ndarray, label: str, split: str) -> dict:
    nonzero = np.flatnonzero(counts)
    cell = {
        "gene_indices": nonzero.astype(np.int32).tolist(),
        "gene_counts": counts[nonzero].astype(np.float32).tolist(),
    }
    empty = {"gene_indices": [], "gene_counts": []}
    instruction = {
        "cta": "What cell type is this human cell? <CELL>",
        "dsp": "Is this cell sensitive or resistant to erlotinib? <CELL>",
        "cpcg": f"Generate a {label} from human blood.",
    }[task]
    return {
        "task": task,
        "variant": "instruct",
        "dataset": "toy",
        "cell_id": f"{task}-{split}-{label}",
        "split": split,
        "template_id": "t0",
        "instruction": instruction,
        "response": "<SIGNAL>" if task == "cpcg" else label,
        "label": label,
        "choices": [],
        "options_in_prompt": False,
        "species": "human",
        "tissue": "blood",
        "sequencing_method": "10x",
        "drug": "erlotinib" if task == "dsp" else "",
        **{f"input_{k}": v for k, v in (empty if task == "cpcg" else cell).items()},
        **{f"target_{k}": v for k, v in (cell if task == "cpcg" else empty).items()},
    }


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    labels = {"cta": ["T cell", "B cell"], "dsp": ["sensitive", "resistant"], "cpcg": ["T cell", "B cell"]}
    for split, n in (("train", 8), ("validation", 2)):
        rows = []
        for task, names in labels.items():
            for i in range(n):
                counts = rng.poisson(3.0, size=len(GENES))
                counts[0] += 1
                rows.append(_row(task, counts, names[i % 2], f"{split}{i}"))
        datasets.Dataset.from_list(rows).to_parquet(str(root / f"{split}.parquet"))
    (root / "gene_vocab.txt").write_text("\n".join(GENES) + "\n")
    return root


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


def test_training_logs_both_losses_and_keeps_the_best(dataset_dir, tmp_path):
    trainer, processor, interrupted = run_training(*_args(dataset_dir, tmp_path / "run"))
    assert not interrupted and trainer.state.global_step == 4
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("lm_loss" in entry and "vae_loss" in entry for entry in logged)
    assert trainer.state.best_model_checkpoint is not None
    assert (tmp_path / "run" / "processor" / "processor_config.json").is_file()
    assert trainer.model.cell_vae.library_log_mean.item() > 0  # prior set from the training targets


def test_recipe_sets_the_vae_kl_weight(dataset_dir, tmp_path):
    short = dict(max_steps=1, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    assert run_training(*_args(dataset_dir, tmp_path / "a", **short))[0].model.config.vae_kl_weight == 3.0
    model_args, data_args, training_args = _args(dataset_dir, tmp_path / "b", **short)
    model_args.vae_kl_weight = 1.0
    assert run_training(model_args, data_args, training_args)[0].model.config.vae_kl_weight == 1.0


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
    from instructcell.training import run as training

    original = training.InstructCellTrainer.__init__

    def with_interrupt(self, *a, **kw):
        kw["callbacks"] = [*kw.get("callbacks", []), InterruptAtStep3()]
        original(self, *a, **kw)

    training.InstructCellTrainer.__init__ = with_interrupt
    try:
        trainer, _, interrupted = run_training(*args)
    finally:
        training.InstructCellTrainer.__init__ = original
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert interrupted and trainer.state.global_step == 3
    assert (tmp_path / "run" / "checkpoint-3").is_dir()
    resumed, _, interrupted = run_training(*args)
    assert not interrupted and resumed.state.global_step == 6
    steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    assert steps == sorted(set(steps)) and steps[:3] == [1, 2, 3] and steps[-1] == 6
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_predict_with_generate_returns_ids(dataset_dir, tmp_path):
    trainer, _, _ = run_training(
        *_args(
            dataset_dir,
            tmp_path / "run",
            predict_with_generate=True,
            generation_max_length=8,
            eval_strategy="no",
            load_best_model_at_end=False,
        )
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
    final = output / "final"
    assert json.loads((final / "config.json").read_text())["auto_map"]["AutoModel"].endswith(
        "InstructCellForConditionalGeneration"
    )
    model = AutoModel.from_pretrained(final)
    assert model.config.n_genes == len(GENES)
    assert not overridden.exists()


def test_cell_decoder_stage_trains_only_the_vae_and_resumes(dataset_dir, tmp_path):
    import torch

    args = _args(
        dataset_dir,
        tmp_path / "run",
        eval_strategy="no",
        load_best_model_at_end=False,
        cell_decoder_steps=3,
        cell_decoder_batch_size=4,
    )
    from instructcell.training import cell_decoder as cell_decoder_fitting

    snapshots = {}
    original = cell_decoder_fitting.fit_cell_decoder

    def spy(model, *a, **kw):
        snapshots["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        return original(model, *a, **kw)

    from instructcell.training import run as training

    training.fit_cell_decoder = spy
    try:
        trainer, _, interrupted = run_training(*args)
    finally:
        training.fit_cell_decoder = original
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert not interrupted
    after = trainer.model.state_dict()
    changed = {k for k, v in snapshots["before"].items() if not torch.equal(v, after[k])}
    assert changed and all(k.startswith("cell_vae.") for k in changed)
    stage = tmp_path / "run" / "cell-decoder"
    assert (stage / "checkpoint-3").is_dir()
    # a rerun resumes the finished stage instead of training it again
    again = cell_decoder_fitting.fit_cell_decoder(
        trainer.model,
        trainer.processing_class,
        datasets.load_dataset("parquet", data_files=str(dataset_dir / "train.parquet"))["train"],
        args[2],
        steps=3,
        batch_size=4,
    )
    assert again.state.global_step == 3
    assert torch.equal(trainer.model.state_dict()["cell_vae.px_r"], after["cell_vae.px_r"])


def test_signal_states_need_one_signal_per_generation_row(dataset_dir, tmp_path):
    from instructcell.training.cell_decoder import conditioned_cells

    trainer, processor, _ = run_training(
        *_args(
            dataset_dir,
            tmp_path / "run",
            max_steps=1,
            eval_strategy="no",
            load_best_model_at_end=False,
            save_strategy="no",
        )
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)
    train = datasets.load_dataset("parquet", data_files=str(dataset_dir / "train.parquet"))["train"]
    rows = conditioned_cells(trainer.model, processor, train)
    assert len(rows) == 8 and len(rows[0]["condition_states"]) == trainer.model.config.text_config.d_model
    broken = train.map(lambda row: {"response": "T cell" if row["task"] == "cpcg" else row["response"]})
    with pytest.raises(ValueError, match="<SIGNAL> tokens but 8 target cells"):
        conditioned_cells(trainer.model, processor, broken)


def test_wall_clock_budget_survives_a_resume():
    from instructcell.training.trainer import WallClockLimitCallback

    callback = WallClockLimitCallback(minutes=1.0, elapsed_before=50.0)
    state = callback.state()
    assert state["args"] == {"minutes": 1.0} and state["attributes"]["elapsed_before"] >= 50.0
    restored = WallClockLimitCallback(**state["args"])
    restored.elapsed_before = 61.0  # as the Trainer restores it from the checkpoint
    control = restored.on_step_end(
        None, None, type("Control", (), {"should_training_stop": False, "should_save": False})()
    )
    assert control.should_training_stop and control.should_save


def test_lr_anneals_over_the_wall_clock_budget(dataset_dir, tmp_path):
    from instructcell.training.trainer import WallClockLimitCallback

    budget = dict(
        max_train_minutes=60.0,
        anneal_to_time_limit=True,
        lr_scheduler_type="cosine",
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        disable_tqdm=False,
    )
    trainer, _, _ = run_training(*_args(dataset_dir, tmp_path / "run", **budget))
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert trainer.state.global_step == 4 and min(rates) > 0.99 * 3e-3  # seconds into an hour: full lr
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
    trainer, _, _ = run_training(
        *_args(dataset_dir, tmp_path / "run", cell_modules_learning_rate=1e-4, **short)
    )
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
        run_training(*_args(dataset_dir, tmp_path / "run", **short, **overrides))


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
