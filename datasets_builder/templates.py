"""Instruction/response templates: placeholders, validation, ROUGE-L, the committed bank and rendering.

Instructions use the paper's placeholders: ``{input}`` (the cell), ``{species}``, ``{tissue}``,
``{sequencing_method}``, ``{drug}``, ``{cell_type}``, ``{choices}``; which ones a task requires or allows is
in its definition (:mod:`instructcell.tasks`).
Responses use ``{output}``: exactly ``"{output}"`` for the *instruct* variant; conversational text containing
``{output}`` for *chat* (ending with it when the task generates a cell, where it becomes ``<SIGNAL>``).

The bank (``template_bank/<task>.jsonl``) stores one record per instruction with its chat response; the
instruct variant of a record is the same instruction with response ``"{output}"``, so both variants share
ids and therefore template splits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from instructcell.tasks import get_task

from .splits import template_split_of

CELL_TOKEN = "<CELL>"
SIGNAL_TOKEN = "<SIGNAL>"
VARIANTS: tuple[str, str] = ("instruct", "chat")
DEFAULT_BANK_DIR = Path(__file__).parent / "template_bank"
MAX_WORDS = 70
ROUGE_L_THRESHOLD = 0.75


def placeholders(text: str) -> list[str]:
    """Return the placeholder names of a template, in order (``"{a} {b}"`` -> ``["a", "b"]``).

    Raises
    ------
    ValueError
        On unbalanced braces, positional ``{}``, or format specs/attributes such as ``{a:>3}`` or ``{a.b}``.
    """
    try:
        fields = [
            (name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None
        ]
    except ValueError as err:
        raise ValueError(
            f"Malformed braces in template {text!r} ({err}): write literal braces as '{{{{' and '}}}}'."
        ) from err
    names = []
    for name, spec, conv in fields:
        if not name or spec or conv or not name.isidentifier():
            raise ValueError(f"Bad placeholder {{{name}}} in {text!r}: use plain names such as {{species}}.")
        names.append(name)
    return names


def n_words(text: str) -> int:
    """Count whitespace-separated words."""
    return len(text.split())


@dataclass(frozen=True)
class Template:
    """One instruction/response template of one task and variant.

    Parameters
    ----------
    id
        Unique id (e.g. ``"cta-00042"``); it decides the template's split.
    task
        A task name of :mod:`instructcell.tasks`.
    variant
        ``"instruct"`` or ``"chat"``.
    instruction
        Instruction text with placeholders.
    response
        ``"{output}"`` (instruct) or a conversational response containing ``{output}`` (chat).
    """

    id: str
    task: str
    variant: str
    instruction: str
    response: str

    @property
    def has_choices(self) -> bool:
        """Whether the instruction offers the label options (``{choices}``)."""
        return "choices" in placeholders(self.instruction)

    @property
    def split(self) -> str:
        """``"train"``, ``"validation"`` or ``"test"``, from the id hash."""
        return template_split_of(self.id)


def validate_instruction(text: str, task: str, max_words: int = MAX_WORDS) -> None:
    """Check an instruction template for ``task``; raise a ``ValueError`` that says what to fix."""
    spec = get_task(task)
    names = placeholders(text)
    required = spec.required_placeholders
    allowed = required | spec.optional_placeholders
    missing = sorted(required - set(names))
    if missing:
        raise ValueError(f"{task} instruction {text!r} lacks required placeholder(s) {missing}: add them.")
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise ValueError(
            f"{task} instruction {text!r} has unknown placeholder(s) {unknown}: allowed are "
            f"{sorted(allowed)}."
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{task} instruction {text!r} repeats placeholder(s) {repeated}: use each once.")
    if n_words(text) > max_words:
        raise ValueError(
            f"{task} instruction has {n_words(text)} words (> {max_words}): shorten it. {text!r}"
        )


def validate_response(text: str, task: str, variant: str, max_words: int = MAX_WORDS) -> None:
    """Check a response template for ``task`` and ``variant``; raise a ``ValueError`` saying what to fix."""
    if variant == "instruct":
        if text != "{output}":
            raise ValueError(f"An instruct response must be exactly '{{output}}', got {text!r}.")
        return
    if variant != "chat":
        raise ValueError(f"Unknown variant {variant!r}: use one of {VARIANTS}.")
    names = placeholders(text)
    if names.count("output") != 1:
        raise ValueError(f"A chat response must contain {{output}} exactly once: {text!r}.")
    spec = get_task(task)
    allowed = spec.response_placeholders | {"output"}
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise ValueError(
            f"{task} response {text!r} has unknown placeholder(s) {unknown}: allowed are {sorted(allowed)}."
        )
    if spec.output_cell and not text.endswith("{output}"):
        raise ValueError(
            f"A {task} chat response must end with {{output}} (the generated cell, <SIGNAL>): {text!r}."
        )
    if n_words(text) > max_words:
        raise ValueError(f"{task} response has {n_words(text)} words (> {max_words}): shorten it. {text!r}")


def validate_template(template: Template, max_words: int = MAX_WORDS) -> None:
    """Validate the instruction and the response of a :class:`Template`."""
    validate_instruction(template.instruction, template.task, max_words)
    validate_response(template.response, template.task, template.variant, max_words)


# --- ROUGE-L -----------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """ROUGE tokens: lower-cased alphanumeric runs (``rouge_score``'s default tokenizer, no stemming)."""
    return re.findall(r"[a-z0-9]+", text.lower())


class RougeLIndex:
    """Token sequences of kept texts, for fast ROUGE-L F1 of one text against all of them.

    Tokens are mapped to single characters so that rapidfuzz's bit-parallel ``LCSseq`` computes token-level
    longest common subsequences. ROUGE-L F1 of ``a`` and ``b`` is ``2 * LCS(a, b) / (len(a) + len(b))``.
    """

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self._codes: dict[str, str] = {}
        self._encoded: list[str] = []
        self._lengths: list[int] = []
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self._encoded)

    def encode(self, text: str) -> str:
        """Text -> one character per token."""
        return "".join(self._codes.setdefault(t, chr(0x100 + len(self._codes))) for t in tokenize(text))

    def add(self, text: str) -> None:
        """Keep ``text``."""
        encoded = self.encode(text)
        self._encoded.append(encoded)
        self._lengths.append(len(encoded))

    def scores(self, text: str) -> np.ndarray:
        """ROUGE-L F1 of ``text`` against every kept text (float array, empty if none kept)."""
        if not self._encoded:
            return np.zeros(0)
        encoded = self.encode(text)
        lcs = process.cdist([encoded], self._encoded, scorer=LCSseq.similarity, dtype=np.int32)[0]
        total = len(encoded) + np.asarray(self._lengths)
        return np.divide(2.0 * lcs, total, out=np.zeros(len(total)), where=total > 0)

    def max_score(self, text: str) -> float:
        """Highest ROUGE-L F1 of ``text`` against the kept texts (0 if none kept)."""
        scores = self.scores(text)
        return float(scores.max()) if scores.size else 0.0

    def pairwise(self, workers: int = -1) -> np.ndarray:
        """ROUGE-L F1 of all distinct pairs (upper triangle, flattened)."""
        lcs = process.cdist(
            self._encoded, self._encoded, scorer=LCSseq.similarity, dtype=np.int32, workers=workers
        )
        lengths = np.asarray(self._lengths)
        total = lengths[:, None] + lengths[None, :]
        f1 = np.divide(2.0 * lcs, total, out=np.zeros(lcs.shape), where=total > 0)
        return f1[np.triu_indices(len(lengths), k=1)]


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 between two texts (token level)."""
    return RougeLIndex([b]).max_score(a)


def check_near_duplicates(texts: Sequence[str], threshold: float = ROUGE_L_THRESHOLD) -> None:
    """Raise a ``ValueError`` if two texts have ROUGE-L F1 >= ``threshold``."""
    index = RougeLIndex()
    for i, text in enumerate(texts):
        scores = index.scores(text)
        if scores.size and scores.max() >= threshold:
            j = int(scores.argmax())
            raise ValueError(
                f"Templates {j} and {i} are near-duplicates (ROUGE-L {scores.max():.2f} >= {threshold}): "
                f"{texts[j]!r} / {text!r}. Rewrite or drop one of them."
            )
        index.add(text)


# --- the bank ----------------------------------------------------------------------------------------


class TemplateBank:
    """Validated templates indexed by task, variant and split.

    Parameters
    ----------
    templates
        Templates; ``(id, variant)`` pairs must be unique and every template must validate.
    max_words
        Word limit for instructions and responses.
    """

    def __init__(self, templates: Iterable[Template], max_words: int = MAX_WORDS) -> None:
        self.templates = sorted(templates, key=lambda t: (t.task, t.variant, t.id))
        seen: set[tuple[str, str]] = set()
        for template in self.templates:
            if (template.id, template.variant) in seen:
                raise ValueError(
                    f"Template id {template.id!r} ({template.variant}) appears twice: ids must be unique."
                )
            seen.add((template.id, template.variant))
            validate_template(template, max_words)
        self._by_key: dict[tuple[str, str, str], list[Template]] = {}
        for template in self.templates:
            self._by_key.setdefault((template.task, template.variant, template.split), []).append(template)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, str]], max_words: int = MAX_WORDS) -> TemplateBank:
        """Build both variants from bank records ``{"id", "task", "instruction", "response"}`` (chat)."""
        templates = []
        for record in records:
            for variant in VARIANTS:
                response = "{output}" if variant == "instruct" else record["response"]
                templates.append(
                    Template(record["id"], record["task"], variant, record["instruction"], response)
                )
        return cls(templates, max_words)

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_BANK_DIR, max_words: int = MAX_WORDS) -> TemplateBank:
        """Load a bank: a ``.jsonl`` file or a folder of them (default: the committed bank).

        Files are read and validated once per process: loading the same unchanged files (same size and
        modification time) again returns the bank already read.
        """
        path = Path(path)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"No .jsonl template files in {path}: point to a template bank folder or file.")
        signature = tuple(
            (str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns) for file in files
        )
        return _read_bank(cls, signature, max_words)

    def select(self, task: str, variant: str, split: str) -> list[Template]:
        """Templates of one task, variant and split, sorted by id."""
        return list(self._by_key.get((task, variant, split), []))

    def choose(self, task: str, variant: str, split: str, key: str) -> Template:
        """Pick a template deterministically from ``sha1(key)`` among :meth:`select`'s templates."""
        candidates = self._by_key.get((task, variant, split))
        if not candidates:
            raise ValueError(
                f"The template bank has no {task}/{variant} template in split {split!r}: add templates "
                "(ids are split 8:1:1 by their sha1 hash)."
            )
        return candidates[int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % len(candidates)]


@functools.lru_cache(maxsize=8)
def _read_bank(
    cls: type[TemplateBank], files: tuple[tuple[str, int, int], ...], max_words: int
) -> TemplateBank:
    """Read and validate the bank files ``(path, size, mtime)`` (cached by :meth:`TemplateBank.load`)."""
    records = []
    for file, _, _ in files:
        with open(file, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return cls.from_records(records, max_words)


def render(
    template: Template, metadata: Mapping[str, str], output: str, choices: Sequence[str] = ()
) -> tuple[str, str]:
    """Fill a template.

    Parameters
    ----------
    template
        The template.
    metadata
        ``species``, ``tissue``, ``sequencing_method``, ``drug``, ``cell_type`` values (extra keys are
        ignored).
    output
        Replaces ``{output}`` in the response: the label (CTA/DSP) or :data:`SIGNAL_TOKEN` (CPCG).
    choices
        Options, joined with ``", "`` into ``{choices}`` when the instruction has it.

    Returns
    -------
    tuple of str
        ``(instruction, response)``; ``{input}`` becomes :data:`CELL_TOKEN`.
    """
    values = {**metadata, "input": CELL_TOKEN, "choices": ", ".join(choices), "output": output}
    missing = sorted(set(placeholders(template.instruction) + placeholders(template.response)) - set(values))
    if missing:
        raise ValueError(f"No value for {missing} in template {template.id}: pass them in `metadata`.")
    return template.instruction.format_map(values), template.response.format_map(values)
