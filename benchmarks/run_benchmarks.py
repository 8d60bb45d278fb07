"""One command for issue #6 item 5: our models next to the baselines, on the built dataset's hash split.

    python benchmarks/run_benchmarks.py --instruct-model outputs/demo/model --dataset-dir outputs/demo/data \
        --output benchmarks/results/suite_demo

Sections (each can be skipped with ``--skip-<section>``):

a. **classification** (CTA, DSP): accuracy, macro-F1 and weighted-F1 on the test split for
   ``--instruct-model`` and ``--chat-model`` (either may be omitted) next to a logistic regression and a
   CellTypist model, both trained in this run on the same training cells (``--skip-celltypist``);
b. **generation** (CPCG): MMD, ΔsKNN, pKNN (mean over K = 5, 10, 25, 50) and pKNN(K=10) of the cells our
   models generate for the test split's requests, next to scVI trained on the CPCG training cells with the
   label as covariate (``--skip-scvi``, ``--scvi-epochs``), a per-label-mean generator (Poisson samples of
   each label's mean training profile: collapse onto centroids) and real training cells of the requested
   labels (the reference: what a perfect generator would score). Every generator gets the same requested
   labels and counts; all are scored in one PCA + UMAP embedding fitted on the real test cells;
c. **throughput**: annotation cells/s and peak memory of batched inference vs one-cell-at-a-time generation
   with the same model (``benchmarks/inference_throughput.py``'s :func:`compare_modes`);
d. **training**: examples/s and steps/s of a short run (``--train-steps``) of ``--train-preset`` on the
   CTA + DSP + CPCG mix (``instructcell.training.run_training`` with ``max_steps``).

The split is the builder's hash split (``sha1("<dataset>/<obs_name>") % 10``: 0-7 train, 9 test). Both models
and both classification baselines see the same test cells (chat rows are matched to instruct rows by
``cell_id``). Prints markdown tables (and the CPU / threads it ran on) and writes ``<output>.md`` and
``<output>.json``. The baselines need the ``bench`` extra (``pip install -e ".[bench]"``); without it their
columns are reported as skipped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import datasets
import numpy as np
import pandas as pd
import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference_throughput import compare_modes, label_token_length, throughput_table  # noqa: E402

from datasets_builder import read_gene_vocab  # noqa: E402
from datasets_builder.templates import DEFAULT_BANK_DIR, TemplateBank  # noqa: E402
from instructcell.evaluation.baselines import celltypist_predictions, label_mean_cells, train_scvi  # noqa: E402
from instructcell.evaluation.files import fmt  # noqa: E402
from instructcell.evaluation.metrics.generation import DEFAULT_KS, ReferenceEmbedding, compare_generators  # noqa: E402
from instructcell.evaluation.predictions import (  # noqa: E402
    cap_rows,
    classification_metrics,
    evaluate_generation,
    logistic_regression_predictions,
    model_predictions,
    reference_cells,
    requested_counts,
    select_requests,
    sparse_cells,
    sparse_input_cells,
)
from instructcell.evaluation.robustness import rows_answer_texts, template_lookup  # noqa: E402
from instructcell.training import parse_training_arguments, run_training  # noqa: E402
from modeling_instructcell import (  # noqa: E402
    InstructCellForConditionalGeneration,
    InstructCellPipeline,
    InstructCellProcessor,
)
from modeling_instructcell.pipeline_instructcell import TASK  # noqa: E402

SECTIONS = ("classification", "generation", "throughput", "training")
CLASSIFICATION_METRICS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "weighted_f1": "weighted-F1"}
GENERATION_METRICS = {
    "mmd": "MMD",
    "delta_sknn": "ΔsKNN",
    "pknn": "pKNN (mean over K)",
    "pknn_k10": "pKNN K=10",
}
METHOD_TITLES = {
    "instruct": "InstructCell instruct",
    "chat": "InstructCell chat",
    "logreg": "logistic regression",
    "celltypist": "CellTypist",
    "scvi": "scVI",
    "label_mean": "per-label mean",
    "reference": "reference (real training cells)",
}
DEFAULT_RECIPE = "demo"


# ----------------------------------------------------------------------------------------------- setup
@dataclass
class Candidate:
    """One of our models under test: the instruct or the chat variant."""

    name: str
    path: str
    model: InstructCellForConditionalGeneration
    processor: InstructCellProcessor
    method: str  # classification: "score" (label scoring) or "generate" (greedy answer + extract_label)

    def answers(self, rows: datasets.Dataset, bank_dir: str | os.PathLike) -> list[list[str]] | None:
        """Per row, the answer text of each choice to score (chat + score only; instruct: the labels)."""
        if self.variant == "instruct" or self.method != "score":
            return None
        return rows_answer_texts(rows, template_lookup(TemplateBank.load(bank_dir)))

    @property
    def variant(self) -> str:
        """Dataset variant whose instructions the model was trained on (= its name)."""
        return self.name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--dataset-dir", default="outputs/instructcell-data", help="examples/build_dataset.py output"
    )
    parser.add_argument("--instruct-model", help="Model folder (Hub layout) trained on the instruct variant.")
    parser.add_argument("--chat-model", help="Model folder (Hub layout) trained on the chat variant.")
    parser.add_argument("--output", default="benchmarks/results/suite", help="Writes <output>.md and .json.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    for section in SECTIONS:
        parser.add_argument(f"--skip-{section}", action="store_true", help=f"Skip the {section} section.")
    parser.add_argument("--skip-celltypist", action="store_true", help="Classification without CellTypist.")
    parser.add_argument("--skip-scvi", action="store_true", help="Generation without scVI.")
    parser.add_argument("--max-test-cells", type=int, default=500, help="Test rows per task and dataset.")
    parser.add_argument("--batch-size", type=int, default=64, help="Prompts per model call.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Answer length limit (greedy, CPCG).")
    parser.add_argument(
        "--classification-method",
        choices=["score", "generate"],
        default="score",
        help="score: the most likely label (the chat model's whole response is scored with each label filled "
        "in, from the template bank); generate: greedy answer mapped to a label (unanswered = wrong).",
    )
    parser.add_argument(
        "--template-bank",
        default=str(DEFAULT_BANK_DIR),
        help="Bank the dataset was built with (chat scoring).",
    )
    parser.add_argument("--max-generated-per-label", type=int, default=200, help="CPCG cells per label.")
    parser.add_argument("--cells-per-request", type=int, default=1, help="CPCG cells per request.")
    parser.add_argument("--scvi-epochs", type=int, default=200, help="scVI training epochs per dataset.")
    parser.add_argument("--celltypist-sgd", action="store_true", help="CellTypist's SGD mode (default: LR).")
    parser.add_argument(
        "--throughput-model",
        choices=["instruct", "chat"],
        default=None,
        help="Model timed in the throughput section (default: the first given).",
    )
    parser.add_argument("--throughput-dataset", default=None, help="CTA dataset (default: most test rows).")
    parser.add_argument("--throughput-cells", type=int, default=512, help="Cells of the batched modes.")
    parser.add_argument(
        "--throughput-single-cells", type=int, default=64, help="Cells of the 1-at-a-time mode."
    )
    parser.add_argument(
        "--throughput-modes",
        default="score,greedy,single",
        help="Comma-separated modes of inference_throughput.compare_modes.",
    )
    parser.add_argument("--train-recipe", default=DEFAULT_RECIPE, help="Training recipe (name or YAML).")
    parser.add_argument("--train-preset", default="small")
    parser.add_argument(
        "--train-steps", type=int, default=50, help="Training steps (the first is not timed)."
    )
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="Re-render an earlier run's JSON into <output>.md/.json; runs nothing.",
    )
    return parser.parse_args(argv)


def machine_info() -> dict[str, Any]:
    """CPU model, logical CPUs, CPUs usable by this process, torch threads, BLAS env vars, niceness, load."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "nice": os.nice(0) if hasattr(os, "nice") else None,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }
    info["versions"] = {
        name: _version(name) for name in ("torch", "transformers", "scvi-tools", "celltypist")
    }
    return info


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _use_baseline(module: str, package: str, skip: bool, skipped: dict[str, str]) -> bool:
    """Whether to run the optional baseline ``module``; if not, record why in ``skipped[module]``."""
    if skip:
        skipped[module] = f"--skip-{module}"
    elif not _installed(module):
        skipped[module] = f'{package} is not installed (pip install -e ".[bench]")'
    return module not in skipped


def load_candidates(args: argparse.Namespace, gene_names: list[str]) -> list[Candidate]:
    """Load the given models; their gene vocabulary must be the dataset's (columns of the sparse rows)."""
    candidates = []
    for name, path in (("instruct", args.instruct_model), ("chat", args.chat_model)):
        if not path:
            continue
        model = InstructCellForConditionalGeneration.from_pretrained(path).eval()
        processor = InstructCellProcessor.from_pretrained(path)
        if list(processor.feature_extractor.gene_names) != gene_names:
            raise ValueError(
                f"The {name} model at {path} has another gene vocabulary than "
                f"{args.dataset_dir}/gene_vocab.txt; "
                "pass --dataset-dir the dataset the model was trained on."
            )
        candidates.append(Candidate(name, str(path), model, processor, args.classification_method))
    return candidates


class SplitIndex:
    """Rows of one split, looked up by (task, dataset, variant) without re-filtering the table."""

    def __init__(self, table: datasets.Dataset) -> None:
        self.table = table
        keys = zip(table["task"], table["dataset"], table["variant"], strict=True)
        self.rows: dict[tuple[str, str, str], list[int]] = {}
        for i, key in enumerate(keys):
            self.rows.setdefault(key, []).append(i)

    def pairs(self, tasks: Sequence[str]) -> list[tuple[str, str]]:
        """Sorted (task, dataset) pairs of the given tasks."""
        return sorted({(t, d) for t, d, _ in self.rows if t in tasks})

    def variants(self) -> set[str]:
        """Variants present in the split."""
        return {v for _, _, v in self.rows}

    def get(self, task: str, dataset: str, variant: str) -> datasets.Dataset:
        """Rows of one task, dataset and variant (ValueError when there are none)."""
        indices = self.rows.get((task, dataset, variant))
        if not indices:
            raise ValueError(
                f"No rows for task={task!r}, dataset={dataset!r}, variant={variant!r}; "
                "build the dataset with "
                f"that variant (examples/build_dataset.py --variant {variant})."
            )
        return self.table.select(indices)

    def matching(self, task: str, dataset: str, variant: str, cell_ids: Sequence[str]) -> datasets.Dataset:
        """Rows of ``variant`` for the given cells, in their order (the same cells in every variant)."""
        rows = self.get(task, dataset, variant)
        position = {cell_id: i for i, cell_id in enumerate(rows["cell_id"])}
        missing = [c for c in cell_ids if c not in position]
        if missing:
            raise ValueError(
                f"{len(missing)} {task}/{dataset} cells have no {variant} row (e.g. {missing[0]!r})."
            )
        return rows.select([position[c] for c in cell_ids])


def baseline_variant(split: SplitIndex) -> str:
    """Variant whose rows define the cells and requests (instruct when present): the cells are the same."""
    variants = split.variants()
    return "instruct" if "instruct" in variants else sorted(variants)[0]


# -------------------------------------------------------------------------------------- a. classification
def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Return ``fn(*args, **kwargs)`` and its wall time in seconds."""
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def _scores(values: Mapping[str, Any], seconds: float, **extra: Any) -> dict[str, Any]:
    return {**{k: float(v) for k, v in values.items()}, "seconds": round(seconds, 2), **extra}


def classification_section(
    candidates: Sequence[Candidate],
    train: SplitIndex,
    test: SplitIndex,
    gene_names: list[str],
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Score our models, logistic regression and CellTypist on every CTA/DSP dataset's test split.

    Returns
    -------
    results : dict
        ``"<task>/<dataset>"`` -> ``{"task", "dataset", "n_test", "n_train", "labels", "methods"}`` where
        ``methods`` maps ``instruct`` / ``chat`` / ``logreg`` / ``celltypist`` to ``accuracy``, ``macro_f1``,
        ``weighted_f1``, ``answered_rate`` and ``seconds``.
    skipped : dict
        Methods left out and why.
    """
    skipped: dict[str, str] = {}
    use_celltypist = _use_baseline("celltypist", "celltypist", args.skip_celltypist, skipped)
    variant = baseline_variant(test)
    results = {}
    for task, dataset in test.pairs(("cta", "dsp")):
        rows = cap_rows(test.get(task, dataset, variant), args.max_test_cells, args.seed)
        train_rows = train.get(task, dataset, variant)
        methods: dict[str, Any] = {}
        for candidate in candidates:
            model_rows = test.matching(task, dataset, candidate.variant, rows["cell_id"])
            torch.manual_seed(args.seed)
            predictions, seconds = _timed(
                model_predictions,
                candidate.model,
                candidate.processor,
                model_rows,
                candidate.method,
                args.batch_size,
                args.max_new_tokens,
                answers=candidate.answers(model_rows, args.template_bank),
            )
            methods[candidate.name] = _scores(
                classification_metrics(predictions, rows), seconds, method=candidate.method
            )
        predictions, seconds = _timed(
            logistic_regression_predictions, train_rows, rows, len(gene_names), seed=args.seed
        )
        methods["logreg"] = _scores(classification_metrics(predictions, rows), seconds)
        if use_celltypist:
            predictions, seconds = _timed(
                celltypist_predictions,
                sparse_input_cells(train_rows, len(gene_names)),
                train_rows["label"],
                sparse_input_cells(rows, len(gene_names)),
                gene_names,
                use_sgd=args.celltypist_sgd,
                seed=args.seed,
            )
            methods["celltypist"] = _scores(
                classification_metrics(predictions, rows),
                seconds,
                mode="sgd" if args.celltypist_sgd else "lr",
            )
        results[f"{task}/{dataset}"] = {
            "task": task,
            "dataset": dataset,
            "n_test": len(rows),
            "n_train": len(train_rows),
            "labels": sorted(rows[0]["choices"]),
            "methods": methods,
        }
        print(
            f"  {task}/{dataset}: " + ", ".join(f"{m} {v['macro_f1']:.3f}" for m, v in methods.items()),
            flush=True,
        )
    return results, skipped


# ------------------------------------------------------------------------------------------ b. generation
def _metrics_entry(metrics: Mapping[str, float] | None, n_cells: int, **extra: Any) -> dict[str, Any]:
    """Build a generator's entry: its metrics (None with fewer than 2 cells), cell count and extras."""
    values = {key: None for key in GENERATION_METRICS} if metrics is None else dict(metrics)
    return {
        **{k: float(v) if v is not None else None for k, v in values.items()},
        "n_cells": n_cells,
        **extra,
    }


def generation_section(
    candidates: Sequence[Candidate],
    train: SplitIndex,
    test: SplitIndex,
    n_genes: int,
    args: argparse.Namespace,
    embedding_factory: Callable[[], Any] = ReferenceEmbedding,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Score our models, scVI, the per-label mean and the reference on every CPCG dataset.

    Returns
    -------
    results : dict
        ``dataset`` -> ``{"n_real", "n_requests", "requested", "generators"}`` where ``generators`` maps
        ``instruct`` / ``chat`` / ``scvi`` / ``label_mean`` / ``reference`` to ``mmd``, ``delta_sknn``,
        ``pknn``, ``pknn_k10`` (None with fewer than 2 cells), per-K values, ``n_cells`` and timings.
    skipped : dict
        Generators left out and why.
    """
    skipped: dict[str, str] = {}
    use_scvi = _use_baseline("scvi", "scvi-tools", args.skip_scvi, skipped)
    variant = baseline_variant(test)
    results = {}
    for _, dataset in test.pairs(("cpcg",)):
        rows = cap_rows(test.get("cpcg", dataset, variant), args.max_test_cells, args.seed)
        requests = select_requests(rows, args.max_generated_per_label, args.cells_per_request)
        requested = requested_counts(requests["label"], args.cells_per_request)
        train_rows = train.get("cpcg", dataset, variant)
        train_counts = sparse_cells(train_rows, "target", n_genes)
        train_labels = list(train_rows["label"])
        generated: dict[str, tuple[Any, list[str]]] = {}
        extras: dict[str, dict[str, Any]] = {}
        for candidate in candidates:
            # the same cells (hence the same requests) in the model's variant
            (result, _), seconds = _timed(
                evaluate_generation,
                candidate.model,
                candidate.processor,
                train_rows,
                test.matching("cpcg", dataset, candidate.variant, rows["cell_id"]),
                dataset,
                max_generated_per_label=args.max_generated_per_label,
                generated_per_request=args.cells_per_request,
                seed=args.seed,
                max_new_tokens=args.max_new_tokens,
                progress=False,
            )
            generated[candidate.name] = (result.generated, list(result.generated_labels))
            extras[candidate.name] = {
                "signal_rate": result.n_answered_with_signal / max(1, result.n_requests),
                "seconds": round(seconds, 2),
            }
        if use_scvi:
            scvi_model = train_scvi(train_counts, train_labels, max_epochs=args.scvi_epochs, seed=args.seed)
            (counts, labels), seconds = _timed(scvi_model.sample, requested, seed=args.seed)
            generated["scvi"] = (counts, labels)
            extras["scvi"] = {
                "epochs": scvi_model.epochs,
                "train_seconds": round(scvi_model.train_seconds, 1),
                "sample_seconds": round(seconds, 2),
                "final_elbo": scvi_model.final_elbo,
                "n_genes_modelled": int(scvi_model.genes.size),
            }
        generated["label_mean"] = label_mean_cells(train_counts, train_labels, requested, seed=args.seed)
        generated["reference"] = reference_cells(train_rows, requested, n_genes, seed=args.seed)
        metrics, _ = compare_generators(
            sparse_cells(rows, "target", n_genes), rows["label"], generated, embedding_factory(), DEFAULT_KS
        )
        results[dataset] = {
            "n_real": len(rows),
            "n_requests": len(requests),
            "n_train": len(train_rows),
            "requested": requested,
            "generators": {
                name: _metrics_entry(
                    metrics[name], 0 if counts is None else int(counts.shape[0]), **extras.get(name, {})
                )
                for name, (counts, _) in generated.items()
            },
        }
        print(
            f"  cpcg/{dataset}: "
            + ", ".join(f"{n} MMD {fmt(g['mmd'])}" for n, g in results[dataset]["generators"].items()),
            flush=True,
        )
    return results, skipped


# ------------------------------------------------------------------------------------------ c. throughput
def throughput_section(
    candidate: Candidate, test: SplitIndex, gene_names: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Batched annotation vs one-cell-at-a-time generation with one model on test cells of a CTA dataset."""
    pairs = [pair for pair in test.pairs(("cta",)) if (args.throughput_dataset or pair[1]) == pair[1]]
    if not pairs:
        raise ValueError(f"No CTA test rows for --throughput-dataset {args.throughput_dataset!r}.")
    dataset = max(pairs, key=lambda pair: len(test.rows.get((*pair, candidate.variant), [])))[1]
    rows = cap_rows(test.get("cta", dataset, candidate.variant), args.throughput_cells, args.seed)
    adata = anndata.AnnData(
        X=sparse_input_cells(rows, len(gene_names)),
        obs=pd.DataFrame(index=[str(c) for c in rows["cell_id"]]),
        var=pd.DataFrame(index=gene_names),
    )
    labels = list(rows[0]["choices"])
    pipe = InstructCellPipeline(model=candidate.model, processor=candidate.processor, task=TASK, device=-1)
    answer_tokens = label_token_length(pipe, labels)
    modes = tuple(m.strip() for m in args.throughput_modes.split(",") if m.strip())
    torch.manual_seed(args.seed)
    measured, _ = compare_modes(
        pipe, adata, labels, args.batch_size, args.throughput_single_cells, answer_tokens, modes=modes
    )
    return {
        "model": candidate.name,
        "dataset": dataset,
        "n_labels": len(labels),
        "answer_tokens": answer_tokens,
        "batch_size": args.batch_size,
        "modes": measured,
        "speedup_vs_single": {
            row["mode"]: row["cells_per_s"] / measured[-1]["cells_per_s"] for row in measured
        },
    }


# -------------------------------------------------------------------------------------------- d. training
class StepTimer(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.begin = 0.0
        self.step_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock."""
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        """Record the step's end."""
        self.step_ends.append(time.perf_counter())


def training_section(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput of a short training run of ``--train-preset`` on the CTA + DSP + CPCG mix.

    The recipe's model and optimizer settings are kept; evaluation, checkpoints, the wall-clock limit (and the
    lr decay over it) and the cell-decoder stage are off, and ``max_steps = --train-steps``. The first step
    (allocations, lazy initialisation) is reported apart; steps/s and examples/s are measured over the others.
    """
    if args.train_steps < 2:
        raise ValueError(
            f"--train-steps must be at least 2 (the first step is not timed), got {args.train_steps}."
        )
    timer = StepTimer()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with tempfile.TemporaryDirectory(prefix="instructcell-bench-") as tmp:
        config = {
            "preset": args.train_preset,
            "tasks": "cta,dsp,cpcg",
            "dataset_dir": str(args.dataset_dir),
            "output_dir": tmp,
            "max_steps": args.train_steps,
            "cell_decoder_steps": 0,  # the recipe's second stage (VAE on frozen states) is not timed
            "eval_strategy": "no",
            "save_strategy": "no",
            "load_best_model_at_end": False,
            "logging_steps": args.train_steps,
            "report_to": "none",
            "disable_tqdm": True,
            "seed": args.seed,
        }
        model_args, data_args, training_args, _ = parse_training_arguments(args.train_recipe, config)
        start = time.perf_counter()
        try:
            trainer, _, _ = run_training(model_args, data_args, training_args, callbacks=[timer])
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        total = time.perf_counter() - start
    steps = len(timer.step_ends)
    timed = steps - 1
    seconds = timer.step_ends[-1] - timer.step_ends[0]
    examples_per_step = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )
    logged = next((log for log in reversed(trainer.state.log_history) if "train_runtime" in log), {})
    return {
        "preset": args.train_preset,
        "tasks": data_args.tasks,
        "variant": data_args.variant,
        "recipe": str(args.train_recipe),
        "n_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "n_train_rows": len(trainer.train_dataset),
        "examples_per_step": examples_per_step,
        "steps": steps,
        "timed_steps": timed,
        "timed_seconds": round(seconds, 2),
        "steps_per_s": timed / seconds,
        "examples_per_s": timed * examples_per_step / seconds,
        "first_step_seconds": round(timer.step_ends[0] - timer.begin, 2),
        "setup_seconds": round(timer.begin - start, 1),
        "total_seconds": round(total, 1),
        "trainer_samples_per_second": logged.get("train_samples_per_second"),
        "trainer_steps_per_second": logged.get("train_steps_per_second"),
    }


# ------------------------------------------------------------------------------------------------ report
def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int | None = None
) -> str:
    """Format a markdown table; floats with 3 decimals, None/NaN as ``n/a``.

    Parameters
    ----------
    header : sequence of str
    rows : sequence of sequences
        One value per column.
    numeric_from : int, optional
        Right-align the columns from this index on.
    """
    width = len(header)
    bad = [i for i, row in enumerate(rows) if len(row) != width]
    if bad:
        raise ValueError(f"Rows {bad} do not have {width} columns.")
    align = ["---" if numeric_from is None or i < numeric_from else "---:" for i in range(width)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(fmt(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _columns(entries: Mapping[str, Mapping[str, Any]], key: str, order: Sequence[str]) -> list[str]:
    present = {name for entry in entries.values() for name in entry[key]}
    return [name for name in order if name in present]


def classification_table(results: Mapping[str, Any]) -> str:
    """Rows: dataset x metric; columns: our models and the baselines side by side."""
    methods = _columns(results, "methods", ("instruct", "chat", "logreg", "celltypist"))
    header = ["task", "dataset", "n test", "metric", *(METHOD_TITLES[m] for m in methods)]
    rows = []
    for entry in results.values():
        for key, title in CLASSIFICATION_METRICS.items():
            values = [entry["methods"].get(m, {}).get(key) for m in methods]
            rows.append([entry["task"].upper(), entry["dataset"], entry["n_test"], title, *values])
    return markdown_table(header, rows, numeric_from=2)


def generation_table(results: Mapping[str, Any]) -> str:
    """Rows: dataset x metric; columns: our models, scVI, the per-label mean, the reference."""
    names = _columns(results, "generators", ("instruct", "chat", "scvi", "label_mean", "reference"))
    header = ["dataset", "metric", *(METHOD_TITLES[n] for n in names)]
    rows = []
    for dataset, entry in results.items():
        generators = entry["generators"]
        for key, title in GENERATION_METRICS.items():
            rows.append([dataset, title, *(generators.get(n, {}).get(key) for n in names)])
        cells = [
            f"{generators[n]['n_cells']} / {sum(entry['requested'].values())}" if n in generators else None
            for n in names
        ]
        rows.append([dataset, "cells generated / requested", *cells])
    return markdown_table(header, rows, numeric_from=2)


def training_table(result: Mapping[str, Any]) -> str:
    """One row: the short training run's throughput."""
    header = [
        "preset",
        "tasks",
        "params",
        "examples/step",
        "timed steps",
        "steps/s",
        "examples/s",
        "first step s",
        "setup s",
    ]
    row = [
        result["preset"],
        result["tasks"],
        f"{result['n_parameters'] / 1e6:.1f}M",
        result["examples_per_step"],
        result["timed_steps"],
        result["steps_per_s"],
        result["examples_per_s"],
        result["first_step_seconds"],
        result["setup_seconds"],
    ]
    return markdown_table(header, [row], numeric_from=2)


def machine_line(info: Mapping[str, Any]) -> str:
    """Say where and with how many threads the suite ran."""
    return (
        f"Ran on {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['usable_cpus']} usable), "
        f"torch threads {info['torch_threads']} (interop {info['torch_interop_threads']}), "
        f"OMP_NUM_THREADS={info['OMP_NUM_THREADS']}, MKL_NUM_THREADS={info['MKL_NUM_THREADS']}, "
        f"nice {info['nice']}, load average (1, 5, 15 min) at start {info.get('load_average_1_5_15')}"
        + (f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU")
        + "."
    )


#: Below this share of one CPU (CPU time / wall time of the process), a section was starved by other jobs.
MIN_CPU_SHARE = 0.8


def load_note(run: Mapping[str, Any], section: str) -> str:
    """Say how much CPU the suite got during a section; flag its timings when other jobs took it.

    With ``OMP_NUM_THREADS=1`` torch computes on one thread (interop, autograd and Arrow threads can add
    more), so the suite always has at least one CPU's worth of work: a CPU time / wall time share well below
    1 means it waited for the CPUs. The load average at the section's end is shown too.
    """
    share = run.get("section_cpu_share", {}).get(section)
    if share is None:
        return ""
    loads = run.get("section_load", {}).get(section)
    note = f"This process got {share:.0%} of a CPU during this section"
    if loads:
        note += (
            f" (load average at its end {loads[0]:.2f} on {run['machine'].get('usable_cpus')} usable CPUs)"
        )
    note += "."
    if share < MIN_CPU_SHARE:
        note += (
            " **Other jobs took the CPUs: its timings (seconds, cells/s, steps/s) are lower bounds, not this "
            "machine's speed.**"
        )
    return note


def report_markdown(results: Mapping[str, Any]) -> str:
    """Write the report: the machine line, one table per section that ran, then what was skipped."""
    run = results["run"]
    lines = [
        "# InstructCell benchmark suite",
        "",
        machine_line(run["machine"]),
        "",
    ]
    lines.append(f"Command: `{run['command']}`")
    lines.append(
        f"Data: `{run['dataset_dir']}` ({run['split']}); models: "
        + (", ".join(f"{k} `{v}`" for k, v in run["models"].items()) or "none")
        + f"; seed {run['seed']}; wall time {run['wall_seconds']:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in run.get("section_seconds", {}).items())
        + ")."
    )
    if "classification" in results:
        lines += ["", "## a. Cell type annotation and drug sensitivity (test split)", ""]
        lines.append(
            "Our models score every label of the dataset (`score`) or answer greedily and the label is "
            "parsed "
            "(`generate`); logistic regression and CellTypist are trained in this run on the same training "
            "cells (log-normalized counts) and predict the same test cells."
        )
        lines += ["", classification_table(results["classification"])]
    if "generation" in results:
        lines += ["", "## b. Conditional cell generation (test split requests)", ""]
        lines.append(
            "Every generator is asked for the same labels and counts; generated cells are compared with the "
            "real "
            "test cells in one PCA-50 + UMAP embedding fitted on the real test cells (KNN metrics: mean over "
            "K = 5, 10, 25, 50). scVI: trained per dataset on the CPCG training cells with the label as its "
            "batch "
            "covariate, cells sampled from its prior (z ~ N(0, I), per-label library prior). Per-label mean: "
            "Poisson samples of each label's mean training profile. Reference: real training cells of the "
            "requested labels (a perfect generator; closeness to it is the goal)."
        )
        lines += ["", generation_table(results["generation"]), "", load_note(run, "generation")]
        scvi = [
            (d, e["generators"]["scvi"])
            for d, e in results["generation"].items()
            if "scvi" in e["generators"]
        ]
        for dataset, entry in scvi:
            lines.append(
                f"\nscVI on {dataset}: {entry['epochs']} epochs, {entry['train_seconds']} s training, "
                f"{entry['n_genes_modelled']} genes with counts, "
                f"final training ELBO {fmt(entry['final_elbo'], 1)}."
            )
    if "throughput" in results:
        t = results["throughput"]
        lines += ["", "## c. Annotation throughput and memory", ""]
        lines.append(
            f"Model `{t['model']}`, test cells of {t['dataset']} ({t['n_labels']} labels), batch size "
            f"{t['batch_size']}; generating modes write exactly {t['answer_tokens']} tokens (median label "
            "length). RSS before / peak RSS: the process's resident memory before the mode and its peak "
            "during it (model and data included; the difference is what the mode itself needs)."
        )
        lines += ["", throughput_table(t["modes"]), "", load_note(run, "throughput")]
    if "training" in results:
        lines += ["", "## d. Training throughput", ""]
        tr = results["training"]
        lines.append(
            f"`run_training` with `max_steps={tr['steps']}` on the {tr['tasks']} mix "
            f"({tr['variant']} variant, "
            f"{tr['n_train_rows']} training rows, recipe `{tr['recipe']}`, its cell-decoder stage off); "
            "the first step is not timed."
        )
        lines += ["", training_table(tr), "", load_note(run, "training")]
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()) + "."]
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_outputs(results: Mapping[str, Any], output: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<output>.md`` and ``<output>.json`` (each atomically); return their paths."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = output.with_name(output.name + ".md"), output.with_name(output.name + ".json")
    texts = report_markdown(results), json.dumps(_plain(results), indent=2) + "\n"
    for path, text in zip(paths, texts, strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


# -------------------------------------------------------------------------------------------------- main
def run_suite(
    args: argparse.Namespace, embedding_factory: Callable[[], Any] = ReferenceEmbedding
) -> dict[str, Any]:
    """Run the sections that are not skipped and return their results (also written to ``--output``)."""
    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    logging.getLogger("modeling_instructcell").setLevel(logging.WARNING)  # per-batch gene-alignment notes
    root = Path(args.dataset_dir)
    gene_names = read_gene_vocab(root / "gene_vocab.txt")
    candidates = load_candidates(args, gene_names)
    results: dict[str, Any] = {
        "run": {
            "command": "python benchmarks/run_benchmarks.py " + " ".join(sys.argv[1:]),
            "machine": machine_info(),
            "dataset_dir": str(root),
            "split": "hash split sha1('<dataset>/<obs_name>') % 10: 0-7 train, 8 validation, 9 test",
            "models": {c.name: c.path for c in candidates},
            "seed": args.seed,
            "max_test_cells": args.max_test_cells,
            "section_seconds": {},
            "section_load": {},
            "section_cpu_share": {},
        },
        "skipped": {},
    }
    print(machine_line(results["run"]["machine"]), flush=True)
    need_data = not (args.skip_classification and args.skip_generation and args.skip_throughput)
    if need_data:
        splits = datasets.load_dataset(
            "parquet", data_files={s: str(root / f"{s}.parquet") for s in ("train", "test")}
        )
        train, test = SplitIndex(splits["train"]), SplitIndex(splits["test"])
    sections: dict[str, Callable[[], Any]] = {
        "classification": lambda: classification_section(candidates, train, test, gene_names, args),
        "generation": lambda: generation_section(
            candidates, train, test, len(gene_names), args, embedding_factory
        ),
        "throughput": lambda: throughput_section(
            _throughput_candidate(candidates, args), test, gene_names, args
        ),
        "training": lambda: training_section(args),
    }
    for name, run in sections.items():
        if getattr(args, f"skip_{name}"):
            results["skipped"][name] = f"--skip-{name}"
            continue
        if name == "throughput" and not candidates:
            results["skipped"][name] = "no model given (--instruct-model / --chat-model)"
            continue
        print(f"[{name}]", flush=True)
        began, cpu = time.perf_counter(), time.process_time()
        value = run()
        if isinstance(value, tuple):
            value, skipped = value
            results["skipped"].update(skipped)
        results[name] = value
        wall = time.perf_counter() - began
        results["run"]["section_seconds"][name] = round(wall, 1)
        results["run"]["section_cpu_share"][name] = round((time.process_time() - cpu) / max(wall, 1e-9), 3)
        if hasattr(os, "getloadavg"):
            results["run"]["section_load"][name] = [round(x, 2) for x in os.getloadavg()]
    results["run"]["wall_seconds"] = round(time.time() - start, 1)
    return results


def _throughput_candidate(candidates: Sequence[Candidate], args: argparse.Namespace) -> Candidate:
    if args.throughput_model is None:
        return candidates[0]
    for candidate in candidates:
        if candidate.name == args.throughput_model:
            return candidate
    raise ValueError(
        f"--throughput-model {args.throughput_model} was not given (--{args.throughput_model}-model)."
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: run, print the report, write ``<output>.md`` and ``<output>.json``."""
    args = parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
    else:
        results = run_suite(args)
    print()
    print(report_markdown(results))
    md, js = write_outputs(results, args.output)
    print(f"Wrote {md} and {js}.")
    return results


if __name__ == "__main__":
    main()
