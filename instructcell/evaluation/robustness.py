"""Robustness to the instruction's wording: the same test cells asked with many held-out templates.

How templates reach the splits (``datasets_builder``), which is what this module relies on:

* a template's split is ``template_split_of(template.id)``: ``sha1(id) % 10``, buckets 0-7 train,
  8 validation, 9 test (``datasets_builder/splits.py``);
* the builder draws each example's template with ``TemplateBank.choose(task, variant, split, key)`` from the
  templates **of the example's own split** only, so no test template ever renders a training example;
* the options in a prompt (templates with ``{choices}``) are the dataset's labels in an order seeded by the
  example key alone (:func:`datasets_builder.builder.option_order`), whatever the template.

So the robustness templates are the bank's test-split templates of the task and variant, and each one is
applied to the **same** test cells by re-rendering every cell's instruction exactly as the builder would have,
had it drawn that template for that cell (same metadata, same option order). Selecting the test rows that
happen to carry each template instead would compare different cells per template (the test split holds one to
a few cells per template), mixing template effects with cell difficulty.

Two checks guard the assumptions at run time: :func:`check_rows_render` re-renders every evaluated row with
its own template and requires the stored instruction and response back (same bank, same rendering), and
:func:`choose_templates` refuses a template that occurs in the training rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datasets_builder.builder import example_key, option_order
from datasets_builder.templates import SIGNAL_TOKEN, Template, TemplateBank, render
from instructcell.tasks import get_task

from .metrics.classification import cell_classification_metrics

__all__ = [
    "GROUPS",
    "METRICS",
    "answer_texts",
    "check_rows_render",
    "choose_templates",
    "evaluate_templates",
    "render_row",
    "rows_answer_texts",
    "summarize",
    "summarize_templates",
    "template_lookup",
]

#: Template groups: with the label options in the prompt (``{choices}``) and without.
GROUPS: tuple[str, str] = ("with_options", "without_options")
#: Metrics summarized across templates.
METRICS: tuple[str, str] = ("accuracy", "macro_f1")
_METADATA = ("species", "tissue", "sequencing_method", "drug")


def template_lookup(bank: TemplateBank) -> dict[tuple[str, str], Template]:
    """Map ``(template id, variant)`` to the bank's template."""
    return {(t.id, t.variant): t for t in bank.templates}


def render_row(row: Mapping[str, Any], template: Template, output: str | None = None) -> tuple[str, str]:
    """Render one builder row's cell with another template, exactly as the builder would have.

    Parameters
    ----------
    row : mapping
        A builder row (``task``, ``variant``, ``dataset``, ``cell_id``, ``label``, ``choices`` and the
        metadata columns).
    template : Template
        The template to render with (same task and variant as the row).
    output : str, optional
        The response's ``{output}``; default the row's label (``<SIGNAL>`` for a task that generates a cell).

    Returns
    -------
    tuple of str
        ``(instruction, response)``.
    """
    if (template.task, template.variant) != (row["task"], row["variant"]):
        raise ValueError(
            f"Template {template.id} is a {template.task}/{template.variant} template; the row is "
            f"{row['task']}/{row['variant']}."
        )
    task = get_task(row["task"])
    key = example_key(row["task"], row["variant"], row["dataset"], row["cell_id"])
    options = option_order(list(row["choices"]), key) if template.has_choices else []
    metadata = {name: row.get(name) or "" for name in _METADATA}
    if task.label_placeholder is not None:  # as the builder: the label is part of the request
        metadata[task.label_placeholder] = row["label"]
    default = SIGNAL_TOKEN if task.output_cell else row["label"]
    return render(template, metadata, default if output is None else output, options)


def answer_texts(row: Mapping[str, Any], template: Template) -> list[str]:
    """Return the response text of each of the row's ``choices`` under ``template`` (instruct: the labels)."""
    return [render_row(row, template, output=choice)[1] for choice in row["choices"]]


def rows_answer_texts(
    rows: Iterable[Mapping[str, Any]], lookup: Mapping[tuple[str, str], Template]
) -> list[list[str]]:
    """Return, per row, the response text of each of its ``choices`` under the row's own template.

    What a chat-variant model is scored on (its whole response with each label filled in). The rows are
    checked to re-render as stored first (:func:`check_rows_render`).
    """
    rows = list(rows)
    check_rows_render(rows, lookup)
    return [answer_texts(row, lookup[(row["template_id"], row["variant"])]) for row in rows]


def check_rows_render(rows: Iterable[Mapping[str, Any]], lookup: Mapping[tuple[str, str], Template]) -> None:
    """Require that re-rendering every row with its own template gives back its instruction and response.

    Raises
    ------
    ValueError
        When a row's template is not in the bank or renders differently: the dataset was built from another
        template bank (pass that one) or by another version of the builder.
    """
    for row in rows:
        template = lookup.get((row["template_id"], row["variant"]))
        if template is None:
            raise ValueError(
                f"Template {row['template_id']!r} ({row['variant']}) of the dataset is not in the template "
                "bank: pass the bank the dataset was built with (--template-bank)."
            )
        if render_row(row, template) != (row["instruction"], row["response"]):
            raise ValueError(
                f"Re-rendering test row {row['cell_id']!r} with its own template {template.id} does not give "
                f"its stored instruction back ({row['instruction']!r}): the dataset was built from another "
                "template bank or builder version, so re-rendered instructions would not be comparable."
            )


def choose_templates(
    bank: TemplateBank,
    task: str,
    variant: str,
    n_per_group: int,
    seed: int,
    train_template_ids: Iterable[str] = (),
) -> dict[str, list[Template]]:
    """Draw ``n_per_group`` test-split templates with options in the prompt and ``n_per_group`` without.

    Parameters
    ----------
    bank : TemplateBank
    task, variant : str
        A classification task's name; ``instruct`` or ``chat``.
    n_per_group : int
        Templates per group.
    seed : int
        Seed of the draw (uniform without replacement among the group's test templates, sorted by id).
    train_template_ids : iterable of str
        Template ids seen in the training rows; drawing one of them raises.

    Returns
    -------
    dict of str to list of Template
        :data:`GROUPS` -> templates sorted by id.
    """
    if n_per_group < 1:
        raise ValueError(f"n_per_group must be at least 1, got {n_per_group}.")
    candidates = bank.select(task, variant, "test")
    leaked = sorted({t.id for t in candidates} & set(train_template_ids))
    if leaked:
        raise ValueError(
            f"Test-split templates {leaked[:5]} also occur in the training rows: the dataset's template "
            "splits do not follow the bank's; rebuild the dataset or pass the bank it was built with."
        )
    rng = np.random.default_rng(seed)
    chosen = {}
    for group in GROUPS:
        pool = [t for t in candidates if t.has_choices == (group == "with_options")]
        if len(pool) < n_per_group:
            raise ValueError(
                f"The bank has {len(pool)} {task}/{variant} test templates {group.replace('_', ' ')}; "
                f"{n_per_group} were asked for. Lower the number of templates per group."
            )
        picks = sorted(rng.choice(len(pool), size=n_per_group, replace=False))
        chosen[group] = [pool[i] for i in picks]
    return chosen


def summarize(values: Sequence[float], ddof: int = 1) -> dict[str, float]:
    """Mean, standard deviation (``ddof=1``: the sample sd across templates), min, max and count.

    Parameters
    ----------
    values : sequence of float
        One value per template, ``(n,)``.
    ddof : int
        Delta degrees of freedom of the sd (numpy's ``np.std(values, ddof=ddof)``); with one value the sd is
        reported as 0.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("No values to summarize.")
    sd = float(np.std(array, ddof=ddof)) if array.size > ddof else 0.0
    return {
        "mean": float(array.mean()),
        "sd": sd,
        "min": float(array.min()),
        "max": float(array.max()),
        "n_templates": int(array.size),
    }


def summarize_templates(per_template: Sequence[Mapping[str, Any]], ddof: int = 1) -> dict[str, Any]:
    """:func:`summarize` each metric over the templates of each group and over all templates.

    Returns
    -------
    dict
        ``{"with_options": {"accuracy": {...}, "macro_f1": {...}}, "without_options": {...}, "all": {...}}``
        (groups without templates are left out).
    """
    groups = [g for g in GROUPS if any(r["group"] == g for r in per_template)]
    out: dict[str, Any] = {}
    for group in [*groups, "all"]:
        members = [r for r in per_template if group == "all" or r["group"] == group]
        out[group] = {metric: summarize([r[metric] for r in members], ddof) for metric in METRICS}
    return out


def evaluate_templates(
    predict: Any,
    rows: Sequence[Mapping[str, Any]],
    templates: Mapping[str, Sequence[Template]],
    needs_answers: bool = False,
    progress: bool = True,
    desc: str = "templates",
) -> list[dict[str, Any]]:
    """Accuracy and macro-F1 of the same rows asked with each template.

    Parameters
    ----------
    predict : callable
        ``predict(rows, answers) -> list of label or None``: the model's prediction for re-rendered rows;
        ``answers`` is None unless ``needs_answers`` (then per row the response text of each choice).
    rows : sequence of dict
        The test rows (one label set); only their instruction and response are replaced.
    templates : mapping of str to sequence of Template
        Group -> templates (e.g. from :func:`choose_templates`).
    needs_answers : bool
        Pass each choice's response text (chat variant scored by likelihood).
    progress : bool
        Show a tqdm bar over templates.
    desc : str
        Label of the bar.

    Returns
    -------
    list of dict
        Per template: ``template_id``, ``group``, ``instruction_template``, ``accuracy``, ``macro_f1``,
        ``weighted_f1``, ``answered_rate``, ``n``.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("No rows to evaluate.")
    labels = sorted(set(rows[0]["choices"]))
    references = [row["label"] for row in rows]
    pairs = [(group, t) for group, group_templates in templates.items() for t in group_templates]
    results = []
    for group, template in tqdm(pairs, desc=desc, unit="template", disable=not progress, leave=False):
        rendered = []
        for row in rows:
            instruction, response = render_row(row, template)
            rendered.append(
                {
                    **row,
                    "instruction": instruction,
                    "response": response,
                    "template_id": template.id,
                    "options_in_prompt": template.has_choices,
                }
            )
        answers = [answer_texts(row, template) for row in rows] if needs_answers else None
        predictions = predict(rendered, answers)
        metrics = cell_classification_metrics(predictions, references, labels=labels)
        results.append(
            {
                "template_id": template.id,
                "group": group,
                "instruction_template": template.instruction,
                **metrics,
                "n": len(rows),
            }
        )
    return results
