"""Training throughput in one and in several processes at the same global batch (data-parallel, CPU).

    python benchmarks/training_scaling.py --dataset-dir outputs/scaling-data --runs 1x1,2x1,1x2 \
        --output benchmarks/results/training_scaling

Each run (``PxT``: P processes of T torch threads) trains the preset's model for ``--warmup-steps +
--steps`` optimizer steps of ``--global-batch`` rows (``--global-batch / P`` per process) from the same seed:
one process as a plain process, several through ``accelerate launch --config_file
configuration/accelerate/multi_cpu.yaml --num_processes P --num_cpu_threads_per_process T`` with
``--use_cpu true`` (gloo). Examples/s are measured
over the steps after the warm-up, by process 0's clock. Each process's CPU share (CPU time / wall time over
the same steps) and the load average before and after each run are recorded with the machine's core count:
on a shared machine, a run that gets fewer cores than it asks for cannot speed up, and the table says how much
each got. ``1x1`` against ``2x1`` is the data-parallel speed-up at equal threads per process; ``1x2`` is one
process given the same cores as threads. The loss at the last step is a check that the runs train comparable
models; it is not equal between process counts with the default recipe, whose cell-label alignment loss
contrasts each cell with the labels of its own process's rows and whose VAE draws other samples (without
both, tests/test_distributed_training.py shows equal losses).

Prints a markdown table and writes ``<output>.md``, ``<output>.json`` and ``<output>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MULTI_CPU = ROOT / "configuration" / "accelerate" / "multi_cpu.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--worker`` is the run inside each launched process)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=ROOT / "outputs" / "instructcell-data")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tasks", default="cta,dsp,cpcg")
    parser.add_argument(
        "--runs", default="1x1,2x1,1x2", help="Comma-separated PxT: P processes of T threads each, in order."
    )
    parser.add_argument(
        "--global-batch", type=int, default=32, help="Rows per optimizer step, all processes."
    )
    parser.add_argument("--steps", type=int, default=30, help="Timed optimizer steps.")
    parser.add_argument("--warmup-steps", type=int, default=3, help="Untimed steps before them.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "training_scaling")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a run's folder: train and record
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # the worker's threads
    args = parser.parse_args(argv)
    try:
        args.runs = [tuple(int(n) for n in run.split("x")) for run in args.runs.split(",")]
    except ValueError:
        parser.error(f"--runs takes PxT items such as 2x1, got {args.runs!r}.")
    if any(len(run) != 2 or min(run) < 1 for run in args.runs) or args.steps < 2 or args.warmup_steps < 1:
        parser.error("--runs items are PxT with P, T >= 1; --steps >= 2 and --warmup-steps >= 1.")
    bad = sorted({processes for processes, _ in args.runs if args.global_batch % processes})
    if bad:
        parser.error(f"--global-batch {args.global_batch} is not a multiple of the process counts {bad}.")
    return args


def worker(args: argparse.Namespace) -> None:
    """Train in this process (one of a launch); write its step times and CPU times to ``--worker``."""
    import torch

    from instructcell.training import parse_training_arguments, run_training
    from instructcell.training.diagnostics import StepTimer
    from instructcell.training.processes import launched_processes

    torch.set_num_threads(args.threads)
    processes = launched_processes() or 1
    overrides = {
        "preset": args.preset,
        "tasks": args.tasks,
        "dataset_dir": str(args.dataset_dir),
        "output_dir": str(args.worker / "run"),
        "per_device_train_batch_size": args.global_batch // processes,
        "max_steps": args.warmup_steps + args.steps,
        "max_train_minutes": 0,  # no cap: every run trains all its steps
        "cell_decoder_steps": 0,
        "eval_strategy": "no",
        "save_strategy": "no",
        "logging_steps": args.warmup_steps + args.steps,
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": args.seed,
    }
    model_args, data_args, training_args, _ = parse_training_arguments("default", overrides)
    timer = StepTimer()
    trainer, _, _ = run_training(model_args, data_args, training_args, callbacks=[timer])
    first = args.warmup_steps - 1  # the timed window starts at the end of the last warm-up step
    record = {
        "rank": training_args.process_index,
        "world_size": training_args.world_size,
        "threads": torch.get_num_threads(),
        "wall_seconds": timer.step_ends[-1] - timer.step_ends[first],
        "cpu_seconds": timer.cpu_ends[-1] - timer.cpu_ends[first],
        "loss": next(e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e),
        "n_parameters": sum(p.numel() for p in trainer.model.parameters()),
    }
    (args.worker / f"rank-{training_args.process_index}.json").write_text(json.dumps(record))


def launch(args: argparse.Namespace, processes: int, threads: int, folder: Path) -> list[dict]:
    """Run the worker in ``processes`` processes of ``threads`` threads; return their records (rank order)."""
    script = [
        str(Path(__file__).resolve()),
        "--dataset-dir", str(args.dataset_dir), "--preset", args.preset, "--tasks", args.tasks,
        "--global-batch", str(args.global_batch), "--steps", str(args.steps),
        "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed), "--worker", str(folder),
        "--threads", str(threads),
    ]  # fmt: skip
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_CPU),
            "--num_processes", str(processes), "--num_cpu_threads_per_process", str(threads), *script,
        ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"error: the run of {processes} processes failed:\n{result.stderr[-3000:]}")
    return [json.loads((folder / f"rank-{rank}.json").read_text()) for rank in range(processes)]


def measure(args: argparse.Namespace) -> list[dict]:
    """One row per run, with the load average around it; speed-up against the first run."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="instructcell-scaling-") as tmp:
        for index, (processes, threads) in enumerate(args.runs):
            load_before = os.getloadavg()
            records = launch(args, processes, threads, Path(tmp) / f"run{index}-{processes}x{threads}")
            load_after = os.getloadavg()
            main = records[0]
            rows.append(
                {
                    "processes": processes,
                    "threads_per_process": [r["threads"] for r in records],
                    "examples_per_second": round(args.global_batch * args.steps / main["wall_seconds"], 2),
                    "seconds_per_step": round(main["wall_seconds"] / args.steps, 3),
                    "cpu_share_per_process": [
                        round(r["cpu_seconds"] / r["wall_seconds"], 2) for r in records
                    ],
                    "loss_at_last_step": round(main["loss"], 4),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in load_after],
                    "n_parameters": main["n_parameters"],
                }
            )
    baseline = rows[0]["examples_per_second"]
    for row in rows:
        row["speed_up"] = round(row["examples_per_second"] / baseline, 2)
        row["cores_used"] = round(sum(row["cpu_share_per_process"]), 2)
        row["examples_per_core_second"] = round(row["examples_per_second"] / row["cores_used"], 1)
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    """Markdown table of the runs and the conditions they ran in."""
    lines = [
        f"Training throughput of the `{args.preset}` preset ({rows[0]['n_parameters'] / 1e6:.1f} M "
        f"parameters) on {args.tasks} rows of `{args.dataset_dir.name}`, global batch {args.global_batch}, "
        f"{args.steps} timed steps after {args.warmup_steps} warm-up steps, on a machine with "
        f"{os.cpu_count()} cores (the load averages show what else ran). CPU share: CPU time / wall time "
        "of each process over the timed steps (1.0 = one full core); cores used: their sum; examples per "
        "core-second: examples/s over cores used (what the run made of the CPU it got); load: the 1-minute "
        "load average before and after the run.",
        "",
        "| processes | threads each | examples/s | s/step | speed-up | CPU share per process | cores used "
        "| examples per core-second | load before / after | loss at last step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['processes']} | {', '.join(map(str, row['threads_per_process']))} "
            f"| {row['examples_per_second']} | {row['seconds_per_step']} | {row['speed_up']} "
            f"| {', '.join(map(str, row['cpu_share_per_process']))} | {row['cores_used']} "
            f"| {row['examples_per_core_second']} "
            f"| {row['load_average_before'][0]} / {row['load_average_after'][0]} "
            f"| {row['loss_at_last_step']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Examples/s of each run (processes x threads), each bar labelled with the cores the processes used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 3.4))
    names = [f"{row['processes']}x{row['threads_per_process'][0]}" for row in rows]
    bars = axis.bar(range(len(rows)), [row["examples_per_second"] for row in rows], color="tab:blue")
    for bar, row in zip(bars, rows, strict=True):
        axis.annotate(
            f"{row['cores_used']} cores", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center", va="bottom", fontsize=8,
        )  # fmt: skip
    axis.set_xticks(range(len(rows)), names)  # in run order; a repeated run keeps its own bar
    axis.set(xlabel="processes x threads (same global batch), in run order", ylabel="examples/s")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table and write the results."""
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return
    if not (args.dataset_dir / "train.parquet").is_file():
        raise SystemExit(
            f"error: no {args.dataset_dir}/train.parquet; build one with `instructcell build-data` "
            "(examples/build_dataset.py) and pass it as --dataset-dir."
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = measure(args)
    text = table(rows, args)
    print(text)
    command = "python benchmarks/training_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.output.with_suffix(".md").write_text(f"{text}\nMeasured {started} with `{command}`.\n")
    settings = {key: str(value) for key, value in vars(args).items() if key not in ("worker", "threads")}
    results = {"settings": settings, "cores": os.cpu_count(), "started": started, "runs": rows}
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(rows, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
