"""End-to-end InstructCell on real data, on CPU, in about 15 minutes (`make demo`).

    python examples/demo.py --output-dir outputs/demo
    python examples/demo.py --output-dir outputs/demo --max-steps 20   # a quick smoke run

1. Builds the instruct-variant multi-task dataset with ``examples/build_dataset.py``: from
   ``../shared/datasets`` (CTA, DSP, CPCG) when present, otherwise from scanpy's bundled ``pbmc68k_reduced``
   (counts recovered from its log-normalized ``.raw``; CTA + CPCG only). An existing build is reused.
2. Trains the ``small`` preset on all tasks mixed with the ``demo`` recipe (``configuration/recipes/demo.yaml``,
   ``instructcell train``'s code), a fixed number of optimizer steps, and saves it in the Hub layout to
   ``<output-dir>/model``. A finished model is reused unless ``--retrain``.
3. Reloads the saved model and answers natural-language requests on the test split: annotate held-out
   cells (CTA), predict the drug response (DSP) and generate cells of a requested type (CPCG), next to a
   logistic regression fitted in the same run on the same split (CTA/DSP) and real training cells (CPCG).
4. Writes ``report.md``, ``metrics.json`` and ``figures/*.png`` into ``<output-dir>`` (atomically).

Rerunning reuses ``<output-dir>/data`` (same build settings) and ``<output-dir>/model``; ``--retrain`` trains
again. An interrupted training (Ctrl-C) resumes from ``<output-dir>/checkpoints``. ``--max-steps 20``
gives a smoke run in a few minutes (numbers then mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import scipy.sparse as sp
import torch

from datasets_builder.collator import DataCollatorForInstructCell
from instructcell.evaluation import predictions as evaluation
from instructcell.evaluation.predictions import cap_rows, select_rows
from instructcell.evaluation.report import Request, write_demo_report
from instructcell.hub import save_for_hub
from instructcell.training import parse_training_arguments, run_training, training_budget
from modeling_instructcell import InstructCellForConditionalGeneration, InstructCellProcessor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = "demo"
SHARED_DATASETS = (
    "bastidas_ponce_2019_pancreas",
    "zheng2017_sorted_pbmc",
    "kang2018_pbmc_ifnb_muscat",
    "pc9_erlotinib_day11_dsp",
)
FALLBACK_NAME = "pbmc68k_reduced_counts"
DEMO_DEFAULTS = {
    "n_top_genes": 3600,
    "max_test_cells": 500,
    "max_generated_per_label": 200,
    "generated_per_request": 1,
}
logger = logging.getLogger("demo")


# ----------------------------------------------------------------------------------------------- data
def write_pbmc68k_counts(path: Path) -> Path:
    """Write scanpy's bundled ``pbmc68k_reduced`` as raw counts with the builder's obs columns.

    Its ``.raw`` holds ``log1p(normalize_total(target_sum=1e4))`` of 765 genes and ``obs["n_counts"]`` the
    per-cell totals, so ``round(expm1(raw.X) * n_counts / 1e4)`` recovers the integer counts (max deviation
    from an integer 0.08). Labels: ``bulk_labels``.
    """
    import anndata
    import pandas as pd
    import scanpy as sc

    bundled = sc.datasets.pbmc68k_reduced()
    raw = sp.csr_matrix(bundled.raw.X, dtype=np.float64)
    totals = bundled.obs["n_counts"].to_numpy(dtype=np.float64)
    counts = sp.diags(totals / 1e4) @ raw.expm1()
    counts = sp.csr_matrix(counts)
    counts.data = np.rint(counts.data)
    counts.eliminate_zeros()
    obs = pd.DataFrame(
        {
            "cell_type": bundled.obs["bulk_labels"].astype(str).to_numpy(),
            "species": "human",
            "tissue": "peripheral blood (PBMC)",
            "sequencing_method": "10x Genomics GemCode (droplet-based)",
        },
        index=bundled.obs_names.astype(str),
    )
    adata = anndata.AnnData(
        X=counts.astype(np.int32), obs=obs, var=pd.DataFrame(index=bundled.raw.var_names.astype(str))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp, compression="gzip")
    os.replace(tmp, path)
    return path


def data_source(data_dir: Path, out: Path) -> tuple[Path, str | None, str]:
    """Return ``(data_dir, --datasets value, description)``: the shared data, else the pbmc68k fallback."""
    if all((data_dir / name / f"{name}.h5ad").is_file() for name in SHARED_DATASETS):
        return data_dir, None, f"{', '.join(SHARED_DATASETS)} from {data_dir}"
    logger.warning(
        "No shared datasets at %s: falling back to scanpy's bundled pbmc68k_reduced (CTA + CPCG only).",
        data_dir,
    )
    fallback_dir = out / "source"
    path = fallback_dir / FALLBACK_NAME / f"{FALLBACK_NAME}.h5ad"
    if not path.is_file():
        write_pbmc68k_counts(path)
    return fallback_dir, FALLBACK_NAME, "scanpy's bundled pbmc68k_reduced (counts recovered from .raw)"


def build_data(data_dir: Path, datasets_arg: str | None, n_top_genes: int, output: Path) -> bool:
    """Build the instruct-variant Parquet dataset into ``output`` unless an identical build is there.

    Returns True when it was (re)built.
    """
    wanted = {"n_top_genes": n_top_genes, "orthologs": "", "data_dir": str(data_dir.resolve())}
    if datasets_arg:
        wanted["datasets"] = sorted(datasets_arg.split(","))
    info = output / "dataset_info.json"
    if info.is_file() and (output / "train.parquet").is_file():
        if json.loads(info.read_text()).get("settings") == wanted:
            logger.info("Reusing the dataset in %s", output)
            return False
        logger.info("The dataset in %s was built with other settings: rebuilding it.", output)
    command = [
        sys.executable,
        str(REPO / "examples" / "build_dataset.py"),
        "--data-dir",
        str(data_dir),
        "--output",
        str(output),
        "--variant",
        "instruct",
        "--n-top-genes",
        str(n_top_genes),
        "--overwrite",
    ]
    if datasets_arg:
        command += ["--datasets", datasets_arg]
    logger.info("Building the dataset: %s", " ".join(command))
    subprocess.run(command, check=True)
    return True


# ------------------------------------------------------------------------------------------- training
def demo_settings(recipe: str) -> dict[str, Any]:
    """The recipe's ``demo:`` settings over :data:`DEMO_DEFAULTS` (unknown keys are an error)."""
    _, _, _, sections = parse_training_arguments(recipe)
    settings = {**DEMO_DEFAULTS, **sections.get("demo", {})}
    unknown = set(settings) - set(DEMO_DEFAULTS)
    if unknown:
        raise ValueError(
            f"Unknown demo settings {sorted(unknown)} in {recipe}; known: {sorted(DEMO_DEFAULTS)}."
        )
    return settings


def model_is_complete(model_dir: Path) -> bool:
    """Return True when ``model_dir`` holds a saved model and processor."""
    return (
        (model_dir / "config.json").is_file()
        and (model_dir / "model.safetensors").is_file()
        and (model_dir / "processor_config.json").is_file()
    )


def train(recipe: str, data: Path, out: Path, max_steps: int | None) -> dict[str, Any]:
    """Train with ``run_training`` (resuming ``out/checkpoints``), save to ``out/model``, return a summary."""
    overrides: dict[str, Any] = {
        "report_to": "none",
        "dataset_dir": str(data),
        "output_dir": str(out / "checkpoints"),
    }
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    model_args, data_args, training_args, _ = parse_training_arguments(recipe, overrides)
    logger.info("Training %d steps with the %s recipe", training_args.max_steps, recipe)
    start = time.time()
    trainer, processor, interrupted = run_training(model_args, data_args, training_args)
    seconds = time.time() - start
    if interrupted:
        raise SystemExit(f"Interrupted: rerun the same command to resume from {training_args.output_dir}.")
    model = trainer.model.merge_and_unload() if model_args.use_lora else trainer.model
    model.eval()
    budget = training_budget(trainer)
    if budget["stopped_by_time_cap"]:
        raise SystemExit(
            f"Training stopped at the wall-clock cap after {budget['steps']} of {budget['planned_steps']} "
            "steps: rerun the same command to train the rest."
        )
    losses = [log for log in trainer.state.log_history if "loss" in log]
    summary = {
        **budget,
        "epochs": round(float(trainer.state.epoch or 0), 3),
        "train_seconds": round(seconds, 1),
        "last_log": losses[-1] if losses else None,
    }
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hub(model, processor, tmp)
    shutil.rmtree(out / "model", ignore_errors=True)
    os.replace(tmp, out / "model")
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    del trainer, model
    gc.collect()
    return summary


# ----------------------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def greedy_answer(model, processor, row: dict[str, Any], max_new_tokens: int = 32) -> str:
    """Return the model's raw greedy answer to one row's instruction."""
    batch = DataCollatorForInstructCell(processor)([row])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "cell_values") if k in batch}
    sequences = model.generate(**inputs, max_new_tokens=max_new_tokens)
    answer = processor.post_process_generation(sequences, skip_special_tokens=False)[0]["text"]
    for token in (processor.tokenizer.pad_token, processor.tokenizer.eos_token):
        answer = answer.replace(token or "\0", "")
    return answer.strip()


def evaluate_classification(model, processor, train, test, task, dataset, settings, seed):
    """Label scoring, greedy answers and the logistic regression on one CTA/DSP dataset's test cells."""
    rows = cap_rows(select_rows(test, task, dataset), settings["max_test_cells"], seed)
    start = time.time()
    result = evaluation.evaluate_classification(
        model, processor, select_rows(train, task, dataset), rows, task, dataset, ("score", "generate"), seed
    )
    score = result.predictions["score"]
    accuracy = np.mean([p == t for p, t in zip(score, rows["label"], strict=True)])
    logreg_accuracy = np.mean([p == t for p, t in zip(result.logreg, rows["label"], strict=True)])
    logger.info(
        "%s %s: accuracy %.3f (logreg %.3f) on %d test cells, %.0f s",
        task,
        dataset,
        accuracy,
        logreg_accuracy,
        len(rows),
        time.time() - start,
    )
    row = rows[0]
    request = Request(
        "annotate held-out cells" if task == "cta" else "predict a drug response",
        dataset,
        row["instruction"],
        greedy_answer(model, processor, row),
        f"scored label: {score[0]}; truth: {row['label']}",
    )
    return result, request


def evaluate_generation(model, processor, train, test, dataset, settings, seed):
    """Generate cells for the test split's CPCG requests of one dataset; real test and training references."""
    rows = cap_rows(select_rows(test, "cpcg", dataset), settings["max_test_cells"], seed)
    start = time.time()
    result, example = evaluation.evaluate_generation(
        model,
        processor,
        select_rows(train, "cpcg", dataset),
        rows,
        dataset,
        max_generated_per_label=settings["max_generated_per_label"],
        generated_per_request=int(settings["generated_per_request"]),
        seed=seed,
    )
    logger.info(
        "cpcg %s: %d/%d requests answered with <SIGNAL>, %d cells generated, %.0f s",
        dataset,
        result.n_answered_with_signal,
        result.n_requests,
        result.generated.shape[0],
        time.time() - start,
    )
    detail = f"{example['n_cells']} cell(s) of requested type {example['label']!r}"
    if example["mean_total_counts"] is None:
        detail += " (no <SIGNAL>: no cells)"
    else:
        detail += f", total counts {example['mean_total_counts']:.0f}"
    request = Request(
        "generate cells of a requested type", dataset, example["instruction"], example["answer"], detail
    )
    return result, request


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO.parent / "shared" / "datasets",
        help="Folder with the shared datasets; scanpy's pbmc68k_reduced is used when they are missing.",
    )
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "demo")
    parser.add_argument(
        "--recipe", default=DEFAULT_RECIPE, help="Training recipe with a demo: section (name or YAML path)."
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="Override the recipe's optimizer steps (smoke runs)."
    )
    parser.add_argument(
        "--retrain", action="store_true", help="Train again even if <output-dir>/model exists."
    )
    parser.add_argument(
        "--max-test-cells", type=int, default=None, help="Override the recipe's max_test_cells."
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("modeling_instructcell").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    start = time.time()
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = demo_settings(args.recipe)
    if args.max_test_cells is not None:
        settings["max_test_cells"] = args.max_test_cells
    seed = 0
    timings, notes = {}, []

    data_dir, datasets_arg, source = data_source(args.data_dir, out)
    data = out / "data"
    rebuilt = build_data(data_dir, datasets_arg, int(settings["n_top_genes"]), data)
    timings["data"] = round(time.time() - start, 1)

    model_dir = out / "model"
    if args.retrain or rebuilt or not model_is_complete(model_dir):
        for stale in (out / "checkpoints", model_dir, out / "training.json"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        training = train(args.recipe, data, out, args.max_steps)
        training["reused"] = False
    else:
        logger.info("Reusing the trained model in %s (pass --retrain to train again).", model_dir)
        if args.max_steps is not None:
            logger.warning("--max-steps is ignored: the model is reused (add --retrain to train again).")
        training = (
            json.loads((out / "training.json").read_text()) if (out / "training.json").is_file() else {}
        )
        training["reused"] = True
        notes.append(
            f"the trained model was reused from an earlier run ({model_dir}): its training time is not "
            "in this run's wall time; pass --retrain to train again."
        )
    timings["train"] = round(time.time() - start - timings["data"], 1)

    model = InstructCellForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = InstructCellProcessor.from_pretrained(model_dir)
    torch.manual_seed(seed)
    splits = datasets.load_dataset(
        "parquet", data_files={s: str(data / f"{s}.parquet") for s in ("train", "test")}
    )
    train_split = splits["train"].filter(lambda r: r["variant"] == "instruct")
    test = splits["test"].filter(lambda r: r["variant"] == "instruct")
    pairs = sorted(set(zip(test["task"], test["dataset"], strict=True)))
    classification, generation, requests = [], [], {}
    eval_start = time.time()
    for task, dataset in pairs:
        if task in ("cta", "dsp"):
            result, request = evaluate_classification(
                model, processor, train_split, test, task, dataset, settings, seed
            )
            classification.append(result)
        else:
            result, request = evaluate_generation(
                model, processor, train_split, test, dataset, settings, seed
            )
            generation.append(result)
        if request is not None:
            requests.setdefault(task, request)
    ordered = [requests[t] for t in ("cta", "dsp", "cpcg") if t in requests]
    timings["predict"] = round(time.time() - eval_start, 1)
    command = "python examples/demo.py " + " ".join(sys.argv[1:])
    run_info = {
        "data_source": source,
        "model_dir": str(model_dir),
        "recipe": str(args.recipe),
        "training": training,
        "settings": settings,
        "timings": timings,
        "command": command.strip(),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "notes": notes,
    }
    logger.info("Computing metrics (UMAP embeddings) and writing the report")
    metrics = write_demo_report(out, classification, generation, ordered, start_time=start, run_info=run_info)
    print((out / "report.md").read_text())
    print(
        f"Wrote {out / 'report.md'}, {out / 'metrics.json'} and {out / 'figures'} "
        f"in {metrics['wall_seconds']:.0f} s."
    )


if __name__ == "__main__":
    main()
