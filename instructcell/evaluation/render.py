"""The one markdown renderer: every ``report.md`` is :func:`render_report` of its ``metrics.json``.

The schema is described in :mod:`instructcell.evaluation`. The report lists the run, the requests answered
in natural language, one table per metric family with every method (models and baselines) side by side, then
the optional sections (robustness, saliency, throughput, training throughput), what was skipped and the
figures. This module reads plain JSON values only, so an earlier ``metrics.json`` can be rendered again
without a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from instructcell.tasks import METRIC_FAMILIES, TASKS

__all__ = [
    "fmt",
    "load_note",
    "machine_line",
    "markdown_table",
    "method_rows",
    "method_title",
    "render_report",
]

#: Per metric family: the table's metric columns (key in a method entry, header).
FAMILY_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "classification": (
        ("accuracy", "accuracy"),
        ("macro_f1", "macro F1"),
        ("weighted_f1", "weighted F1"),
        ("answered_rate", "answered"),
    ),
    "generation": (
        ("signal_rate", "answered `<SIGNAL>`"),
        ("mmd", "MMD"),
        ("delta_sknn", "ΔsKNN"),
        ("pknn", "pKNN"),
        ("pknn_k10", "pKNN K=10"),
    ),
    "perturbation": (
        ("signal_rate", "answered `<SIGNAL>`"),
        ("r2_all", "R² all genes"),
        ("r2_top_degs", "R² top-100 DEGs"),
        ("change_pearson_all", "Δ Pearson all"),
        ("change_pearson_top_degs", "Δ Pearson top-100 DEGs"),
        ("mmd", "MMD (PCA)"),
        ("e_distance", "E-distance (PCA)"),
    ),
    "multicell": (
        ("accuracy", "accuracy"),
        ("cell_accuracy", "cells right"),
        ("answered_rate", "answered"),
    ),
}
FAMILY_PROTOCOLS: dict[str, str] = {
    "classification": (
        "InstructCell `score` picks the most likely label of the dataset's label set; `generate` maps the "
        "greedy answer to a label (unanswered = wrong; F1 over the answered cells). The baselines are "
        "fitted in this run on the training split's cells of the same dataset and predict the same test "
        "cells."
    ),
    "generation": (
        "One request per test cell (its own held-out instruction); every generator is asked for the same "
        "labels and counts. Cells are compared with the real test cells in one PCA-50 + UMAP embedding "
        "fitted on the real test cells (generated cells mapped in with `transform`); KNN metrics are "
        "averaged over K = 5, 10, 25, 50."
    ),
    "perturbation": (
        "One prediction per test row (a perturbed cell paired with a control cell of its type and donor; "
        "its own held-out instruction); every method predicts from the same control cells. Per "
        "perturbation and cell type: R² (squared Pearson) of mean log-normalized expression, predicted vs "
        "real, over all genes and the top-100 DEGs (real perturbed vs control, Wilcoxon); Pearson "
        "correlation of predicted and real change of the means; MMD and energy distance in a PCA of the "
        "real cells. The table shows means over the groups."
    ),
    "multicell": (
        "Each test row shows several held-out cells of one dataset, or a question after earlier turns, in a "
        "held-out template. InstructCell answers the whole prompt (greedy); accuracy counts whole answers "
        "(unanswered = wrong), *cells right* the task's partial credit (cells counted or labelled right, "
        "the right position, or the right label). *Single-cell calls* answer the same question from "
        "per-cell label probabilities: the model's own (each cell asked alone with its annotation test "
        "row; for a follow-up, the question without its earlier turns) and the logistic regression's."
    ),
}
#: Below this share of one CPU (CPU time / wall time of the process), a section was starved by other jobs.
MIN_CPU_SHARE = 0.8
_RUN_FIELDS: tuple[tuple[str, str], ...] = (
    ("model", "Model"),
    ("models", "Models"),
    ("dataset_dir", "Data"),
    ("data_source", "Data source"),
    ("variant", "Variant"),
    ("split", "Split"),
    ("recipe", "Recipe"),
    ("training", "Training"),
    ("max_test_cells", "Test cells per task and dataset at most (seeded subset)"),
    ("seed", "Seed"),
    ("timings", "Timings (s)"),
    ("section_seconds", "Section wall times (s)"),
    ("command", "Command"),
)
_CODE_FIELDS = frozenset({"model", "dataset_dir", "recipe", "command"})


def fmt(value: Any, digits: int = 3) -> str:
    """Format a value for a markdown table: floats with ``digits`` decimals, ``n/a`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int | None = None
) -> str:
    """Format a markdown table; floats with 3 decimals, None/NaN as ``n/a``.

    Parameters
    ----------
    header : sequence of str
        ``(n_columns,)`` column titles.
    rows : sequence of sequences
        ``(n_rows, n_columns)`` values.
    numeric_from : int, optional
        Right-align the columns from this index on.

    Returns
    -------
    str
        The table's lines joined by newlines.
    """
    width = len(header)
    bad = [i for i, row in enumerate(rows) if len(row) != width]
    if bad:
        raise ValueError(f"Rows {bad} do not have {width} columns.")
    align = ["---" if numeric_from is None or i < numeric_from else "---:" for i in range(width)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(fmt(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def method_title(name: str, entry: Mapping[str, Any], methods: Mapping[str, Any]) -> str:
    """Name a method in reports: its title in ``run["methods"]``, with its label prediction method if any."""
    title = methods.get(name, {}).get("title", name)
    return f"{title} ({entry['method']})" if "method" in entry else title


def method_rows(
    family: str, by_task: Mapping[str, Mapping[str, Any]], methods: Mapping[str, Any]
) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of a metric family's table: one row per task, dataset and method.

    Parameters
    ----------
    family : {"classification", "generation", "perturbation", "multicell"}
    by_task : mapping
        ``scores`` of ``metrics.json`` restricted to the family's tasks: task -> dataset -> entry.
    methods : mapping
        ``run["methods"]`` (titles).

    Returns
    -------
    header : list of str
    rows : list of list
    """
    columns = FAMILY_COLUMNS[family]
    generation = family == "generation"
    header = ["task", "dataset", "n test", "method", *(["cells / requested"] if generation else [])]
    header += [title for _, title in columns] + ["s"]
    rows = []
    for task, by_dataset in by_task.items():
        for dataset, entry in by_dataset.items():
            for name, values in entry["methods"].items():
                row = [task.upper(), dataset, entry["n_test"], method_title(name, values, methods)]
                if generation:
                    row.append(f"{values['n_cells']} / {sum(entry['requested'].values())}")
                row += [values.get(key) for key, _ in columns]
                seconds = values.get("seconds")
                rows.append([*row, None if seconds is None else f"{seconds:.1f}"])
    return header, rows


def machine_line(info: Mapping[str, Any]) -> str:
    """Say where and with how many threads a run went."""
    return (
        f"Ran on {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['usable_cpus']} usable), torch "
        f"threads {info['torch_threads']} (interop {info['torch_interop_threads']}), "
        f"OMP_NUM_THREADS={info['OMP_NUM_THREADS']}, MKL_NUM_THREADS={info['MKL_NUM_THREADS']}, nice "
        f"{info['nice']}, load average (1, 5, 15 min) at start {info.get('load_average_1_5_15')}"
        + (f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU")
        + "."
    )


def load_note(run: Mapping[str, Any], section: str) -> str:
    """Say how much CPU the run got during a section; flag its timings when other jobs took it.

    With ``OMP_NUM_THREADS=1`` torch computes on one thread (interop, autograd and Arrow threads can add
    more), so a section always has at least one CPU's worth of work: a CPU time / wall time share well below
    1 means it waited for the CPUs. The load average at the section's end is shown too. Empty when the run
    did not measure the section.
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
            " **Other jobs took the CPUs: its timings (seconds, cells/s, steps/s) are lower bounds, not "
            "this machine's speed.**"
        )
    return note


def _run_lines(run: Mapping[str, Any]) -> list[str]:
    lines = [machine_line(run["machine"]), ""] if "machine" in run else []
    for key, label in _RUN_FIELDS:
        value = run.get(key)
        if value in (None, "", {}, []):
            continue
        if isinstance(value, Mapping):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        lines.append(f"- {label}: `{value}`" if key in _CODE_FIELDS else f"- {label}: {value}")
    if "wall_seconds" in run:
        where = f" on {run['device']} ({run.get('torch_threads')} torch threads)" if "device" in run else ""
        seconds = run["wall_seconds"]
        lines.append(f"- Wall time: **{seconds:.0f} s** ({seconds / 60:.1f} min){where}")
    lines += [f"- Note: {note}" for note in run.get("notes", [])]
    return lines


def _requests_lines(requests: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Requests in natural language", ""]
    for request in requests:
        title = TASKS[request["task"]].title if request["task"] in TASKS else request["task"]
        answer = f"*{request['answer']}*" if request["answer"].strip() else "(empty answer)"
        detail = f" — {request['detail']}" if request.get("detail") else ""
        lines += [f"**{title}** ({request['dataset']})", "", f"> {request['instruction']}", ""]
        lines += [f"Answer: {answer}{detail}", ""]
    return lines


def _perturbation_group_lines(by_task: Mapping[str, Any], methods: Mapping[str, Any]) -> list[str]:
    """One row per perturbation / cell type group and method: the scores the family table averages."""
    keys = [(key, title) for key, title in FAMILY_COLUMNS["perturbation"] if key != "signal_rate"]
    header = [
        "task",
        "dataset",
        "perturbation / cell type",
        "n test",
        "method",
        *[title for _, title in keys],
    ]
    rows = [
        [task.upper(), dataset, group, values["n_test"], method_title(name, scores, methods)]
        + [scores.get(key) for key, _ in keys]
        for task, by_dataset in by_task.items()
        for dataset, entry in by_dataset.items()
        for group, values in entry["groups"].items()
        for name, scores in values["methods"].items()
    ]
    return ["", "Per perturbation and cell type:", "", markdown_table(header, rows, numeric_from=3)]


def _by_size_lines(by_task: Mapping[str, Any], methods: Mapping[str, Any]) -> list[str]:
    """Accuracy of every method by the cells a prompt shows, or by its earlier turns (multicell family).

    A group question's accuracy is also broken down by the earlier turns it was asked after (``by_turns``).
    """
    lines = ["", "Accuracy by the cells a question shows, or by a follow-up's earlier turns:"]
    for task, by_dataset in by_task.items():
        for dataset, entry in by_dataset.items():
            names = list(entry["methods"])
            titles = [method_title(name, entry["methods"][name], methods) for name in names]
            lines += ["", f"**{task} {dataset}**", ""]
            breakdowns = [(entry["by_size"]["variable"], entry["by_size"]["groups"])]
            if "by_turns" in entry:
                breakdowns.append(("asked after earlier turns", entry["by_turns"]))
            for variable, groups in breakdowns:
                rows = [
                    [key, group["n"], *(group["methods"].get(name) for name in names)]
                    for key, group in sorted(groups.items(), key=lambda item: int(item[0]))
                ]
                lines += ["", markdown_table([variable, "n", *titles], rows, numeric_from=1)]
    return lines


#: Per metric family, lines after its table (e.g. the per-group scores behind the perturbation means).
_FAMILY_DETAILS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], list[str]]] = {
    "perturbation": _perturbation_group_lines,
    "multicell": _by_size_lines,
}


def _family_lines(family: str, by_task: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    methods = run.get("methods", {})
    titles = [TASKS[task].title if task in TASKS else task for task in by_task]
    heading = ", ".join(titles)
    lines = [f"## {heading[:1].upper()}{heading[1:]} (test split)", "", FAMILY_PROTOCOLS[family], ""]
    present = dict.fromkeys(name for d in by_task.values() for e in d.values() for name in e["methods"])
    for name in present:
        description = methods.get(name, {}).get("description")
        if description:
            lines.append(f"- **{methods[name]['title']}**: {description}")
    header, rows = method_rows(family, by_task, methods)
    lines += ["", markdown_table(header, rows, numeric_from=header.index("method") + 1)]
    if family in _FAMILY_DETAILS:
        lines += _FAMILY_DETAILS[family](by_task, methods)
    notes = []
    for by_dataset in by_task.values():
        for dataset, entry in by_dataset.items():
            if entry.get("markers"):
                shown = "; ".join(f"{label}: {', '.join(genes)}" for label, genes in entry["markers"].items())
                notes.append(f"- Marker genes of {dataset} (ranked on the real test cells): {shown}")
            for name, values in entry["methods"].items():
                if values.get("details"):
                    shown = ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in values["details"].items())
                    notes.append(f"- {method_title(name, values, methods)} on {dataset}: {shown}")
    note = load_note(run, family)
    return [*lines, *(["", *notes] if notes else []), *(["", note] if note else [])]


def _robustness_lines(section: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Robustness to the instruction's wording (held-out templates)",
        "",
        f"The same test cells are asked with {section['templates_per_group']} test-split templates that "
        f"list the label options in the prompt and {section['templates_per_group']} that do not (drawn from "
        "the template bank, none used in training); each cell's instruction is re-rendered with every "
        f"template as the dataset builder would have. Method: `{section['method']}`. sd = sample standard "
        f"deviation across templates (ddof = {section['sd_ddof']}).",
        "",
    ]
    header = [
        "task",
        "dataset",
        "cells",
        "templates",
        "accuracy mean ± sd",
        "macro F1 mean ± sd",
        "accuracy min–max",
    ]
    rows = []
    for task, by_dataset in section["results"].items():
        for dataset, result in by_dataset.items():
            for group, summary in result["summary"].items():
                acc, f1 = summary["accuracy"], summary["macro_f1"]
                rows.append(
                    [
                        task.upper(),
                        dataset,
                        result["n"],
                        f"{group.replace('_', ' ')} ({acc['n_templates']})",
                        f"{fmt(acc['mean'])} ± {fmt(acc['sd'])}",
                        f"{fmt(f1['mean'])} ± {fmt(f1['sd'])}",
                        f"{fmt(acc['min'])}–{fmt(acc['max'])}",
                    ]
                )
    return [*lines, markdown_table(header, rows, numeric_from=2)]


def _saliency_lines(section: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Marker genes by gradient saliency",
        "",
        "Per test cell: gradient of the loss (negative log-likelihood of its true answer) with respect to "
        "the input counts; genes kept where the gradient is negative (more of the gene lowers the loss) "
        "and the count is positive; |gradient| min-max normalized per cell, averaged over the cells of "
        "each true label. Full list: `saliency_top_genes.csv`.",
        "",
    ]
    for task, by_dataset in section.items():
        for dataset, entry in by_dataset.items():
            rows = [
                [
                    label,
                    entry["n_cells"][label],
                    ", ".join(f"{i['gene']} ({i['saliency']:.2f})" for i in items) or "(none)",
                ]
                for label, items in entry["top_genes"].items()
            ]
            lines += [
                f"**{task.upper()} {dataset}**",
                "",
                markdown_table(["label", "cells", "top genes (mean saliency)"], rows),
                "",
            ]
    return lines


def _throughput_lines(section: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Annotation throughput and memory",
        "",
        f"Model `{section['model']}`, test cells of {section['dataset']} ({section['n_labels']} labels), "
        f"batch size {section['batch_size']}; generating modes write exactly {section['answer_tokens']} "
        "tokens (median label length). RSS before / peak RSS: the process's resident memory before the "
        "mode and its peak during it (model and data included; the difference is what the mode itself "
        "needs).",
        "",
    ]
    base = section["modes"][-1]["cells_per_s"]
    header = [
        "mode",
        "cells",
        "s",
        "cells/s",
        "x vs last row",
        "RSS before MB",
        "peak RSS MB",
        "py peak MB",
        "max RSS MB",
    ]
    rows = [
        [
            m["mode"],
            m["cells"],
            f"{m['seconds']:.2f}",
            f"{m['cells_per_s']:.1f}",
            f"{m['cells_per_s'] / base:.1f}",
            f"{m['rss_before_mb']:.0f}",
            f"{m['peak_rss_mb']:.0f}",
            f"{m['py_peak_mb']:.1f}",
            f"{m['max_rss_mb']:.0f}",
        ]
        for m in section["modes"]
    ]
    note = load_note(run, "throughput")
    return [*lines, markdown_table(header, rows, numeric_from=1), *(["", note] if note else [])]


def _training_lines(section: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Training throughput",
        "",
        f"`run_training` with `max_steps={section['steps']}` on the {section['tasks']} mix "
        f"({section['variant']} variant, {section['n_train_rows']} training rows, recipe "
        f"`{section['recipe']}`, its cell-decoder stage off); the first step is not timed.",
        "",
    ]
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
        section["preset"],
        section["tasks"],
        f"{section['n_parameters'] / 1e6:.1f}M",
        section["examples_per_step"],
        section["timed_steps"],
        section["steps_per_s"],
        section["examples_per_s"],
        section["first_step_seconds"],
        section["setup_seconds"],
    ]
    note = load_note(run, "training")
    return [*lines, markdown_table(header, [row], numeric_from=2), *(["", note] if note else [])]


#: The optional sections after the score tables, in report order: ``render(section, run) -> lines``.
_SECTION_RENDERERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], list[str]]] = {
    "robustness": _robustness_lines,
    "saliency": _saliency_lines,
    "throughput": _throughput_lines,
    "training": _training_lines,
}


def render_report(metrics: Mapping[str, Any]) -> str:
    """Render the markdown report of one ``metrics.json`` (schema in :mod:`instructcell.evaluation`).

    Parameters
    ----------
    metrics : mapping
        ``title``, ``run``, ``scores``, optional ``sections`` and ``figures``.

    Returns
    -------
    str
        The report, ending with a newline.
    """
    run = metrics.get("run", {})
    sections = metrics.get("sections", {})
    lines = [f"# {metrics.get('title', 'InstructCell report')}", "", *_run_lines(run), ""]
    if sections.get("requests"):
        lines += _requests_lines(sections["requests"])
    scores = metrics.get("scores", {})
    for family in METRIC_FAMILIES:
        by_task = {
            task: by_dataset
            for task, by_dataset in scores.items()
            if by_dataset and task in TASKS and TASKS[task].metric_family == family
        }
        if by_task:
            lines += [*_family_lines(family, by_task, run), ""]
    for name, render in _SECTION_RENDERERS.items():
        if sections.get(name):
            lines += [*render(sections[name], run), ""]
    if run.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in run["skipped"].items()) + ".", ""]
    if metrics.get("figures"):
        lines += ["## Figures", ""]
        for title, path in metrics["figures"].items():
            lines += [f"![{title}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"
