"""Training in two processes (gloo on the CPU), launched as a user would, against one process.

One ``accelerate launch --config_file configuration/accelerate/multi_cpu.yaml`` of
``tests/distributed_training_run.py`` runs every scenario in both processes (see that file); the tests read
what each process saw. The tiny preset, CTA + DSP rows (no cell sampling, so two processes and one give the
same numbers) except in the ``instructcell train`` scenario.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_data import write_training_dataset

from instructcell.training import DataArguments, InstructCellTrainingArguments, ModelArguments, run_training
from instructcell.training.processes import check_launch
from modeling_instructcell import InstructCellForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
MULTI_CPU = REPO / "configuration" / "accelerate" / "multi_cpu.yaml"
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return write_training_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def launched(dataset_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Run the scenarios in two processes; return the work folder and what process 0 and 1 saw."""
    work = tmp_path_factory.mktemp("two-processes")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(MULTI_CPU),
        "--num_processes",
        "2",
        str(REPO / "tests" / "distributed_training_run.py"),
        str(dataset_dir),
        str(work),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return work, [json.loads((work / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def _weights(work: Path, scenario: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(work / f"{scenario}-rank-{rank}.pt", weights_only=True)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tolerance) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tolerance, msg=name)


@pytest.mark.slow
def test_two_processes_really_run(launched):
    _, ranks = launched
    assert [seen["plain"]["rank"] for seen in ranks] == [0, 1]
    assert all(seen["plain"]["world_size"] == 2 for seen in ranks)


@pytest.mark.slow
def test_each_process_collates_a_disjoint_share_of_every_epoch(launched):
    _, ranks = launched
    first, second = (seen["plain"]["epochs"] for seen in ranks)
    assert len(first) == len(second) == 2  # 16 rows, 2 x 4 per step: 2 steps per epoch, 4 steps
    for epoch in range(2):
        rows_0, rows_1 = set(first[epoch]), set(second[epoch])
        assert len(rows_0) == len(first[epoch]) == 8 and len(rows_1) == 8
        assert not rows_0 & rows_1
        assert rows_0 | rows_1 == {f"{task}-train{i}" for task in ("cta", "dsp") for i in range(8)}


@pytest.mark.slow
def test_losses_and_weights_equal_one_process_with_the_same_global_batch(launched, dataset_dir, tmp_path):
    work, ranks = launched
    trainer, _, _ = run_training(
        ModelArguments(preset="tiny", tokenizer_vocab_size=200),
        DataArguments(dataset_dir=str(dataset_dir), tasks="cta,dsp"),
        InstructCellTrainingArguments(
            output_dir=str(tmp_path / "one"),
            max_steps=4,
            per_device_train_batch_size=8,  # = 2 processes x 4
            learning_rate=3e-3,
            save_strategy="no",
            eval_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            report_to="none",
            use_cpu=True,
        ),
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)
    one = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for seen in ranks:
        two = [seen["plain"]["losses"][str(step)] for step in range(1, 5)]
        torch.testing.assert_close(torch.tensor(two), torch.tensor(one), **TOL)
    _assert_same_weights(_weights(work, "plain", 0), _weights(work, "plain", 1), rtol=0, atol=0)
    _assert_same_weights(_weights(work, "plain", 0), trainer.model.state_dict(), **TOL)


@pytest.mark.slow
def test_an_interrupt_in_one_process_stops_both_at_the_same_step_and_resumes_there(launched):
    work, ranks = launched
    for seen in ranks:  # SIGINT reached process 1 only, before step 3
        assert seen["interrupted"]["interrupted"] and seen["interrupted"]["budget"]["steps"] == 3
        assert seen["interrupted"]["checkpoints"] == ["checkpoint-3"]
        resumed = seen["resumed"]
        assert not resumed["interrupted"] and resumed["budget"]["steps"] == 4
        assert resumed["losses"].keys() == seen["plain"]["losses"].keys()  # steps 1-3 restored, 4 trained
        torch.testing.assert_close(
            torch.tensor(list(resumed["losses"].values())),
            torch.tensor(list(seen["plain"]["losses"].values())),
            **TOL,
        )
    for rank in (0, 1):  # the same weights as the uninterrupted run
        _assert_same_weights(_weights(work, "resumed", rank), _weights(work, "plain", rank), **TOL)


@pytest.mark.slow
def test_the_wall_clock_cap_is_decided_by_process_zero(launched):
    _, ranks = launched
    for seen in ranks:
        capped = seen["wall_clock"]
        assert capped["budget"] == {"steps": 1, "planned_steps": 50, "stopped_by_time_cap": True}
        assert capped["report"].startswith("Stopped by the wall-clock cap")
        assert "at step 1 of 50 planned" in capped["report"]
        # process 1's clock had run for 1e6 s, process 0's for none: process 0 decides, nobody stops
        assert not capped["callback"]["should_training_stop"]
        assert capped["callback"]["agreed_elapsed"] < 60
    assert ranks[0]["wall_clock"]["callback"] == ranks[1]["wall_clock"]["callback"]


@pytest.mark.slow
def test_only_process_zero_writes_and_prints(launched):
    work, ranks = launched
    assert [seen["plain"]["should_save"] for seen in ranks] == [True, False]
    checkpoint = work / "interrupted" / "checkpoint-3"
    # the model, optimizer and state once; each process's random state beside them, for an exact resume
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()
    cli_0, cli_1 = (seen["cli"] for seen in ranks)
    assert cli_0["status"] == cli_1["status"] == 0
    assert cli_0["printed"].splitlines() == [
        "Trained 3 of 3 planned steps.",
        f"Saved the model (Hub layout) to {work / 'cli' / 'final'}",
    ]
    assert cli_1["printed"] == ""


@pytest.mark.slow
def test_the_cell_decoder_is_fitted_once_over_both_processes_and_saved(launched):
    work, _ = launched
    stage = work / "cli" / "cell-decoder" / "after-step-3"
    assert [p.name for p in stage.iterdir()] == ["checkpoint-2"]
    state = json.loads((stage / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 2  # 4 per step, 2 per process
    final = InstructCellForConditionalGeneration.from_pretrained(work / "cli" / "final")
    fitted = {k: v for k, v in final.state_dict().items() if k.startswith("cell_vae.")}
    stage_weights = load_file(str(stage / "checkpoint-2" / "model.safetensors"))
    _assert_same_weights(stage_weights, fitted, rtol=0, atol=0)


def _cpu_arguments(tmp_path) -> InstructCellTrainingArguments:
    return InstructCellTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")


def test_accelerate_cpu_launch_of_several_processes_is_refused(tmp_path, monkeypatch):
    # `accelerate launch --cpu --num_processes 2` starts one process with these variables and no WORLD_SIZE
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="starts a single process unless mpirun"):
        check_launch(_cpu_arguments(tmp_path))


def test_processes_that_did_not_join_one_group_are_refused(tmp_path, monkeypatch):
    arguments = _cpu_arguments(tmp_path)  # one process: no process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="add `--use_cpu true`"):
        check_launch(arguments)


def test_a_single_process_passes_the_launch_check(tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(_cpu_arguments(tmp_path))
