"""End-to-end InstructCell on real data, on CPU, in about 15 minutes (`make demo`).

    python examples/demo.py --output-dir outputs/demo
    python examples/demo.py --output-dir outputs/demo --max-steps 20   # a quick smoke run

1. Builds the instruct-variant multi-task dataset with ``examples/build_dataset.py``: from
   ``../shared/datasets`` (CTA, DSP, CPCG) when present, otherwise from scanpy's bundled ``pbmc68k_reduced``
   (counts recovered from its log-normalized ``.raw``; CTA + CPCG only). An existing build is reused.
2. Trains the ``small`` preset on all tasks mixed with the ``demo`` recipe
   (``configuration/recipes/demo.yaml``, ``instructcell train``'s code), a fixed number of optimizer steps,
   and saves it in the Hub layout to ``<output-dir>/model``. A finished model is reused unless ``--retrain``.
3. Evaluates the saved model on the test split with ``instructcell evaluate``'s code
   (:func:`instructcell.evaluation.suite.run_evaluation`): annotate held-out cells, predict drug responses
   and generate cells of requested types, next to the cheap baselines fitted in the same run on the same
   split (logistic regression; a per-label-mean generator and real training cells as the reference), with one
   request per task answered in natural language at the top of the report.
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

from instructcell.evaluation.suite import EvaluationConfig, run_evaluation
from instructcell.hub import save_for_hub
from instructcell.training import parse_training_arguments, run_training, training_budget

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
    """Read the recipe's ``demo:`` settings over :data:`DEMO_DEFAULTS` (unknown keys are an error)."""
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
def evaluation_config(
    model_dir: Path,
    data: Path,
    out: Path,
    settings: dict[str, Any],
    seed: int,
    started_at: float,
    run_info: dict[str, Any],
) -> EvaluationConfig:
    """Configure the demo's evaluation: ``instructcell evaluate`` on the test split, plus the requests.

    Labels are predicted by scoring every label and by mapping the greedy answer to a label; the cheap
    baselines run beside the model; the first request of every task is answered in natural language; the
    report's wall time counts from ``started_at`` (data building and training included).
    """
    return EvaluationConfig(
        model=model_dir,
        dataset_dir=data,
        output_dir=out,
        max_test_cells=int(settings["max_test_cells"]),
        max_generated_per_label=int(settings["max_generated_per_label"]),
        generated_per_request=int(settings["generated_per_request"]),
        method=("score", "generate"),
        seed=seed,
        requests=True,
        title="InstructCell demo",
        device="cpu",
        progress=False,
        started_at=started_at,
        extra=run_info,
    )


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

    command = "python examples/demo.py " + " ".join(sys.argv[1:])
    run_info = {
        "data_source": source,
        "recipe": str(args.recipe),
        "training": training,
        "settings": settings,
        "timings": timings,
        "command": command.strip(),
        "notes": notes,
    }
    config = evaluation_config(model_dir, data, out, settings, seed, start, run_info)
    logger.info("Evaluating the saved model on the test split")
    metrics = run_evaluation(config)
    print((out / "report.md").read_text())
    print(
        f"Wrote {out / 'report.md'}, {out / 'metrics.json'} and {out / 'figures'} "
        f"in {metrics['run']['wall_seconds']:.0f} s."
    )


if __name__ == "__main__":
    main()
