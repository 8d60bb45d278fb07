"""Questions about several cells and follow-up turns: the model's answers against per-cell answers.

    python benchmarks/multicell.py --model outputs/small-multicell/final \
        --dataset-dir outputs/multicell-data \
        --chat-file ../shared/datasets/kang2018_pbmc_ifnb_muscat/kang2018_pbmc_ifnb_muscat.h5ad \
        --output benchmarks/results/multicell

Runs :func:`instructcell.evaluation.suite.run_evaluation` on the test split (held-out cells, held-out
templates) for cell type annotation and every task of the ``multicell`` family: for each task and dataset, the
model's answer to the whole prompt next to the same question answered from per-cell calls (the model's own,
each cell asked alone; for a follow-up, the question without its earlier turns) and from logistic
regression's. Then a scripted five-turn ``instructcell chat`` conversation over a real file
(:func:`scripted_chat`): every answer is the model's, and each is checked against the file's labels.
Prints the tables and writes ``<output>.md``, ``<output>.json`` and ``<output>.png`` (accuracy against the
number of cells in a question, and against the earlier turns of a follow-up).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from datasets_builder.splits import split_of
from instructcell.cli.chat import ChatSession
from instructcell.evaluation.render import fmt, markdown_table
from instructcell.evaluation.suite import EvaluationConfig, run_evaluation
from instructcell.inference import load_pipeline
from instructcell.tasks import get_task, tasks_of_family
from modeling_instructcell.answer_extraction import extract_label

#: The methods of every multicell table, in column order: the model, its single-cell calls, the baseline.
METHODS = {
    "instructcell": "InstructCell (whole prompt)",
    "instructcell_cells": "InstructCell single-cell calls",
    "logistic_regression_cells": "logistic regression single-cell calls",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="saved model folder")
    parser.add_argument(
        "--dataset-dir", required=True, help="built with instructcell build-data ... --multicell"
    )
    parser.add_argument("--chat-file", required=True, help=".h5ad for the scripted conversation (raw counts)")
    parser.add_argument(
        "--chat-label-key", default="cell_type", help="obs column the chat answers are checked on"
    )
    parser.add_argument("--output", required=True, type=Path, help="writes <output>.md, .json and .png")
    parser.add_argument("--max-test-cells", type=int, default=200, help="test rows per task and dataset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def chat_cells(adata: anndata.AnnData, dataset: str, n: int) -> list[int]:
    """Return the first ``n`` rows of the file whose cells are in the test split (never trained on)."""
    rows = [i for i, name in enumerate(adata.obs_names.astype(str)) if split_of(dataset, name) == "test"]
    if len(rows) < n:
        raise ValueError(f"{dataset} has {len(rows)} test-split cells; the conversation needs {n}.")
    return rows[:n]


def scripted_chat(session: ChatSession, labels: Sequence[str], rows: Sequence[int]) -> list[dict[str, Any]]:
    """Five turns about six cells of the file, each answer read back and checked.

    1. the composition of ``rows[0:4]``; 2. "generate 20 more like the first one" (``rows[0]``'s type and
    sampled cells); 3. the type of ``rows[4]``; 4. "and cell ``rows[5]``?"; 5. "how sure are you?" (whether
    the fourth answer holds, and ``rows[5]``'s type).

    Parameters
    ----------
    session : ChatSession
        A fresh conversation over the file.
    labels : sequence of str
        The file's label of every row (``session.adata``'s order).
    rows : sequence of int
        Six rows of the file.

    Returns
    -------
    list of dict
        Per turn: ``message``, ``reply``, ``expected`` (the right answer's text) and ``right``.
    """
    label_set = sorted(set(labels))
    composition = get_task("group_composition").question
    confidence = get_task("follow_up_confidence").question
    group = [labels[row] for row in rows[:4]]
    first, second = rows[4], rows[5]
    turns = []

    def turn(message: str, expected: str, check) -> str:
        before = len(session.turns)
        reply = session.respond(message)
        answer = session.turns[-1].answer if len(session.turns) > before else ""  # "" when it failed
        turns.append({"message": message, "reply": reply, "expected": expected, "right": bool(check(answer))})
        return answer

    cells = f"cells {rows[0]}, {rows[1]}, {rows[2]} and {rows[3]}"
    truth = composition.truth(group, 4, "")
    turn(
        f"What cell types are in {cells}, and how many of each?",
        composition.render(truth, group),
        lambda answer: composition.parse(answer, label_set, 4) == truth,
    )
    turn(
        "Generate 20 more like the first one.",
        f"{labels[rows[0]]} and 20 sampled cells",
        lambda answer: (
            extract_label(answer, label_set) == labels[rows[0]]
            and session.generated is not None
            and session.generated.n_obs == 20
        ),
    )
    turn(
        f"What is cell {first}?",
        labels[first],
        lambda answer: extract_label(answer, label_set) == labels[first],
    )
    said = turn(
        f"And cell {second}?",
        labels[second],
        lambda answer: extract_label(answer, label_set) == labels[second],
    )
    given = extract_label(said, label_set) or said
    truth = confidence.truth([labels[second]], 0, given)
    turn(
        "How sure are you?",
        confidence.render(truth, []),
        lambda answer: confidence.parse(answer, label_set, 0) == truth,
    )
    return turns


def summary_rows(scores: dict[str, Any]) -> list[list[Any]]:
    """One row per multicell task and dataset: accuracy (and cells right) of every method."""
    rows = []
    for task in tasks_of_family("multicell"):
        for dataset, entry in sorted(scores.get(task, {}).items()):
            methods = entry["methods"]
            row = [task, dataset, entry["n_test"]]
            for name in METHODS:
                values = methods.get(name)
                row.append(
                    None if values is None else f"{fmt(values['accuracy'])} ({fmt(values['cell_accuracy'])})"
                )
            rows.append(row)
    return rows


def turn_rows(scores: dict[str, Any]) -> list[list[Any]]:
    """One row per group task and dataset: each method's accuracy asked first / after earlier turns.

    Read from the entries' ``by_turns``; "after" pools the rows of one and of two earlier turns.
    """
    rows = []
    for task in tasks_of_family("multicell"):
        for dataset, entry in sorted(scores.get(task, {}).items()):
            if "by_turns" not in entry:
                continue
            first = entry["by_turns"].get("0", {"n": 0, "methods": {}})
            after = [group for key, group in entry["by_turns"].items() if key != "0"]
            n_after = sum(group["n"] for group in after)
            row = [task, dataset, first["n"], n_after]
            for name in METHODS:
                later = (
                    sum(group["n"] * group["methods"][name] for group in after) / n_after if n_after else None
                )
                row.append(f"{fmt(first['methods'].get(name))} / {fmt(later)}")
            rows.append(row)
    return rows


def plot_by_size(scores: dict[str, Any], path: Path) -> None:
    """Accuracy against the cells of a question (group tasks) or the earlier turns (follow-ups)."""
    tasks = [task for task in tasks_of_family("multicell") if scores.get(task)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        for dataset, entry in sorted(scores[task].items()):
            groups = sorted(entry["by_size"]["groups"].items(), key=lambda item: int(item[0]))
            sizes = [int(size) for size, _ in groups]
            for name, style in zip(METHODS, ("-", "--", ":"), strict=True):
                values = [group["methods"].get(name) for _, group in groups]
                ax.plot(sizes, values, style, marker="o", ms=3, label=f"{dataset[:10]} {METHODS[name]}")
        ax.set_title(task.replace("_", " "), fontsize=9)
        ax.set_xlabel(next(iter(scores[task].values()))["by_size"]["variable"], fontsize=8)
    axes[0][0].set_ylabel("accuracy (test split)")
    axes[0][-1].legend(fontsize=5, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluate, converse, print the tables and write the report, the JSON and the plot."""
    args = parse_args(argv)
    start = time.time()
    command = "python benchmarks/multicell.py " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    metrics = run_evaluation(
        EvaluationConfig(
            model=args.model,
            dataset_dir=args.dataset_dir,
            output_dir=args.output.with_name(args.output.name + "_report"),
            tasks=("cta", *tasks_of_family("multicell")),
            max_test_cells=args.max_test_cells,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=False,
            title="Multi-cell questions and follow-up turns (test split)",
            extra={"command": command},
        )
    )
    adata = anndata.read_h5ad(args.chat_file)
    dataset = Path(args.chat_file).stem
    labels = adata.obs[args.chat_label_key].astype(str).tolist()
    session = ChatSession(load_pipeline(args.model), adata, seed=args.seed)
    transcript = scripted_chat(session, labels, chat_cells(adata, dataset, 6))
    scores = metrics["scores"]
    header = [
        "task",
        "dataset",
        "n test",
        *(f"{title}: accuracy (cells right)" for title in METHODS.values()),
    ]
    table = markdown_table(header, summary_rows(scores), numeric_from=2)
    cta = [
        [
            dataset,
            entry["n_test"],
            entry["methods"]["instructcell"]["accuracy"],
            entry["methods"]["logistic_regression"]["accuracy"],
        ]
        for dataset, entry in sorted(scores.get("cta", {}).items())
    ]
    chat_lines = [
        f"you> {t['message']}\ninstructcell> {t['reply']}\n    (expected: {t['expected']}; "
        f"{'right' if t['right'] else 'WRONG'})"
        for t in transcript
    ]
    lines = [
        "# Multi-cell questions and follow-up turns",
        "",
        f"`{command}` ({time.time() - start:.0f} s)",
        "",
        "Test split, held-out cells and templates, at most "
        f"{args.max_test_cells} rows per task and dataset. Accuracy counts whole answers; in parentheses the "
        "share of cells right.",
        "",
        table,
        "",
        "The group questions asked first, and after one or two unrelated earlier turns (their cells come "
        "first in the prompt); accuracy first / after:",
        "",
        markdown_table(
            ["task", "dataset", "n first", "n after", *METHODS.values()], turn_rows(scores), numeric_from=2
        ),
        "",
        "Single-cell annotation accuracy of the same model and of logistic regression on the same datasets:",
        "",
        markdown_table(["dataset", "n test", "InstructCell", "logistic regression"], cta, numeric_from=1),
        "",
        f"Scripted conversation over `{args.chat_file}` (test-split cells), "
        f"{sum(t['right'] for t in transcript)} of {len(transcript)} answers right:",
        "",
        "```",
        *chat_lines,
        "```",
        "",
        f"Accuracy by cells and earlier turns: `{args.output.name}_report/report.md`; plot: "
        f"![accuracy by size]({args.output.name}.png)",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = "\n".join(lines) + "\n"
    args.output.with_suffix(".md").write_text(report)
    result = {"command": command, "scores": {t: scores[t] for t in scores}, "transcript": transcript}
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot_by_size(scores, args.output.with_suffix(".png"))
    print(report)
    return result


if __name__ == "__main__":
    main()
