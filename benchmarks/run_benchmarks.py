"""Our models next to every baseline on the built dataset's hash split, plus inference and training speed.

    python benchmarks/run_benchmarks.py --instruct-model outputs/demo/model --dataset-dir outputs/demo/data \
        --output benchmarks/results/suite_demo

Writes a report folder (``metrics.json``, ``report.md``, ``figures/``) with the schema and renderer of
``instructcell evaluate`` (:mod:`instructcell.evaluation`). Sections (each can be skipped with
``--skip-<section>``):

* one per metric family (**classification**, **generation**): every task of the family is scored by its
  evaluator (:func:`instructcell.evaluation.suite.score_pairs`) for ``--instruct-model`` and ``--chat-model``
  (either may be omitted) next to the task's baselines (``--baselines``, default all: logistic regression and
  CellTypist; scVI, the per-label mean and the real-training-cell reference), all trained in this run on the
  same training cells; the optional installs are skipped, with the reason recorded, when missing;
* **throughput**: annotation cells/s and peak memory of batched inference vs one-cell-at-a-time generation
  with the same model (``benchmarks/inference_throughput.py``'s :func:`compare_modes`);
* **training**: examples/s and steps/s of a short run (``--train-steps``) of ``--train-preset`` on the mix of
  every task (``instructcell.training.run_training`` with ``max_steps``).

The split is the builder's hash split (``sha1("<dataset>/<obs_name>") % 10``: 0-7 train, 9 test). Both models
and every baseline see the same test cells (chat rows are matched to instruct rows by ``cell_id``). Each
section records how much CPU it got, so timings taken on a busy machine are flagged in the report.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anndata
import datasets
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference_throughput import compare_modes, label_token_length  # noqa: E402

from datasets_builder.dataset_folder import SplitRows, cap_rows, dataset_genes  # noqa: E402
from datasets_builder.templates import DEFAULT_BANK_DIR  # noqa: E402
from instructcell.evaluation.baselines import BASELINES, parse_baseline_choice  # noqa: E402
from instructcell.evaluation.candidates import Candidate  # noqa: E402
from instructcell.evaluation.cells import sparse_cells  # noqa: E402
from instructcell.evaluation.context import Evaluation, ScoringSettings  # noqa: E402
from instructcell.evaluation.files import report_folder  # noqa: E402
from instructcell.evaluation.metrics.generation import ReferenceEmbedding  # noqa: E402
from instructcell.evaluation.suite import score_pairs  # noqa: E402
from instructcell.tasks import METRIC_FAMILIES, get_task, task_names, tasks_of_family  # noqa: E402
from instructcell.training import parse_training_arguments, run_training  # noqa: E402
from instructcell.training.diagnostics import StepTimer  # noqa: E402
from modeling_instructcell import (  # noqa: E402
    InstructCellForConditionalGeneration,
    InstructCellPipeline,
    InstructCellProcessor,
)
from modeling_instructcell.pipeline_instructcell import TASK  # noqa: E402

SECTIONS = (*METRIC_FAMILIES, "throughput", "training")
VARIANTS = ("instruct", "chat")
DEFAULT_RECIPE = "demo"


# ----------------------------------------------------------------------------------------------- setup
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
    parser.add_argument(
        "--output",
        default="benchmarks/results/suite",
        help="Report folder (metrics.json, report.md, figures).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    for section in SECTIONS:
        parser.add_argument(f"--skip-{section}", action="store_true", help=f"Skip the {section} section.")
    parser.add_argument(
        "--baselines",
        default="all",
        help=f"'all', 'cheap', 'none' or comma-separated names among {', '.join(BASELINES)} "
        "(each task runs those of its own).",
    )
    parser.add_argument("--max-test-cells", type=int, default=500, help="Test rows per task and dataset.")
    parser.add_argument("--batch-size", type=int, default=64, help="Prompts per model call.")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="Answer length limit (greedy, requests)."
    )
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
    parser.add_argument("--max-generated-per-label", type=int, default=200, help="Generated cells per label.")
    parser.add_argument("--cells-per-request", type=int, default=1, help="Generated cells per request.")
    parser.add_argument("--scvi-epochs", type=int, default=200, help="scVI training epochs per dataset.")
    parser.add_argument("--celltypist-sgd", action="store_true", help="CellTypist's SGD mode (default: LR).")
    parser.add_argument(
        "--throughput-model",
        choices=list(VARIANTS),
        default=None,
        help="Model timed in the throughput section (default: the first given).",
    )
    parser.add_argument(
        "--throughput-task",
        default=tasks_of_family("classification")[0],
        help="Classification task whose test cells are annotated in the throughput section.",
    )
    parser.add_argument("--throughput-dataset", default=None, help="Its dataset (default: most test rows).")
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
        help="Re-render an earlier run's metrics.json into the --output folder; runs nothing.",
    )
    args = parser.parse_args(argv)
    args.baselines = parse_baseline_choice(args.baselines)
    if get_task(args.throughput_task).metric_family != "classification":
        parser.error(f"--throughput-task {args.throughput_task} is not a classification task.")
    return args


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


def load_candidates(args: argparse.Namespace, gene_names: list[str]) -> list[Candidate]:
    """Load the given models; their gene vocabulary must be the dataset's (columns of the sparse rows)."""
    candidates = []
    for variant in VARIANTS:
        path = getattr(args, f"{variant}_model")
        if not path:
            continue
        model = InstructCellForConditionalGeneration.from_pretrained(path).eval()
        processor = InstructCellProcessor.from_pretrained(path)
        if list(processor.feature_extractor.gene_names) != gene_names:
            raise ValueError(
                f"The {variant} model at {path} has another gene vocabulary than "
                f"{args.dataset_dir}/gene_vocab.txt; pass --dataset-dir the dataset the model was trained on."
            )
        candidates.append(
            Candidate(
                variant,
                model,
                processor,
                variant=variant,
                methods=(args.classification_method,),
                title=f"InstructCell {variant}",
                path=str(path),
            )
        )
    return candidates


def baseline_variant(split: SplitRows) -> str:
    """Variant whose rows define the cells and requests (instruct when present): the cells are the same."""
    variants = split.variants()
    return "instruct" if "instruct" in variants else sorted(variants)[0]


def scoring_settings(args: argparse.Namespace) -> ScoringSettings:
    """Return the settings of the metric-family sections."""
    return ScoringSettings(
        seed=args.seed,
        max_test_cells=args.max_test_cells,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        request_max_new_tokens=args.max_new_tokens,
        max_generated_per_label=args.max_generated_per_label,
        generated_per_request=args.cells_per_request,
        baselines=args.baselines,
        baseline_options={
            "celltypist": {"use_sgd": args.celltypist_sgd},
            "scvi": {"max_epochs": args.scvi_epochs},
        },
        progress=False,
    )


# ------------------------------------------------------------------------------------------------ throughput
def throughput_section(
    candidate: Candidate, test: SplitRows, gene_names: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Batched annotation vs one-cell-at-a-time generation with one model on a classification task's cells."""
    task = args.throughput_task
    pairs = [pair for pair in test.pairs((task,)) if (args.throughput_dataset or pair[1]) == pair[1]]
    if not pairs:
        raise ValueError(f"No {task} test rows for --throughput-dataset {args.throughput_dataset!r}.")
    dataset = max(pairs, key=lambda pair: len(test.rows.get((*pair, candidate.variant), [])))[1]
    rows = cap_rows(test.get(task, dataset, candidate.variant), args.throughput_cells, args.seed)
    adata = anndata.AnnData(
        X=sparse_cells(rows, "input", len(gene_names)),
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
        "task": task,
        "dataset": dataset,
        "n_labels": len(labels),
        "answer_tokens": answer_tokens,
        "batch_size": args.batch_size,
        "modes": measured,
        "speedup_vs_single": {
            row["mode"]: row["cells_per_s"] / measured[-1]["cells_per_s"] for row in measured
        },
    }


def _throughput_candidate(candidates: Sequence[Candidate], args: argparse.Namespace) -> Candidate:
    if args.throughput_model is None:
        return candidates[0]
    for candidate in candidates:
        if candidate.name == args.throughput_model:
            return candidate
    raise ValueError(
        f"--throughput-model {args.throughput_model} was not given (--{args.throughput_model}-model)."
    )


# -------------------------------------------------------------------------------------------------- training
def training_section(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput of a short training run of ``--train-preset`` on the mix of the dataset's tasks.

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
    present = {task for task, _ in SplitRows.load(args.dataset_dir, "train").pairs()}
    with tempfile.TemporaryDirectory(prefix="instructcell-bench-") as tmp:
        config = {
            "preset": args.train_preset,
            "tasks": ",".join(task for task in task_names() if task in present),  # the dataset's mix
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


# ------------------------------------------------------------------------------------------------------ run
def _timed_section(run: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one section; record its wall time, the CPU share it got and the load average at its end."""
    logging.getLogger(__name__).info("[%s]", name)
    began, cpu = time.perf_counter(), time.process_time()
    value = fn()
    wall = time.perf_counter() - began
    run["section_seconds"][name] = round(wall, 1)
    run["section_cpu_share"][name] = round((time.process_time() - cpu) / max(wall, 1e-9), 3)
    if hasattr(os, "getloadavg"):
        run["section_load"][name] = [round(x, 2) for x in os.getloadavg()]
    return value


def run_suite(
    args: argparse.Namespace, embedding_factory: Callable[[], Any] = ReferenceEmbedding
) -> dict[str, Any]:
    """Run the sections that are not skipped; write the report folder ``--output``; return its metrics."""
    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    logging.getLogger("modeling_instructcell").setLevel(logging.WARNING)  # per-batch gene-alignment notes
    root = Path(args.dataset_dir)
    gene_names = dataset_genes(root)
    candidates = load_candidates(args, gene_names)
    run: dict[str, Any] = {
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
    }
    skipped = {name: f"--skip-{name}" for name in SECTIONS if getattr(args, f"skip_{name}")}
    if not candidates and "throughput" not in skipped:
        skipped["throughput"] = "no model given (--instruct-model / --chat-model)"
    scores: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    ev = None
    with report_folder(args.output) as report:
        if not {*METRIC_FAMILIES, "throughput"} <= set(skipped):
            train, test = SplitRows.load(root, "train"), SplitRows.load(root, "test")
            ev = Evaluation(
                train,
                test,
                baseline_variant(test),
                gene_names,
                candidates,
                scoring_settings(args),
                report,
                embedding_factory,
                args.template_bank,
            )
        for family in METRIC_FAMILIES:
            pairs = [] if family in skipped else test.pairs(tasks_of_family(family))
            if pairs:  # a family without test rows in this dataset has no section
                _timed_section(run, family, lambda pairs=pairs: score_pairs(ev, pairs, scores))
        if "throughput" not in skipped:
            candidate = _throughput_candidate(candidates, args)
            sections["throughput"] = _timed_section(
                run, "throughput", lambda: throughput_section(candidate, test, gene_names, args)
            )
        if "training" not in skipped:
            sections["training"] = _timed_section(run, "training", lambda: training_section(args))
        if ev is not None:
            run.update(methods=ev.methods)
            skipped.update(ev.skipped)
        run.update(skipped=skipped, wall_seconds=round(time.time() - start, 1))
        metrics = {
            "title": "InstructCell benchmark suite",
            "run": run,
            "scores": scores,
            "sections": sections,
        }
        return report.publish(metrics)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: run (or re-render ``--render``), write the report folder, print it."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.render:
        with report_folder(args.output) as report:
            metrics = report.publish(json.loads(Path(args.render).read_text()))
    else:
        metrics = run_suite(args)
    output = Path(args.output)
    print((output / "report.md").read_text())
    print(f"Wrote {output / 'report.md'} and {output / 'metrics.json'}.")
    return metrics


if __name__ == "__main__":
    main()
