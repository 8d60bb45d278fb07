"""Transfer: fine-tuning a model trained on other datasets against training from scratch, with few labels.

    python benchmarks/transfer.py --shared-datasets ../shared/datasets --output benchmarks/results/transfer

For each left-out CTA dataset (default: all three shared ones):

1. build the other shared datasets (CTA, DSP, CPCG; ``instructcell build-data``) and train the ``small``
   preset on all their tasks with the ``default`` recipe for ``--pretrain-steps`` steps (no cell-decoder
   stage: generation is not scored here);
2. build the left-out dataset with that model's gene vocabulary (``build-data --gene-vocab-from``);
3. for each fraction of its training cells (``--fractions``; drawn per label, seeded, at least one cell per
   label; the same cells for every method): fine-tune the pretrained model (``train --init_from``), train the
   same recipe from scratch (its own tokenizer, the same genes), both ``--finetune-steps`` steps on CTA, and
   fit a logistic regression; all three score the left-out dataset's validation and test splits.

Settings are chosen on the validation split, never on test; the left-out dataset with the largest validation
gain of fine-tuning over the better baseline (mean over the fractions below 100 %) is named as the headline.
Prints the tables and writes ``<output>.md``, ``<output>.json`` and ``<output>.png``. Everything is kept in
``--work-dir``: a rerun reuses finished builds, models and scores and resumes an interrupted training run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from datasets_builder.build import build_dataset_folder
from datasets_builder.dataset_folder import dataset_genes, load_split
from datasets_builder.gene_vocab import GENE_VOCAB_FILENAME
from datasets_builder.sources import shared_sources
from instructcell.evaluation.baselines import ClassificationCells, logistic_regression_predictions
from instructcell.evaluation.candidates import model_predictions
from instructcell.evaluation.classification_evaluator import classification_scores
from instructcell.hub import save_for_hub
from instructcell.training import DEFAULT_RECIPE, parse_training_arguments, run_training, training_budget
from modeling_instructcell import InstructCellForConditionalGeneration, InstructCellProcessor

CTA_DATASETS = ("bastidas_ponce_2019_pancreas", "zheng2017_sorted_pbmc", "kang2018_pbmc_ifnb_muscat")
METHODS = ("fine-tuned", "from scratch", "logistic regression")
EVAL_SPLITS = ("validation", "test")
# what every training run shares: one variant, no validation passes, checkpoints to resume from
RUN_SETTINGS = {
    "variant": "instruct",
    "cell_decoder_steps": 0,
    "eval_strategy": "no",
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 1,
    "disable_tqdm": True,
    "report_to": "none",
}


class StageClock:
    """Wall time, process CPU time and the CPU share of each stage (the cores are shared with other jobs)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.stages: list[dict[str, Any]] = []

    @contextmanager
    def stage(self, name: str):
        """Time one stage; print and keep its line."""
        load, wall, cpu = os.getloadavg()[0], time.monotonic(), time.process_time()
        yield
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        entry = {
            "stage": name,
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "cpu_share": round(cpu / max(wall, 1e-9) / self.threads, 2),
            "load_1min_before": round(load, 2),
        }
        self.stages.append(entry)
        print(
            f"[{name}] {wall:.0f} s wall, {cpu:.0f} s CPU: {entry['cpu_share']:.0%} of {self.threads} "
            f"thread(s); load average before {load:.2f}",
            flush=True,
        )


def labelled_subset(rows: datasets.Dataset, fraction: float, seed: int) -> datasets.Dataset:
    """Draw a seeded ``fraction`` of the rows per label, at least one row per label.

    Parameters
    ----------
    rows : datasets.Dataset
        Training rows of one dataset (``label`` column).
    fraction : float
        In ``(0, 1]``.
    seed : int

    Returns
    -------
    datasets.Dataset
        The chosen rows, in their original order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"A fraction of the training labels must be in (0, 1], got {fraction}.")
    rng = np.random.default_rng(seed)
    labels = np.asarray(rows["label"])
    keep = []
    for label in sorted(set(labels)):
        members = np.flatnonzero(labels == label)
        n = max(1, int(round(fraction * members.size)))
        keep.extend(rng.choice(members, size=n, replace=False).tolist())
    return rows.select(sorted(keep))


def write_subset(full: Path, fraction: float, seed: int, folder: Path) -> int:
    """Write a folder whose training split is :func:`labelled_subset` of ``full``'s; return its size."""
    if not (folder / "train.parquet").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        labelled_subset(load_split(full, "train"), fraction, seed).to_parquet(str(tmp / "train.parquet"))
        for name in ("validation.parquet", "test.parquet", GENE_VOCAB_FILENAME):
            shutil.copy(full / name, tmp / name)
        os.replace(tmp, folder)
    return len(load_split(folder, "train"))


def train(data: Path, output: Path, tasks: str, steps: int, seed: int, init_from: Path | None) -> Path:
    """Train with the default recipe (or reuse ``output/final``); return the saved model folder."""
    final = output / "final"
    if (final / "model.safetensors").is_file():
        return final
    overrides = {
        **RUN_SETTINGS,
        "preset": "small",
        "tasks": tasks,
        "dataset_dir": str(data),
        "output_dir": str(output),
        "max_steps": steps,
        "seed": seed,
    }
    if init_from is not None:
        overrides["init_from"] = str(init_from)
    model_args, data_args, training_args, _ = parse_training_arguments(DEFAULT_RECIPE, overrides)
    trainer, processor, interrupted = run_training(model_args, data_args, training_args)
    if interrupted:
        raise SystemExit(f"Interrupted: rerun the same command to resume {output}.")
    budget = training_budget(trainer)
    if budget["stopped_by_time_cap"]:
        raise SystemExit(
            f"{output} stopped at the wall-clock cap at step {budget['steps']}: rerun to finish."
        )
    save_for_hub(trainer.model, processor, final)
    for checkpoint in output.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    return final


def model_scores(model_dir: Path, data: Path, dataset: str) -> dict[str, dict[str, float]]:
    """Macro-F1 and accuracy of a saved model on the validation and test CTA rows (most likely label)."""
    model = InstructCellForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = InstructCellProcessor.from_pretrained(model_dir)
    scores = {}
    for split in EVAL_SPLITS:
        rows = load_split(data, split, tasks=["cta"], variant="instruct", datasets_names=[dataset])
        scores[split] = classification_scores(model_predictions(model, processor, rows), rows)
    return scores


def logistic_regression_scores(data: Path, dataset: str, seed: int) -> dict[str, dict[str, float]]:
    """Logistic regression fitted on the folder's training rows, scored like the models."""
    train_rows = load_split(data, "train", tasks=["cta"], variant="instruct", datasets_names=[dataset])
    genes = dataset_genes(data)
    scores = {}
    for split in EVAL_SPLITS:
        rows = load_split(data, split, tasks=["cta"], variant="instruct", datasets_names=[dataset])
        cells = ClassificationCells.from_rows(train_rows, rows, genes)
        predictions = logistic_regression_predictions(
            cells.train_counts, cells.train_labels, cells.test_counts, seed=seed
        )
        scores[split] = classification_scores(predictions, rows)
    return scores


def cached(path: Path, compute) -> Any:
    """Read the JSON at ``path``, or write ``compute()`` there first."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
    return value


def run_left_out(left_out: str, args, clock: StageClock) -> dict[str, Any]:
    """Pretrain without ``left_out``, then compare the three methods at every fraction of its labels."""
    work = Path(args.work_dir) / left_out
    pretrain_data, leftout_data = work / "pretrain-data", work / "data"
    others = [name for name in (*CTA_DATASETS, "pc9_erlotinib_day11_dsp") if name != left_out]
    with clock.stage(f"{left_out}: build the other datasets"):
        if not pretrain_data.is_dir():
            sources = shared_sources(args.shared_datasets, others)
            build_dataset_folder(pretrain_data, sources, variants=["instruct"], progress=False)
    with clock.stage(f"{left_out}: pretrain {args.pretrain_steps} steps"):
        pretrained = train(
            pretrain_data, work / "pretrain", "cta,dsp,cpcg", args.pretrain_steps, args.seed, None
        )
    with clock.stage(f"{left_out}: build it with the pretrained vocabulary"):
        if not leftout_data.is_dir():
            source = replace(shared_sources(args.shared_datasets, [left_out])[0], tasks=("cta",))
            build_dataset_folder(
                leftout_data, [source], gene_vocab_from=pretrained, variants=["instruct"], progress=False
            )
    rows = []
    for fraction in args.fractions:
        tag = f"{fraction:g}"
        subset = work / f"labels-{tag}"
        n_cells = write_subset(leftout_data, fraction, args.seed, subset)
        scores = {}
        for method, init in (("fine-tuned", pretrained), ("from scratch", None)):
            name = "finetune" if init is not None else "scratch"
            with clock.stage(f"{left_out}: {fraction:.0%} of the labels ({n_cells} cells), {method}"):
                model = train(subset, work / f"{name}-{tag}", "cta", args.finetune_steps, args.seed, init)
                scores[method] = cached(
                    work / f"{name}-{tag}.json", lambda m=model, d=subset: model_scores(m, d, left_out)
                )
        scores["logistic regression"] = cached(
            work / f"logreg-{tag}.json", lambda d=subset: logistic_regression_scores(d, left_out, args.seed)
        )
        rows.append({"fraction": fraction, "n_labelled_cells": n_cells, "scores": scores})
        line = ", ".join(f"{m} {scores[m]['test']['macro_f1']:.3f}" for m in METHODS)
        print(f"{left_out}, {fraction:.0%} of the labels: test macro-F1 {line}", flush=True)
    return {"left_out": left_out, "pretrain_datasets": others, "rows": rows}


def validation_gain(result: dict[str, Any]) -> float:
    """Mean validation macro-F1 of fine-tuning minus the better baseline, over fractions below 1."""
    gains = [
        row["scores"]["fine-tuned"]["validation"]["macro_f1"]
        - max(row["scores"][m]["validation"]["macro_f1"] for m in METHODS[1:])
        for row in result["rows"]
        if row["fraction"] < 1
    ]
    return float(np.mean(gains)) if gains else float("nan")


def markdown(results: list[dict[str, Any]], split: str) -> str:
    """One table: a row per left-out dataset and fraction, a column per method (the best in bold)."""
    lines = [
        f"| left-out dataset ({split} macro-F1) | labels | labelled cells | " + " | ".join(METHODS) + " |",
        "|---|---:|---:|" + "---:|" * len(METHODS),
    ]
    for result in results:
        for row in result["rows"]:
            values = [row["scores"][m][split]["macro_f1"] for m in METHODS]
            cells = [f"**{v:.3f}**" if v == max(values) else f"{v:.3f}" for v in values]
            lines.append(
                f"| {result['left_out']} | {row['fraction']:.0%} | {row['n_labelled_cells']} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Test macro-F1 against the fraction of labels, one panel per left-out dataset (validation dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.8), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        fractions = [row["fraction"] for row in result["rows"]]
        for method, color in zip(METHODS, ("C0", "C1", "grey"), strict=True):
            for split, style in (("test", "-"), ("validation", ":")):
                values = [row["scores"][method][split]["macro_f1"] for row in result["rows"]]
                label = method if split == "test" else None
                axis.plot(
                    fractions,
                    values,
                    style,
                    marker="o" if split == "test" else None,
                    color=color,
                    label=label,
                )
        axis.set(
            xscale="log",
            title=f"{result['left_out']} left out",
            xlabel="fraction of its training labels",
            ylabel="macro-F1 (test; validation dotted)",
            ylim=(0, 1),
        )
        axis.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    """Run every left-out dataset and write the tables and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared-datasets", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--left-out", default=",".join(CTA_DATASETS), help="comma-separated CTA datasets")
    parser.add_argument("--fractions", default="1,0.2,0.05", help="fractions of the training labels")
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--finetune-steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--work-dir", default="outputs/transfer")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/transfer"))
    args = parser.parse_args()
    args.fractions = sorted((float(f) for f in args.fractions.split(",")), reverse=True)
    left_out = [name.strip() for name in args.left_out.split(",") if name.strip()]
    unknown = sorted(set(left_out) - set(CTA_DATASETS))
    if unknown:
        parser.error(f"unknown left-out datasets {unknown}; choose among {list(CTA_DATASETS)}")
    args.output.parent.mkdir(parents=True, exist_ok=True)  # the destination is checked before any training
    torch.set_num_threads(args.threads)
    clock = StageClock(args.threads)
    start = time.monotonic()
    print(
        f"torch threads {args.threads}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
        flush=True,
    )
    results = [run_left_out(name, args, clock) for name in left_out]
    for result in results:
        result["validation_gain"] = validation_gain(result)
    headline = max(results, key=lambda r: r["validation_gain"])["left_out"]
    tables = {split: markdown(results, split) for split in ("test", "validation")}
    command = (
        f"python benchmarks/transfer.py --left-out {','.join(left_out)} --fractions "
        f"{','.join(f'{f:g}' for f in args.fractions)} --pretrain-steps {args.pretrain_steps} "
        f"--finetune-steps {args.finetune_steps} --seed {args.seed} --threads {args.threads}"
    )
    minutes = (time.monotonic() - start) / 60
    summary = (
        f"{tables['test']}\n\n{tables['validation']}\n\n"
        "Headline (largest validation gain of fine-tuning over the better baseline below 100 % of the "
        f"labels): {headline}.\n\n`{command}`: {minutes:.0f} minutes with {args.threads} torch thread(s); "
        "CPU share per stage in the JSON (`stages`)."
    )
    print("\n" + summary)
    args.output.with_suffix(".md").write_text(summary + "\n")
    args.output.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": command,
                "headline": headline,
                "minutes": round(minutes, 1),
                "results": results,
                "stages": clock.stages,
            },
            indent=2,
        )
    )
    plot(results, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
