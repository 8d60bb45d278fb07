"""Macro-F1 against training wall time: the paper's recipe, our default recipe and logistic regression.

    python benchmarks/learning_curve.py --dataset-dir outputs/instructcell-data \
        --datasets bastidas_ponce_2019_pancreas,zheng2017_sorted_pbmc,kang2018_pbmc_ifnb_muscat \
        --minutes 2,5,10,15,20,30 --output benchmarks/results/learning_curve

Recipes can also run side by side, one per core (``--recipes paper --threads 1 --output a`` and
``--recipes default --threads 1 --output b`` at once), then
``--merge a.json,b.json --output ...``.

For each CTA dataset and recipe, trains the small preset (instruct variant, CTA only, hash split) and
pauses at each wall-clock mark to score the test split (evaluation time is not counted as training time).
A recipe whose learning rate decays over its budget (our default, budgeted in steps) is instead trained once
per mark, its lr decaying over that mark's minutes or steps.
Logistic regression on log-normalized counts is fitted on the same training cells in the same run.
Prints a markdown table and writes ``<output>.md``, ``<output>.json``, ``<output>.png`` and, per dataset, the
gradient norm reaching each module group (``<output>_<dataset>_gradients.png``,
:mod:`instructcell.training.diagnostics`).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from transformers import TrainerCallback

from datasets_builder.dataset_folder import dataset_genes, load_split
from instructcell.evaluation.baselines import BASELINES, ClassificationCells
from instructcell.evaluation.candidates import model_predictions
from instructcell.evaluation.classification_evaluator import classification_scores
from instructcell.training import DEFAULT_RECIPE, parse_training_arguments, run_training
from instructcell.training.diagnostics import GradientNormRecorder, plot_gradient_norms

# Each curve: a shipped recipe (configuration/recipes) and the overrides that make it an ablation
# (docs/experiments.md).
# has the curves measured so far and the ablations that were tried and removed.
RECIPES: dict[str, tuple[str, dict]] = {
    "default": (DEFAULT_RECIPE, {}),
    "paper": ("paper", {}),
    # per-gene standardization of the cell encoder's input (an option, off by default)
    "default+standardize": (DEFAULT_RECIPE, {"standardize_genes": True}),
    # a separate peak lr for the cell encoder, projection and VAE (the language model keeps the recipe's)
    "default+cell_lr3e-4": (DEFAULT_RECIPE, {"cell_modules_learning_rate": 3e-4}),
    "default+cell_lr3e-3": (DEFAULT_RECIPE, {"cell_modules_learning_rate": 3e-3}),
    "default+weight_decay": (DEFAULT_RECIPE, {"weight_decay": 1.0}),
}
# what every run of the curve shares: CTA on one dataset, no checkpoints or validation passes, no VAE stage
CURVE_SETTINGS = {
    "tasks": "cta",
    "variant": "instruct",
    "eval_strategy": "no",
    "save_strategy": "no",
    "load_best_model_at_end": False,
    "cell_decoder_steps": 0,
    "disable_tqdm": True,
    "logging_steps": 50,
    "report_to": "none",
}


class WallClockEvaluation(TrainerCallback):
    """Score the held-out rows at marks of training wall time (or of optimizer steps); stop after the last.

    Steps are the fair unit for ablations run on a busy machine (changes that cost the same per step);
    wall time is what a user waits for.
    """

    def __init__(self, marks: list[float], test_rows, method: str = "score", unit: str = "minutes"):
        if unit not in ("minutes", "steps"):
            raise ValueError(f"unit must be 'minutes' or 'steps', got {unit!r}.")
        self.marks = sorted(marks)
        self.unit = unit
        self.test_rows = test_rows
        self.method = method
        self.results: list[dict] = []
        self.start = 0.0
        self.paused = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock."""
        self.start, self.paused = time.monotonic(), 0.0

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Score the held-out rows at every mark passed (the clock pauses meanwhile)."""
        trained_minutes = (time.monotonic() - self.start - self.paused) / 60
        trained = state.global_step if self.unit == "steps" else trained_minutes
        while self.marks and trained >= self.marks[0]:
            mark = self.marks.pop(0)
            began = time.monotonic()
            model.eval()
            predictions = model_predictions(model, processing_class, self.test_rows, method=self.method)
            model.train()
            metrics = classification_scores(predictions, self.test_rows)
            self.results.append(
                {
                    "mark": mark,
                    "minutes": round(trained_minutes, 2),
                    "step": state.global_step,
                    "epoch": state.epoch,
                    **metrics,
                }
            )
            print(
                f"  {trained_minutes:>5.1f} min  step {state.global_step:>5}  "
                f"macro-F1 {metrics['macro_f1']:.3f}",
                flush=True,
            )
            self.paused += time.monotonic() - began
        if not self.marks:
            control.should_training_stop = True
        return control


def budget_overrides(recipe: str, mark: float, unit: str) -> dict | None:
    """Return the overrides that make ``mark`` a recipe's budget (None: one run is scored at every mark).

    A recipe budgeted in steps (``max_steps``, its lr decaying over them) trains once per mark: with
    ``--unit steps`` the mark is its ``max_steps``; with minutes its lr decays over ``mark`` minutes of wall
    clock instead (``anneal_to_time_limit``). An epoch-budgeted recipe (the paper's) trains once.
    """
    shipped, overrides = RECIPES[recipe]
    _, _, training_args, _ = parse_training_arguments(shipped, overrides)
    if training_args.max_steps <= 0:
        return None
    if unit == "steps":
        return {"max_steps": int(mark)}
    return {
        "max_steps": -1,
        "num_train_epochs": 10_000,
        "max_train_minutes": mark,
        "anneal_to_time_limit": True,
    }


def run_recipe(
    recipe: str, dataset: str, args, marks: list[float], test_rows
) -> tuple[list[dict], list[dict]]:
    """Train one recipe; return its learning curve and its per-module gradient norms.

    A recipe whose lr schedule spans its budget is trained once per mark (:func:`budget_overrides`); the
    gradient norms are those of the longest run. Other recipes train once and are scored at every mark.
    """
    if budget_overrides(recipe, marks[0], args.unit) is None:
        return _train(recipe, recipe, dataset, args, marks, test_rows, {})
    curve: list[dict] = []
    for mark in marks:
        budget = budget_overrides(recipe, mark, args.unit)
        points, gradients = _train(recipe, f"{recipe}-{mark:g}", dataset, args, [mark], test_rows, budget)
        curve.extend(points)
    return curve, gradients


def _train(
    recipe: str, run_name: str, dataset: str, args, marks: list[float], test_rows, budget: dict
) -> tuple[list[dict], list[dict]]:
    """One training run of ``args.preset`` on ``dataset``'s CTA rows, scored at ``marks``.

    Starts from scratch: a checkpoint left in the run's folder (a time-limited or interrupted earlier run)
    is deleted rather than resumed, since a curve is timed from the first step.
    """
    shipped, overrides = RECIPES[recipe]
    output_dir = Path(args.work_dir) / f"{dataset}-{run_name}"
    shutil.rmtree(output_dir, ignore_errors=True)
    settings = {
        **overrides,
        **CURVE_SETTINGS,
        "preset": args.preset,
        "dataset_dir": args.dataset_dir,
        "datasets": dataset,
        "output_dir": str(output_dir),
        "seed": args.seed,
        **budget,
    }
    callback = WallClockEvaluation(marks, test_rows, unit=args.unit)
    gradients = GradientNormRecorder(every=10)
    model_args, data_args, training_args, _ = parse_training_arguments(shipped, settings)
    run_training(model_args, data_args, training_args, callbacks=[callback, gradients])
    return callback.results, gradients.records


def plot(results: dict, path: Path, xlabel: str, split: str) -> None:
    """One panel per dataset: macro-F1 of each recipe against the marks, logistic regression dashed."""
    datasets_ = list(results)
    figure, axes = plt.subplots(1, len(datasets_), figsize=(4.5 * len(datasets_), 3.6), squeeze=False)
    for axis, dataset in zip(axes[0], datasets_, strict=True):
        for recipe, curve in results[dataset]["recipes"].items():
            axis.plot([p["mark"] for p in curve], [p["macro_f1"] for p in curve], marker="o", label=recipe)
        axis.axhline(
            results[dataset]["logreg"]["macro_f1"], color="grey", linestyle="--", label="logistic regression"
        )
        axis.set(title=dataset, xlabel=xlabel, ylabel=f"{split} macro-F1", ylim=(0, 1))
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_outputs(results: dict, unit: str, split: str, output: Path) -> str:
    """Write ``<output>.md/.json/.png`` and the gradient plots; return the markdown table."""
    output.parent.mkdir(parents=True, exist_ok=True)
    marks = sorted(
        {p["mark"] for result in results.values() for curve in result["recipes"].values() for p in curve}
    )
    label = "min" if unit == "minutes" else "steps"
    header = "| dataset | recipe | " + " | ".join(f"{m:g} {label}" for m in marks) + " |"
    lines = [header, "|" + "---|" * (len(marks) + 2)]
    for dataset, result in results.items():
        for recipe, curve in result["recipes"].items():
            scores = {p["mark"]: f"{p['macro_f1']:.3f}" for p in curve}
            lines.append(f"| {dataset} | {recipe} | " + " | ".join(scores.get(m, "-") for m in marks) + " |")
        lines.append(
            f"| {dataset} | logistic regression ({result['logreg']['seconds']} s) | "
            + " | ".join(f"{result['logreg']['macro_f1']:.3f}" for _ in marks)
            + " |"
        )
    table = "\n".join(lines)
    output.with_suffix(".md").write_text(table + "\n")
    output.with_suffix(".json").write_text(
        json.dumps({"unit": unit, "split": split, "results": results}, indent=2)
    )
    xlabel = "training wall time (min)" if unit == "minutes" else "optimizer steps"
    plot(results, output.with_suffix(".png"), xlabel, split)
    for dataset, result in results.items():
        plot_gradient_norms(
            result["gradient_norms"], output.with_name(f"{output.name}_{dataset}_gradients.png"), dataset
        )
    return table


def merge_runs(paths: list[Path]) -> tuple[dict, str, str]:
    """Combine the JSON of runs made side by side (e.g. one recipe per core) into one result.

    A recipe's marks may come from several runs (``default+anneal`` trains one run per mark, so its marks can
    be spread over processes): its points are joined in mark order; a mark scored twice is an error.
    """
    runs = [json.loads(path.read_text()) for path in paths]
    if len({(run["unit"], run["split"]) for run in runs}) != 1:
        raise ValueError(
            f"{[str(p) for p in paths]} mix units or splits; merge runs made with the same settings."
        )
    merged: dict = {}
    for run in runs:
        for dataset, result in run["results"].items():
            target = merged.setdefault(
                dataset, {"logreg": result["logreg"], "recipes": {}, "gradient_norms": {}}
            )
            for recipe, curve in result["recipes"].items():
                points = target["recipes"].get(recipe, []) + curve
                marks = [point["mark"] for point in points]
                repeated = sorted({mark for mark in marks if marks.count(mark) > 1})
                if repeated:
                    raise ValueError(
                        f"{dataset} / {recipe} has mark(s) {repeated} in more than one run; "
                        "merge runs with different marks."
                    )
                target["recipes"][recipe] = sorted(points, key=lambda point: point["mark"])
            target["gradient_norms"].update(result["gradient_norms"])
    return merged, runs[0]["unit"], runs[0]["split"]


def main() -> None:
    """Run the recipes (or merge earlier runs) and write the table and plots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-dir", default="outputs/instructcell-data")
    parser.add_argument(
        "--datasets", default="bastidas_ponce_2019_pancreas,zheng2017_sorted_pbmc,kang2018_pbmc_ifnb_muscat"
    )
    parser.add_argument(
        "--recipes", default="paper,default", help=f"Comma-separated, among {', '.join(RECIPES)}."
    )
    parser.add_argument(
        "--minutes",
        default="2,5,10,15,20,30",
        help="Marks (minutes, or steps with --unit steps).",
    )
    parser.add_argument(
        "--unit",
        choices=("minutes", "steps"),
        default="minutes",
        help="steps: compare recipes at equal optimizer steps (ablations on a busy machine).",
    )
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="Held-out rows to score: choose recipes on validation, report on test.",
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (e.g. 1 per recipe when recipes run side by side, one per core).",
    )
    parser.add_argument("--work-dir", default="outputs/learning_curve_runs")
    parser.add_argument("--output", default="benchmarks/results/learning_curve")
    parser.add_argument(
        "--merge",
        default=None,
        help="Comma-separated JSON outputs of earlier runs to combine into --output (no training).",
    )
    args = parser.parse_args()
    if args.merge:
        results, unit, split = merge_runs([Path(p) for p in args.merge.split(",")])
        print(write_outputs(results, unit, split, Path(args.output)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    marks = [float(m) for m in args.minutes.split(",")]
    results = {}
    for dataset in args.datasets.split(","):
        train_rows, test_rows = (
            load_split(args.dataset_dir, split, tasks=["cta"], variant="instruct", datasets_names=[dataset])
            for split in ("train", args.split)
        )
        cells = ClassificationCells.from_rows(train_rows, test_rows, dataset_genes(args.dataset_dir))
        began = time.monotonic()
        predictions, _ = BASELINES["logistic_regression"].run(cells, seed=args.seed)
        logreg = classification_scores(predictions, test_rows)
        logreg["seconds"] = round(time.monotonic() - began, 1)
        results[dataset] = {"logreg": logreg, "recipes": {}, "gradient_norms": {}}
        for recipe in args.recipes.split(","):
            print(f"{dataset} / {recipe}", flush=True)
            curve, gradients = run_recipe(recipe, dataset, args, marks, test_rows)
            results[dataset]["recipes"][recipe] = curve
            results[dataset]["gradient_norms"][recipe] = gradients
    print(write_outputs(results, args.unit, args.split, Path(args.output)))


if __name__ == "__main__":
    main()
