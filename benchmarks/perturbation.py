"""Perturbation response on held-out cell types (scGen's protocol): InstructCell vs the linear baselines.

    python benchmarks/perturbation.py \
        --data ../shared/datasets/kang2018_pbmc_ifnb_muscat/kang2018_pbmc_ifnb_muscat.h5ad \
        --work-dir outputs/perturbation --output benchmarks/results/perturbation

For each cell type in turn, its perturbed cells are left out of training; a model (recipe ``perturbation``:
the small preset on the ``prp`` task) is trained on the other types' (control -> perturbed) pairs and on every
control cell (control rows), then predicts the held-out type's perturbed cells, one per perturbed cell, each
from a control cell of the same type and donor (the pairs of ``datasets_builder.perturbation_pairs``).

The main stage is trained once per held-out type; the cell decoder stage is then fitted once per VAE design
(``--designs``): ``transfer`` encodes the control cell and decodes it under the ``<SIGNAL>`` condition,
``prior`` samples ``z ~ N(0, I)`` (the paper's generation). The design is chosen on the validation donor's
cells (``--validation-donors``) and reported on the other donors' cells (test), next to the baselines of the
same run on the same cells: *no change* (the control cells) and *additive* (control cells + the mean
perturbed - control shift of the other cell types). Metrics
(:mod:`instructcell.evaluation.metrics.perturbation`):
R² of mean log-normalized expression over all genes and the top-100 DEGs, Pearson correlation of predicted and
real change, MMD and energy distance in PCA space.

A held-out type whose results are in ``<work-dir>/results/`` is not trained again; an interrupted training
resumes from its last checkpoint. Writes ``<output>.md``, ``<output>.json``, ``<output>.png`` (predicted vs
real mean expression of the top DEGs) and ``<output>_counts.png`` (library sizes and detected genes of
predicted and real cells).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anndata
import datasets
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmarks import machine_info  # noqa: E402

from datasets_builder import InstructCellDatasetBuilder, PerturbationSource, write_gene_vocab  # noqa: E402
from instructcell.evaluation.baselines import BASELINES, PerturbationCells  # noqa: E402
from instructcell.evaluation.candidates import generate_for_requests  # noqa: E402
from instructcell.evaluation.cells import sparse_cells  # noqa: E402
from instructcell.evaluation.metrics.generation import normalize_log1p  # noqa: E402
from instructcell.evaluation.metrics.perturbation import (  # noqa: E402
    PERTURBATION_KEYS,
    count_statistics,
    perturbation_metrics,
    top_degs,
)
from instructcell.evaluation.plotting import plot_count_distributions, plot_perturbation_means  # noqa: E402
from instructcell.evaluation.render import fmt, machine_line, markdown_table  # noqa: E402
from instructcell.hub import save_for_hub  # noqa: E402
from instructcell.tasks import CONTROL_PERTURBATION  # noqa: E402
from instructcell.training import parse_training_arguments, run_training, training_budget  # noqa: E402
from instructcell.training.cell_decoder import fit_cell_decoder  # noqa: E402

DESIGNS: dict[str, bool] = {"transfer": True, "prior": False}  # design -> config.vae_encode_input_cell
BASELINE_NAMES: tuple[str, ...] = ("no_change", "additive")
HEADLINE = "r2_top_degs"  # the validation metric that chooses the design
METRIC_TITLES: dict[str, str] = {
    "r2_all": "R² all genes",
    "r2_top_degs": "R² top-100 DEGs",
    "change_pearson_all": "Δ Pearson all",
    "change_pearson_top_degs": "Δ Pearson top-100 DEGs",
    "mmd": "MMD (PCA)",
    "e_distance": "E-distance (PCA)",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help=".h5ad with control and perturbed cells")
    parser.add_argument("--work-dir", default=Path("outputs/perturbation"), type=Path)
    parser.add_argument("--output", default=Path("benchmarks/results/perturbation"), type=Path)
    parser.add_argument("--condition-key", default="condition")
    parser.add_argument("--control-value", default="control")
    parser.add_argument("--cell-type-key", default="cell_type")
    parser.add_argument("--perturbation", default="interferon beta", help="the perturbation in words")
    parser.add_argument("--donor-column", default="sample_id", help="obs column holding the donor")
    parser.add_argument(
        "--donor-regex", default=r"(\d+)$", help="the donor is this regex's first group of --donor-column"
    )
    parser.add_argument("--validation-donors", default="107", help="comma-separated donors for validation")
    parser.add_argument("--cell-types", default="", help="comma-separated held-out types (default: all)")
    parser.add_argument("--designs", default="transfer,prior", help=f"VAE designs among {list(DESIGNS)}")
    parser.add_argument("--recipe", default="perturbation")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    parser.add_argument("--cell-decoder-steps", type=int, default=None, help="override the recipe's")
    parser.add_argument("--preset", default=None, help="override the recipe's preset (tiny for a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="held-out types trained at once, one process (one torch thread) each; on a shared machine "
        "several processes get more of the CPUs than one",
    )
    args = parser.parse_args(argv)
    unknown = [d for d in args.designs.split(",") if d not in DESIGNS]
    if unknown:
        parser.error(f"unknown designs {unknown}; choose among {list(DESIGNS)}")
    return args


def prepare_cells(args: argparse.Namespace, work: Path) -> anndata.AnnData:
    """Write the input file with a ``donor`` column to ``<work>/cells.h5ad`` (once) and return it."""
    path = work / "cells.h5ad"
    if path.exists():
        return anndata.read_h5ad(path)
    adata = anndata.read_h5ad(args.data)
    if args.donor_column not in adata.obs:
        raise SystemExit(f"error: {args.data} has no obs column {args.donor_column!r} (--donor-column).")
    donors = adata.obs[args.donor_column].astype(str).str.extract(args.donor_regex, expand=False)
    if donors.isna().any():
        raise SystemExit(
            f"error: --donor-regex {args.donor_regex!r} does not match every {args.donor_column}."
        )
    adata.obs["donor"] = donors.to_numpy()
    work.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return adata


def build_rows(args: argparse.Namespace, work: Path, adata: anndata.AnnData) -> datasets.Dataset:
    """Every ``prp`` row of the file (all hash splits: the protocol holds out cell types instead)."""
    path = work / "rows.parquet"
    if not path.exists():
        source = PerturbationSource(
            str(work / "cells.h5ad"),
            task="prp",
            name="kang2018_pbmc_ifnb_muscat",
            label_key=args.cell_type_key,
            condition_key=args.condition_key,
            control_value=args.control_value,
            pair_key="donor",
            perturbation=args.perturbation,
        )
        builder = InstructCellDatasetBuilder(
            config_name="prp-instruct",
            cache_dir=str(work / "hf-cache"),
            sources=[source],
            gene_vocab=list(adata.var_names),
            progress=False,
        )
        builder.download_and_prepare()
        splits = [builder.as_dataset(split) for split in ("train", "validation", "test")]
        datasets.concatenate_datasets(splits).to_parquet(str(path))
    return datasets.load_dataset("parquet", data_files=str(path))["train"]


def held_out_folder(
    rows: datasets.Dataset, cell_type: str, folder: Path, genes: list[str]
) -> datasets.Dataset:
    """Write the training rows without ``cell_type``'s perturbed cells; return them."""
    keep = [
        i
        for i, (label, perturbation) in enumerate(zip(rows["label"], rows["perturbation"], strict=True))
        if not (label == cell_type and perturbation != CONTROL_PERTURBATION)
    ]
    train = rows.select(keep)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "train.parquet").exists():
        train.to_parquet(str(folder / "train.parquet"))
        # The Trainer's evaluation is off in the recipe; the folder format still wants a validation file.
        train.select(range(min(64, len(train)))).to_parquet(str(folder / "validation.parquet"))
        write_gene_vocab(genes, folder / "gene_vocab.txt")
    return train


def train_held_out(args: argparse.Namespace, data: Path, output: Path) -> tuple[Any, Any, Any, dict]:
    """Train the main stage (or resume it); the cell decoder stage is fitted per design afterwards."""
    overrides = {
        "dataset_dir": str(data),
        "output_dir": str(output),
        "cell_decoder_steps": 0,
        "report_to": "none",
        "disable_tqdm": True,
        "seed": args.seed,
        **({"max_steps": args.max_steps} if args.max_steps else {}),
        **({"preset": args.preset} if args.preset else {}),
    }
    model_args, data_args, training_args, _ = parse_training_arguments(args.recipe, overrides)
    start, cpu = time.time(), time.process_time()
    trainer, processor, interrupted = run_training(model_args, data_args, training_args)
    if interrupted or training_budget(trainer)["stopped_by_time_cap"]:
        raise SystemExit("Training stopped before its steps: rerun the same command to resume.")
    wall = time.time() - start
    recipe_steps = parse_training_arguments(args.recipe)[2].cell_decoder_steps
    info = {
        "steps": trainer.state.global_step,
        "cell_decoder_steps": args.cell_decoder_steps or recipe_steps,
        "seconds": round(wall, 1),
        "cpu_share": round((time.process_time() - cpu) / max(wall, 1e-9), 2),
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    return trainer, processor, training_args, info


def fit_design(trainer, processor, training_args, design: str, steps: int, output: Path):
    """Copy the trained model and fit its VAE with one design on frozen ``<SIGNAL>`` states."""
    model = copy.deepcopy(trainer.model)
    model.config.vae_encode_input_cell = DESIGNS[design]
    args = copy.copy(training_args)
    args.output_dir = str(output / design)
    fit_cell_decoder(
        model,
        processor,
        trainer.train_dataset,
        args,
        steps=steps,
        learning_rate=training_args.cell_decoder_learning_rate,
        batch_size=training_args.cell_decoder_batch_size,
    )
    return model.eval()


def score_held_out(
    args: argparse.Namespace,
    cell_type: str,
    rows: datasets.Dataset,
    train: datasets.Dataset,
    donors: dict[str, str],
    models: dict[str, tuple[Any, Any]],
    genes: list[str],
) -> dict[str, Any]:
    """Metrics of every design and baseline on the validation and test donors' cells of ``cell_type``."""
    n_genes = len(genes)
    perturbed = rows.filter(
        lambda label, p: label == cell_type and p != CONTROL_PERTURBATION,
        input_columns=["label", "perturbation"],
    )
    controls = rows.filter(
        lambda label, p: label == cell_type and p == CONTROL_PERTURBATION,
        input_columns=["label", "perturbation"],
    )
    validation = {d.strip() for d in args.validation_donors.split(",")}
    train_pairs = train.filter(lambda p: p != CONTROL_PERTURBATION, input_columns=["perturbation"])
    result: dict[str, Any] = {}
    for split in ("validation", "test"):
        in_split = [(donors[c] in validation) == (split == "validation") for c in perturbed["cell_id"]]
        query = perturbed.select(np.flatnonzero(in_split))
        in_split = [(donors[c] in validation) == (split == "validation") for c in controls["cell_id"]]
        control_cells = sparse_cells(controls.select(np.flatnonzero(in_split)), "target", n_genes)
        real = normalize_log1p(sparse_cells(query, "target", n_genes))
        control = normalize_log1p(control_cells)
        degs = top_degs(real, control)
        entry: dict[str, Any] = {
            "n_perturbed": len(query),
            "n_control": control_cells.shape[0],
            "donors": sorted({donors[c] for c in query["cell_id"]}),
            "top_degs": [genes[i] for i in degs],
            "methods": {},
            "means": {"real": _means(real, degs), "control": _means(control, degs)},
            "counts": {
                "real": count_statistics(sparse_cells(query, "target", n_genes)),
                "control": count_statistics(control_cells),
            },
        }
        cells = PerturbationCells.from_rows(train_pairs, query, genes)
        for name in BASELINE_NAMES:
            predicted, details = BASELINES[name].run(cells, seed=args.seed)
            entry["methods"][name] = perturbation_metrics(predicted, real, control, degs, seed=args.seed)
            entry["means"][name] = _means(predicted, degs)
        for design, (model, processor) in models.items():
            answered = generate_for_requests(model, processor, query, seed=args.seed, batch_size=32)
            predicted = normalize_log1p(answered.counts) if answered.counts.shape[0] else None
            scores = (
                perturbation_metrics(predicted, real, control, degs, seed=args.seed)
                if answered.counts.shape[0] >= 2
                else dict.fromkeys(PERTURBATION_KEYS)  # the model did not answer with <SIGNAL>: no cells
            )
            entry["methods"][design] = {**scores, "signal_rate": answered.n_signal / len(query)}
            entry["means"][design] = None if predicted is None else _means(predicted, degs)
            entry["counts"][design] = count_statistics(answered.counts)
        result[split] = entry
    return result


def _means(values, genes: Sequence[int]) -> list[float]:
    return np.asarray(values.mean(axis=0)).ravel()[np.asarray(genes)].round(4).tolist()


def choose_design(results: dict[str, Any], designs: Sequence[str]) -> str:
    """Return the design with the highest mean validation ``HEADLINE`` over the held-out types."""

    def mean_validation(design: str) -> float:
        values = [r["validation"]["methods"][design][HEADLINE] for r in results.values()]
        return float(np.mean([v for v in values if v is not None] or [-np.inf]))

    return max(designs, key=mean_validation)


def summary_rows(results: dict[str, Any], split: str, methods: Sequence[str]) -> list[list[Any]]:
    """One row per held-out type and method, then mean ± sd over types per method."""
    rows = []
    for cell_type, result in results.items():
        entry = result[split]
        for method in methods:
            values = entry["methods"][method]
            rows.append(
                [cell_type, entry["n_perturbed"], method, *[values.get(k) for k in PERTURBATION_KEYS]]
            )
    for method in methods:
        cells = []
        for key in PERTURBATION_KEYS:
            values = [r[split]["methods"][method].get(key) for r in results.values()]
            values = [v for v in values if v is not None]
            cells.append(
                f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "n/a"
            )
        rows.append(["**mean ± sd over types**", "", method, *cells])
    return rows


def wins(results: dict[str, Any], split: str, method: str, against: str = "additive") -> dict[str, str]:
    """On how many held-out types ``method`` beats ``against`` on the headline metrics."""
    out = {}
    for key in ("r2_top_degs", "change_pearson_top_degs"):
        better = sum(
            (r[split]["methods"][method][key] or -np.inf) > (r[split]["methods"][against][key] or -np.inf)
            for r in results.values()
        )
        out[key] = f"{better} of {len(results)}"
    return out


def figures(results: dict[str, Any], chosen: str, output: Path) -> dict[str, str]:
    """Draw the top-DEG and count-distribution figures of the test donors; return their file names."""
    panels = {}
    for cell_type, result in results.items():
        test = result["test"]
        panels[f"{cell_type}: top-100 DEGs"] = {
            "real": test["means"]["real"],
            **{
                f"{name} (R² {fmt(test['methods'][name]['r2_top_degs'], 2)})": test["means"][name]
                for name in (chosen, "additive", "no_change")
            },
        }
    names = {"means": f"{output.name}.png", "counts": f"{output.name}_counts.png"}
    plot_perturbation_means(
        output.parent / names["means"],
        "Held-out cell types (test donors): predicted vs real mean expression of the top DEGs",
        panels,
    )
    statistics = {
        name: {
            key: np.concatenate([r["test"]["counts"][name][key] for r in results.values()])
            for key in ("library_size", "detected_genes")
        }
        for name in ("real", "control", chosen)
    }
    statistics = {
        {"real": "real perturbed", "control": "control"}.get(k, f"predicted ({k})"): v
        for k, v in statistics.items()
    }
    plot_count_distributions(
        output.parent / names["counts"],
        "Predicted perturbed cells are integer counts like the real ones (held-out types, test donors)",
        statistics,
    )
    return names


def render(report: dict[str, Any]) -> str:
    """Render the markdown report."""
    results, chosen, designs = report["results"], report["chosen_design"], report["designs"]
    header = ["held-out type", "perturbed cells", "method", *[METRIC_TITLES[k] for k in PERTURBATION_KEYS]]
    methods = [chosen, *BASELINE_NAMES]
    run = report["run"]
    lines = [
        "# Perturbation response on held-out cell types",
        "",
        f'Data: `{run["data"]}`; perturbation "{run["perturbation"]}". '
        "For each cell type its perturbed cells are "
        "left out of training; the model and the baselines predict them from control cells of the same type "
        "and donor. Validation donors "
        f"{run['validation_donors']} choose the VAE design; the test table is on the other donors' cells.",
        "",
        f"- Recipe `{run['recipe']}` ({run['preset'] or 'its preset'}): {run['steps']} main-stage optimizer "
        f"steps and {run['cell_decoder_steps']} cell-decoder steps per held-out type and design.",
        f"- Designs compared on validation: {', '.join(designs)}; chosen: **{chosen}** (highest mean "
        f"validation {METRIC_TITLES[HEADLINE]}).",
        f"- {run['machine_line']}",
        f"- Command: `{run['command']}`",
        "- Main stage per held-out type (wall time, this process's CPU time / wall time, load average at its "
        "end; the steps, not the minutes, are the budget): "
        + ", ".join(
            f"{t} {r['training']['seconds'] / 60:.1f} min at {r['training']['cpu_share']:.0%} of a CPU "
            f"(load {r['training']['load_average_end'][0]:.1f})"
            for t, r in results.items()
        )
        + ".",
        f"- This invocation: {run['wall_seconds'] / 60:.1f} min (held-out types already scored are read from "
        "the work folder).",
        "",
        "## Test (held-out types, test donors)",
        "",
        markdown_table(header, summary_rows(results, "test", methods), numeric_from=3),
        "",
        f"InstructCell ({chosen}) beats the additive baseline on "
        + "; ".join(f"{METRIC_TITLES[k]}: {v} types" for k, v in wins(results, "test", chosen).items())
        + ".",
        "",
        "## Validation (design choice)",
        "",
        markdown_table(
            header, summary_rows(results, "validation", [*designs, *BASELINE_NAMES]), numeric_from=3
        ),
        "",
        "## Figures",
        "",
        f"![predicted vs real mean expression of the top DEGs]({report['figures']['means']})",
        "",
        f"![library sizes and detected genes]({report['figures']['counts']})",
        "",
    ]
    return "\n".join(lines)


def run_in_processes(argv: Sequence[str], cell_types: Sequence[str], work: Path, jobs: int) -> None:
    """Train and score the held-out types not yet done, ``jobs`` processes at a time (logs in ``work``)."""
    todo = [t for t in cell_types if not (work / "results" / f"{t}.json").exists()]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run_one(cell_type: str) -> int:
        command = [sys.executable, __file__, *argv, "--cell-types", cell_type, "--jobs", "1"]
        with open(work / f"{cell_type.replace(' ', '_')}.log", "w") as log:
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment).returncode

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run_one, todo))
    missing = [t for t in todo if not (work / "results" / f"{t}.json").exists()]
    if missing:
        raise SystemExit(f"error: held-out runs {missing} did not finish: see their logs in {work}.")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print and write the report."""
    args = parse_args(argv)
    start = time.time()
    work = args.work_dir
    adata = prepare_cells(args, work)
    genes = [str(g) for g in adata.var_names]
    donors = dict(zip(adata.obs_names.astype(str), adata.obs["donor"].astype(str), strict=True))
    rows = build_rows(args, work, adata)
    cell_types = [c.strip() for c in args.cell_types.split(",") if c.strip()] or sorted(set(rows["label"]))
    designs = args.designs.split(",")
    results: dict[str, Any] = {}
    (work / "results").mkdir(parents=True, exist_ok=True)
    if args.jobs > 1:
        run_in_processes(argv if argv is not None else sys.argv[1:], cell_types, work, args.jobs)
    for cell_type in cell_types:
        cached = work / "results" / f"{cell_type}.json"
        if cached.exists():
            results[cell_type] = json.loads(cached.read_text())
            continue
        folder = work / cell_type.replace(" ", "_")
        train = held_out_folder(rows, cell_type, folder / "data", genes)
        trainer, processor, training_args, info = train_held_out(args, folder / "data", folder / "model")
        models = {}
        for design in designs:
            model = fit_design(trainer, processor, training_args, design, info["cell_decoder_steps"], folder)
            save_for_hub(model, processor, folder / design / "final")
            models[design] = (model, processor)
        result = score_held_out(args, cell_type, rows, train, donors, models, genes)
        result["training"] = info
        cached.write_text(json.dumps(result))
        results[cell_type] = result
        print(
            f"{cell_type}: "
            + ", ".join(f"{m} R² top DEGs {fmt(v[HEADLINE])}" for m, v in result["test"]["methods"].items()),
            flush=True,
        )
    chosen = choose_design(results, designs)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))["training"]
    report = {
        "run": {
            "data": str(args.data),
            "perturbation": args.perturbation,
            "validation_donors": args.validation_donors,
            "recipe": args.recipe,
            "preset": args.preset,
            "steps": first["steps"],
            "cell_decoder_steps": first["cell_decoder_steps"],
            "machine": machine_info(),
            "machine_line": machine_line(machine_info()),
            "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "wall_seconds": round(time.time() - start, 1),
        },
        "designs": designs,
        "chosen_design": chosen,
        "results": results,
        "figures": figures(results, chosen, args.output),
    }
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = render(report)
    args.output.with_suffix(".md").write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
