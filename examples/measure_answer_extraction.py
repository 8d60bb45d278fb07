"""Measure answer extraction like the InstructCell paper: fill every chat response template with every label.

Each response template containing the answer placeholder (``{output}`` by default) is filled with each label
of each label set; the other placeholders (``{tissue}``, ``{species}``, ...) get neutral values (override with
``--fill key=value``). Accuracy = fraction of filled responses that ``extract_label`` maps back to the label
that was filled in (the paper reports 99.97% for its extractor).

Usage::

    python examples/measure_answer_extraction.py --templates response_templates.json \
        --labels ../shared/reference/original_vocab/choices.json [--output report.json]

``--templates``: a JSON file holding strings or objects with a ``response`` field, nested in lists/dicts
in any way (the original InstructCell ``templates.json`` format works), a ``.jsonl`` file of such objects,
or a text file with one template per line. ``--labels``: a JSON list of labels, or an object mapping a
label-set name to its list (like ``choices.json``); may be given several times.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "modeling_instructcell" / "answer_extraction.py").is_file():  # prefer this clone's copy
    sys.path.insert(0, str(_ROOT))
from modeling_instructcell.answer_extraction import extract_label  # noqa: E402

DEFAULT_FILL = {
    "species": "human",
    "tissue": "the sampled tissue",
    "sequencing_method": "10x Chromium",
    "drug": "the drug",
    "input": "<CELL>",
    "choices": "the listed options",
}


def _collect(obj: Any, field: str) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        if field in obj and isinstance(obj[field], str):
            yield obj[field]
        else:
            for value in obj.values():
                yield from _collect(value, field)
    elif isinstance(obj, list):
        for value in obj:
            yield from _collect(value, field)


def load_templates(path: str | Path, placeholder: str = "output", field: str = "response") -> list[str]:
    """Read response templates that contain ``{placeholder}``, deduplicated, in file order.

    Parameters
    ----------
    path : str or Path
        ``.json``, ``.jsonl`` or text file (see the module docstring).
    placeholder : str, default "output"
        Name of the answer placeholder.
    field : str, default "response"
        Key holding the response template in JSON objects.

    Returns
    -------
    list of str
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        candidates = list(_collect(json.loads(text), field))
    elif path.suffix == ".jsonl":
        candidates = [
            t for line in text.splitlines() if line.strip() for t in _collect(json.loads(line), field)
        ]
    else:
        candidates = [line for line in text.splitlines() if line.strip()]
    templates = [t for t in dict.fromkeys(candidates) if "{" + placeholder + "}" in t]
    if not templates:
        raise ValueError(
            f"No template in {path} contains '{{{placeholder}}}'; pass --placeholder or --field."
        )
    return templates


def load_label_sets(paths: Sequence[str | Path]) -> dict[str, list[str]]:
    """Read label sets: a JSON list (named after the file) or a JSON object ``{name: [labels]}``."""
    label_sets: dict[str, list[str]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(data, list):
            label_sets[Path(path).stem] = [str(x) for x in data]
        elif isinstance(data, dict):
            label_sets.update({str(k): [str(x) for x in v] for k, v in data.items()})
        else:
            raise ValueError(f"{path}: expected a JSON list of labels or an object of label lists.")
    return label_sets


def fill(
    template: str, answer: str, placeholder: str = "output", values: dict[str, str] | None = None
) -> str:
    """Substitute ``{placeholder}`` by ``answer`` and every other ``{field}`` by ``values`` (or a default)."""
    values = {**DEFAULT_FILL, **(values or {})}
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(answer if name == placeholder else values.get(name, name.replace("_", " ")))
    return "".join(out)


def measure(
    templates: Sequence[str],
    label_sets: dict[str, list[str]],
    placeholder: str = "output",
    values: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fill every template with every label of every set and score ``extract_label``.

    Returns
    -------
    dict
        ``accuracy``, ``n``, ``per_label_set`` (name -> accuracy), ``unanswered``, ``failures``
        (list of ``{"label_set", "label", "text", "extracted"}``).
    """
    failures, per_set, n_total, n_correct = [], {}, 0, 0
    for name, labels in label_sets.items():
        correct = 0
        for template in templates:
            for label in labels:
                text = fill(template, label, placeholder, values)
                got = extract_label(text, labels)
                if got == label:
                    correct += 1
                else:
                    failures.append({"label_set": name, "label": label, "text": text, "extracted": got})
        n = len(templates) * len(labels)
        per_set[name] = correct / n
        n_total += n
        n_correct += correct
    return {
        "accuracy": n_correct / n_total,
        "n": n_total,
        "n_templates": len(templates),
        "per_label_set": per_set,
        "unanswered": sum(f["extracted"] is None for f in failures),
        "failures": failures,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--templates", required=True, help="response template file (.json, .jsonl or .txt)")
    parser.add_argument("--labels", required=True, action="append", help="label JSON (list or {name: list})")
    parser.add_argument("--placeholder", default="output", help="answer placeholder name (default: output)")
    parser.add_argument("--field", default="response", help="JSON key of response templates")
    parser.add_argument("--fill", action="append", default=[], metavar="KEY=VALUE", help="other placeholders")
    parser.add_argument("--output", help="write the full report (with failures) as JSON here")
    parser.add_argument("--show", type=int, default=10, help="failures to print (default 10)")
    args = parser.parse_args(argv)

    values = dict(item.split("=", 1) for item in args.fill)
    templates = load_templates(args.templates, args.placeholder, args.field)
    report = measure(templates, load_label_sets(args.labels), args.placeholder, values)
    print(f"templates: {report['n_templates']}  filled responses: {report['n']}")
    for name, accuracy in report["per_label_set"].items():
        print(f"  {name:<32} {accuracy:.4%}")
    print(
        f"accuracy: {report['accuracy']:.4%}  "
        f"(failures: {len(report['failures'])}, unanswered: {report['unanswered']})"
    )
    for failure in report["failures"][: args.show]:
        print(
            f"  [{failure['label_set']}] {failure['label']!r} -> {failure['extracted']!r}: {failure['text']}"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
