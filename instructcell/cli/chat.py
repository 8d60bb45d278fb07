"""``instructcell chat``: a conversation over the cells of an .h5ad."""

from __future__ import annotations

import re
from collections import Counter
from typing import TextIO

import anndata
import numpy as np

from instructcell import inference
from instructcell.inference.files import read_anndata, write_anndata
from instructcell.outputs import check_destination
from instructcell.tasks import get_task
from modeling_instructcell.pipeline_instructcell import PromptTooLongError

from .common import (
    add_model_arguments,
    model_source,
    non_negative_int,
    obs_label_set,
    parse_labels,
    positive_int,
)

PROMPT = "you> "


def add_parsers(subparsers) -> None:
    """Register ``chat``."""
    chat = subparsers.add_parser("chat", help="interactive conversation over an .h5ad")
    add_model_arguments(chat)
    chat.add_argument("input", help=".h5ad file")
    chat.add_argument("--labels")
    chat.add_argument("--labels-from-obs", metavar="COLUMN")
    chat.add_argument("--template", default=get_task("cta").default_instruction)
    chat.add_argument(
        "--history-turns", type=non_negative_int, default=4, help="previous turns kept in the prompt"
    )
    chat.add_argument("--max-new-tokens", type=positive_int, default=32)
    chat.set_defaults(run=run)


HELP = """Ask about the loaded cells, e.g.
  what are cells 0-99?            annotate a range (becomes the current selection)
  generate 50 naive B cells like these   sample cells conditioned on the selection's metadata
  which genes drive that call?    gradient saliency of the last call's label
  save generated to out.h5ad      write the last generated cells (to a new file)
  anything else                   free-text question (conversation history is kept in the prompt)
  quit"""

_RANGE = re.compile(r"\bcells?\s+(\d+)(?:\s*(?:-|–|to|\.\.)\s*(\d+))?", re.IGNORECASE)
_GENERATE = re.compile(
    r"^\s*(?:please\s+)?(?:generate|simulate|make)\s+(\d+)\s+(.+?)\s*[?.!]*\s*$", re.IGNORECASE
)
_SALIENCY = re.compile(r"\b(which|what)\s+genes?\b|\bwhy\b|\bdrive", re.IGNORECASE)
_SAVE = re.compile(
    r"^\s*save\s+(?:generated\s+)?(?:cells\s+)?(?:to\s+)?(\S+\.(?:h5ad|zarr))\s*$", re.IGNORECASE
)


class ChatSession:
    """State of one ``instructcell chat`` conversation (also usable from Python)."""

    def __init__(
        self,
        pipe,
        adata: anndata.AnnData,
        labels=None,
        template: str | None = None,
        history_turns: int = 4,
        max_new_tokens: int = 32,
        batch_size: int = 64,
    ):
        self.pipe, self.adata, self.labels = pipe, adata, labels
        self.template = template or get_task("cta").default_instruction
        self.history_turns, self.max_new_tokens, self.batch_size = history_turns, max_new_tokens, batch_size
        self.history: list[tuple[str, str]] = []
        self.selection: np.ndarray | None = None
        self.last_call: tuple[np.ndarray, str] | None = None
        self.generated: anndata.AnnData | None = None

    def _history_prefix(self, n_turns: int) -> str:
        turns = self.history[-n_turns:] if n_turns > 0 else []
        text = "".join(f"User: {user}\nAssistant: {reply}\n" for user, reply in turns)
        return text.replace("{", "{{").replace("}", "}}")

    def _with_history(self, ask):
        """Call ``ask(history_prefix)`` with the last ``history_turns`` turns, fewer while it is too long."""
        for n_turns in range(min(self.history_turns, len(self.history)), -1, -1):
            try:
                return ask(self._history_prefix(n_turns))
            except PromptTooLongError:
                if n_turns == 0:
                    raise
        raise AssertionError("unreachable: the loop returns or raises")

    def _cells(self, rows: np.ndarray) -> anndata.AnnData:
        view = self.adata[rows]
        return view.to_memory() if getattr(self.adata, "isbacked", False) else view.copy()

    def respond(self, message: str) -> str:
        """Answer one user message and append the turn to the history."""
        message = message.strip()
        if not message:
            return ""
        try:
            reply = self._dispatch(message)
        except (ValueError, OSError) as err:  # the session goes on after bad input or a failed write
            reply = f"Sorry, I could not do that: {err}"
        self.history.append((message, reply.splitlines()[0] if reply else reply))
        return reply

    def _dispatch(self, message: str) -> str:
        if message.lower() in ("help", "?"):
            return HELP
        if match := _SAVE.match(message):
            if self.generated is None:
                return "Nothing generated yet; try 'generate 50 B cells like these'."
            path = check_destination(match.group(1), overwrite=False, flag=None)  # never replaces a file
            write_anndata(self.generated, path)
            return f"Saved {self.generated.n_obs} generated cells to {path}."
        if match := _GENERATE.match(message):
            return self._generate(int(match.group(1)), match.group(2))
        if _SALIENCY.search(message) and self.last_call is not None and not _RANGE.search(message):
            return self._saliency()
        if match := _RANGE.search(message):
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) else first
            return self._annotate(first, last)
        return self._free_text(message)

    def _annotate(self, first: int, last: int) -> str:
        n = self.adata.n_obs
        if first > last or last >= n:
            raise ValueError(f"cells {first}-{last} are outside 0-{n - 1}.")
        rows = np.arange(first, last + 1)
        cells = self._cells(rows)
        results = self._with_history(
            lambda history: self.pipe(
                history + self.template,
                cells=cells,
                labels=self.labels,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
            )
        )
        calls = [
            r["label"] if r["label"] is not None else (r["argmax_label"] or r["answer"]) for r in results
        ]
        self.selection = rows
        top = Counter(calls).most_common()
        self.last_call = (rows, top[0][0])
        parts = []
        for label, count in top[:6]:
            probs = [
                r["label_probabilities"][label]
                for r in results
                if r["label_probabilities"] and label in r["label_probabilities"]
            ]
            detail = f" (mean p={np.mean(probs):.2f})" if probs else ""
            parts.append(f"{count} x {label!s}{detail}")
        what = f"Cell {first} is" if first == last else f"Cells {first}-{last}:"
        return f"{what} " + ", ".join(parts) + "."

    def _generate(self, n_cells: int, phrase: str) -> str:
        like_these = bool(re.search(r"\blike (these|those|them|this)\b", phrase, re.IGNORECASE))
        cell_type = re.sub(
            r"\s*\blike (these|those|them|this)( cells?)?\b", "", phrase, flags=re.IGNORECASE
        ).strip()
        cell_type = re.sub(r"\bcells$", "cell", cell_type)
        condition = {"cell_type": cell_type}
        library = None
        if like_these and self.selection is not None:
            obs = self.adata.obs.iloc[self.selection]
            for name in ("species", "tissue", "sequencing_method"):
                values = obs[name].dropna() if name in obs.columns else ()
                if len(values):  # the most common present value; missing values never become "nan"
                    condition[name] = str(values.astype(str).mode().iloc[0])
            cells = self._cells(self.selection)
            values = self.pipe.processor.feature_extractor(cells, return_tensors="np")["cell_values"]
            library = max(1, round(float(np.median(values.sum(1)))))
        template = inference.generation_template(condition)
        self.generated = self._with_history(
            lambda history: inference.generate_cells(
                self.pipe,
                [condition],
                n_cells=n_cells,
                template=history + template,
                library_size=library,
                progress=False,
                max_new_tokens=self.max_new_tokens,
            )
        )
        totals = np.asarray(self.generated.X.sum(1)).ravel()
        described = ", ".join(f"{k}={v}" for k, v in condition.items())
        return (
            f"Generated {self.generated.n_obs} cells ({described}); median {np.median(totals):.0f} "
            "counts per cell. Say 'save generated to <file>.h5ad' to keep them."
        )

    def _saliency(self) -> str:
        rows, label = self.last_call
        if self.labels is None or label not in self.labels:
            labels = None
        else:
            labels = self.labels
        frame = inference.gene_saliency(
            self.pipe,
            self._cells(rows),
            label,
            labels=labels,
            template=self.template,
            top_k=10,
            batch_size=self.batch_size,
        )
        genes = ", ".join(f"{gene} ({'+' if g > 0 else '-'})" for gene, g in frame["mean_gradient"].items())
        return (
            f"Top genes behind '{label}' for {len(rows)} cells (vanilla gradient of log p; + = more counts "
            f"favour it): {genes}."
        )

    def _free_text(self, message: str) -> str:
        message = message.replace("{", "{{").replace("}", "}}")
        result = self._with_history(
            lambda history: self.pipe(history + message, max_new_tokens=self.max_new_tokens)[0]
        )
        return result["answer"] or "(the model gave an empty answer)"


def run(args, stdin: TextIO, out: TextIO) -> int:
    """Load the file and answer messages from ``stdin`` until "quit" or end of input."""
    adata = read_anndata(args.input)
    if args.labels and args.labels_from_obs:
        raise ValueError("Give either --labels or --labels-from-obs, not both.")
    labels = parse_labels(args.labels) if args.labels else None
    if args.labels_from_obs:
        labels = obs_label_set(adata, args.labels_from_obs)
    session = ChatSession(
        model_source(args).load(),
        adata,
        labels=labels,
        template=args.template,
        history_turns=args.history_turns,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    print(
        f"Loaded {args.input}: {adata.n_obs} cells x {adata.n_vars} genes. Type 'help' for examples, "
        "'quit' to leave.",
        file=out,
    )
    try:
        while True:
            print(PROMPT, end="", file=out, flush=True)
            line = stdin.readline()
            if not line or line.strip().lower() in ("quit", "exit", "bye"):
                break
            reply = session.respond(line)
            if reply:
                print(f"instructcell> {reply}", file=out, flush=True)
    finally:
        if adata.isbacked:
            adata.file.close()
    print("", file=out)
    return 0
