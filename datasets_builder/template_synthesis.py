r"""Template synthesis pipeline (paper's method) with an offline or an OpenAI-compatible generator.

For each task, repeatedly:

1. sample a questioner (:func:`~datasets_builder.traits.sample_questioner`: 3/2/1/0 traits with 27/45/18/10 %)
   and, for CTA/DSP, whether the instruction offers the options (``options_ratio``, default one half);
2. generate an instruction; drop it if a required placeholder is missing, an unknown one appears, or it has
   more than 70 words;
3. if its ROUGE-L F1 against any kept instruction is >= 0.75, ask for a rewrite, up to three times, then drop;
4. generate the chat response *from the instruction* and validate it (``{output}`` once; last for CPCG).

Rebuild the committed bank (offline, deterministic)::

    python -m datasets_builder.template_synthesis --output-dir datasets_builder/template_bank \\
        --stats docs/template_bank.md

With an endpoint: add ``--base-url https://host/v1 --model NAME`` (API key from ``$OPENAI_API_KEY``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from instructcell.tasks import get_task, task_names

from .template_grammar import GrammarGenerator
from .templates import (
    DEFAULT_BANK_DIR,
    MAX_WORDS,
    ROUGE_L_THRESHOLD,
    RougeLIndex,
    validate_instruction,
    validate_response,
)
from .traits import Questioner, sample_questioner

logger = logging.getLogger(__name__)


class TemplateGenerator(Protocol):
    """What the pipeline needs from a generator; methods return ``None`` when generation failed."""

    def instruction(
        self, task: str, questioner: Questioner, with_choices: bool, rng: np.random.Generator
    ) -> str | None:
        """Return a new instruction template."""

    def rewrite(self, text: str, task: str, questioner: Questioner, rng: np.random.Generator) -> str | None:
        """Rewrite ``text``: same meaning and placeholders, different expression."""

    def response(
        self, task: str, instruction: str, questioner: Questioner, rng: np.random.Generator
    ) -> str | None:
        """Return a chat response template for ``instruction``."""


class ChatEndpointGenerator:
    """Generator backed by any OpenAI-compatible ``/chat/completions`` endpoint (plain HTTP, no SDK).

    Parameters
    ----------
    base_url
        E.g. ``"https://api.openai.com/v1"`` or a local server's ``"http://localhost:8000/v1"``.
    model
        Model name sent to the endpoint.
    api_key
        Bearer token (may be empty for local servers).
    temperature, top_p
        Sampling parameters.
    timeout
        Seconds per request.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        temperature: float = 0.8,
        top_p: float = 0.95,
        timeout: float = 60.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.temperature = temperature
        self.top_p = top_p
        self.timeout = timeout

    def _complete(self, prompt: str, seed: int) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": seed,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.load(response)["choices"][0]["message"]["content"]

    def _ask(self, prompt: str, rng: np.random.Generator) -> str | None:
        prompt += (
            "\n\nPut only the final text between <result> and </result>. Keep every fragment in curly braces "
            "(such as {input}) exactly as written: they are placeholders filled in later. Use at most "
            f"{MAX_WORDS} words."
        )
        try:
            text = self._complete(prompt, int(rng.integers(2**31)))
        except (OSError, KeyError, ValueError) as err:
            logger.warning("Endpoint call failed: %s", err)
            return None
        found = re.search(r"<result>(.*?)</result>", text, flags=re.S)
        return " ".join(found.group(1).split()) if found else None

    def instruction(
        self, task: str, questioner: Questioner, with_choices: bool, rng: np.random.Generator
    ) -> str | None:
        """Ask for the questioner's utterance, listing the placeholders it must contain."""
        spec = get_task(task)
        required = sorted(spec.required_placeholders | ({"choices"} if with_choices else set()))
        optional = sorted(spec.optional_placeholders - {"choices"})
        prompt = (
            "Write one message that a person sends to an AI assistant about single-cell RNA-seq analysis, "
            f"for the task of {spec.grammar.description}. Take the role of the person asking and express "
            "yourself the way they would.\n"
            f"{questioner.describe() or 'No information about the person is given.'}\n"
            f"The message must contain each of these placeholders once: "
            f"{', '.join('{' + p + '}' for p in required)}."
        )
        if optional:
            prompt += f" It may also use: {', '.join('{' + p + '}' for p in optional)}."
        if with_choices:
            prompt += " {choices} is the list of possible answers."
        elif spec.offers_choices:
            prompt += " Do not list possible answers."
        return self._ask(prompt, rng)

    def rewrite(self, text: str, task: str, questioner: Questioner, rng: np.random.Generator) -> str | None:
        """Ask for a rewrite that keeps the meaning and placeholders but changes logic, attitude or style."""
        prompt = (
            "People say the same thing in very different ways. Rewrite the message below so that its meaning "
            "stays the same but its structure, logic, attitude and style change a lot.\n"
            f"{questioner.describe()}\nMessage: {text}"
        )
        return self._ask(prompt, rng)

    def response(
        self, task: str, instruction: str, questioner: Questioner, rng: np.random.Generator
    ) -> str | None:
        """Ask for the assistant's reply to ``instruction``, with ``{output}`` standing for the answer."""
        spec = get_task(task)
        where = "at the very end of your reply" if spec.output_cell else "once in your reply"
        prompt = (
            f"You are an AI assistant doing {spec.title}. A person "
            f"wrote:\n{instruction}\n"
            f"You already have the result, written as {{output}}. Reply to the person, in a tone that suits "
            f"them, and put {{output}} {where}. Do not include {{input}} or {{choices}}."
        )
        return self._ask(prompt, rng)


def synthesize_task(
    task: str,
    n_templates: int,
    generator: TemplateGenerator,
    seed: int = 0,
    options_ratio: float = 0.5,
    max_words: int = MAX_WORDS,
    threshold: float = ROUGE_L_THRESHOLD,
    max_rewrites: int = 3,
    max_attempts: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Synthesize up to ``n_templates`` validated, mutually dissimilar templates for one task.

    Parameters
    ----------
    task
        A task name of :mod:`instructcell.tasks`.
    n_templates
        Number of templates to keep.
    generator
        :class:`~datasets_builder.template_grammar.GrammarGenerator` or :class:`ChatEndpointGenerator`.
    seed
        Seed of the random generator (trait sampling and the offline generator).
    options_ratio
        Fraction of instructions asked to offer the options (tasks whose instructions may list them).
    max_words
        Word limit of instructions and responses.
    threshold
        Keep an instruction only if its ROUGE-L F1 with every kept instruction is below this.
    max_rewrites
        Rewrites tried for a too-similar instruction before it is dropped.
    max_attempts
        Stop after this many generated instructions (default ``20 * n_templates``).
    progress
        Show a progress bar.

    Returns
    -------
    list of dict
        Records ``{"id", "task", "instruction", "response", "traits", "rewrites"}``; ids are
        ``f"{task}-{i:05d}"`` in the order kept.
    """
    spec = get_task(task)
    rng = np.random.default_rng([seed, task_names().index(task)])
    index = RougeLIndex()
    records: list[dict] = []
    rejected = {"invalid": 0, "similar": 0, "response": 0}
    max_attempts = max_attempts or 20 * n_templates
    bar = tqdm(total=n_templates, desc=f"templates {task}", disable=not progress)
    for _ in range(max_attempts):
        if len(records) >= n_templates:
            break
        questioner = sample_questioner(task, rng)
        with_choices = spec.offers_choices and rng.random() < options_ratio
        text = _valid(generator.instruction(task, questioner, with_choices, rng), task, max_words)
        if text is None:
            rejected["invalid"] += 1
            continue
        rewrites = 0
        while text is not None and index.max_score(text) >= threshold and rewrites < max_rewrites:
            rewrites += 1
            text = _valid(generator.rewrite(text, task, questioner, rng), task, max_words)
        if text is None or index.max_score(text) >= threshold:
            rejected["similar" if text is not None else "invalid"] += 1
            continue
        response = generator.response(task, text, questioner, rng)
        try:
            validate_response(response or "", task, "chat", max_words)
        except ValueError:
            rejected["response"] += 1
            continue
        index.add(text)
        records.append(
            {
                "id": f"{task}-{len(records):05d}",
                "task": task,
                "instruction": text,
                "response": response,
                "traits": {k: v for k, v in vars(questioner).items() if v is not None},
                "rewrites": rewrites,
            }
        )
        bar.update(1)
    bar.close()
    logger.info("%s: kept %d templates, rejected %s", task, len(records), rejected)
    if len(records) < n_templates:
        logger.warning(
            "%s: only %d of %d templates after %d attempts", task, len(records), n_templates, max_attempts
        )
    return records


def _valid(text: str | None, task: str, max_words: int) -> str | None:
    if text is None:
        return None
    try:
        validate_instruction(text, task, max_words)
    except ValueError:
        return None
    return text


def write_bank(records: list[dict], output_dir: str | os.PathLike) -> None:
    """Write records as ``<output_dir>/<task>.jsonl`` (one JSON object per line, UTF-8)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
    for task, task_records in by_task.items():
        with open(output_dir / f"{task}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in task_records)


def iter_records(bank_dir: str | os.PathLike = DEFAULT_BANK_DIR) -> Iterator[dict]:
    """Yield the records of every ``.jsonl`` file of a bank folder."""
    for file in sorted(Path(bank_dir).glob("*.jsonl")):
        with open(file, encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default=str(DEFAULT_BANK_DIR))
    parser.add_argument("--n-per-task", type=int, default=3000)
    parser.add_argument("--tasks", nargs="+", default=list(task_names()), choices=task_names())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", default="", help="Also write statistics as markdown to this file.")
    parser.add_argument(
        "--base-url", default="", help="OpenAI-compatible endpoint; offline grammar when empty."
    )
    parser.add_argument("--model", default="gpt-4o")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.base_url:
        generator: TemplateGenerator = ChatEndpointGenerator(
            args.base_url, args.model, os.environ.get(args.api_key_env, "")
        )
    else:
        generator = GrammarGenerator()
    records = [r for task in args.tasks for r in synthesize_task(task, args.n_per_task, generator, args.seed)]
    write_bank(records, args.output_dir)
    if args.stats:
        from .template_stats import bank_statistics, statistics_markdown

        stats = bank_statistics(records)
        Path(args.stats).write_text(
            statistics_markdown(stats, generator_name=type(generator).__name__), encoding="utf-8"
        )


if __name__ == "__main__":
    main()
