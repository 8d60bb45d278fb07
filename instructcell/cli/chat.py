"""``instructcell chat``: a conversation with the model about the cells of an .h5ad.

Every message goes to the model with the conversation so far and the cells it refers to. ``cell 5``,
``cells 10-13`` or ``cells 1, 4 and 9`` name rows of the file: the reference becomes the cells' slots in the
message (``this cell <CELL>`` for one, ``cell 3: <CELL>, cell 4: <CELL>, ...`` for several, numbered through
the conversation as the model reads them), and the cells of earlier turns stay in the prompt, so
follow-up questions ("and cell 21?", "how sure are you?", "generate 20 more like the first") are answered by
the model from the whole conversation. An answer with ``<SIGNAL>`` samples cells (as many as the message
asks for, 10 by default). Only what the model cannot do is done here: saving generated cells to a file,
gene saliency of the last call, and a question about more cells than one prompt holds, which is asked about
each cell on its own and the answers counted.

The prompt keeps the last ``--history-turns`` turns, dropping the oldest ones first while the conversation
holds more than :data:`~instructcell.tasks.multicell.MAX_CELLS_PER_PROMPT` cells or more tokens than the model
reads (:func:`~modeling_instructcell.pipeline_instructcell.max_prompt_tokens`); a turn is never cut in the
middle, and a question too long on its own is refused with a message that says so. The turns kept are
numbered again from the first cell of the prompt (:func:`~instructcell.tasks.multicell.shift_cell_numbers`).
Generated cells are saved only to a new file: the chat never replaces one.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from instructcell import inference
from instructcell.inference.files import read_anndata, write_anndata
from instructcell.outputs import check_destination
from instructcell.tasks import get_task
from instructcell.tasks.multicell import (
    ANSWER_TOKENS,
    CONCLUSION_MARK,
    MAX_CELLS_PER_PROMPT,
    cell_list,
    conclusion,
    conversation,
    first_question_cell,
    parse_position,
    shift_cell_numbers,
)
from modeling_instructcell.answer_extraction import extract_label
from modeling_instructcell.pipeline_instructcell import (
    DEFAULT_BATCH_SIZE,
    PromptTooLongError,
    max_prompt_tokens,
)

from .common import (
    add_model_arguments,
    model_source,
    non_negative_int,
    obs_label_set,
    parse_labels,
    positive_int,
)

PROMPT = "you> "
#: Cells sampled for an answer with ``<SIGNAL>`` when the message names no number.
DEFAULT_CELLS_TO_GENERATE = 10

HELP = f"""Ask about the cells of the file; name them as cell 5, cells 10-13 or cells 1, 4 and 9. E.g.
  What cell types are in cells 0-7, and how many of each?
  Which of cells 10-13 is the B cell?          (the answer's cell number is followed by its file row)
  What is cell 20?    And cell 21?    How sure are you?
  Generate 20 more like the first one.          (samples cells when the model answers <SIGNAL>)
  save generated to out.h5ad                    write the last generated cells (to a new file)
  which genes drive that call?                  gradient saliency of the last answer's label
  quit
Up to {MAX_CELLS_PER_PROMPT} cells go into one prompt; about more cells, each cell is asked on its own and the
answers are counted."""

_RANGE = r"\d+(?:\s*(?:-|–|to|\.\.)\s*\d+)?"
_REFERENCE = re.compile(rf"\bcells?\s+#?({_RANGE}(?:\s*(?:,\s*and|,|and|&)\s*{_RANGE})*)", re.IGNORECASE)
_NUMBER = re.compile(r"\b(\d+)\b")
_SALIENCY = re.compile(r"\b(which|what)\s+genes?\b|\bwhy\b|\bdrive", re.IGNORECASE)
_SAVE = re.compile(
    r"^\s*save\s+(?:generated\s+)?(?:cells\s+)?(?:to\s+)?(\S+\.(?:h5ad|zarr))\s*$", re.IGNORECASE
)


def add_parsers(subparsers) -> None:
    """Register ``chat``."""
    chat = subparsers.add_parser("chat", help="interactive conversation over an .h5ad")
    add_model_arguments(chat)
    chat.add_argument("input", help=".h5ad file (or .zarr store)")
    chat.add_argument("--labels", help="comma-separated label set: names the calls counted and explained")
    chat.add_argument("--labels-from-obs", metavar="COLUMN", help="the label set from an obs column")
    chat.add_argument(
        "--history-turns", type=non_negative_int, default=2, help="earlier turns kept in the prompt at most"
    )
    chat.add_argument(
        "--max-new-tokens", type=positive_int, default=ANSWER_TOKENS, help="answer length, in tokens"
    )
    chat.add_argument("--seed", type=int, default=0, help="seed of the cell sampler")
    chat.set_defaults(run=run)


def _escape(text: str) -> str:
    """User text inside a prompt template: braces are literal."""
    return text.replace("{", "{{").replace("}", "}}")


def cell_references(message: str, n_obs: int) -> list[int]:
    """Return the file rows a message names (``cell 5``, ``cells 10-13``, ``cells 1, 4 and 9``), in order.

    Raises
    ------
    ValueError
        For a row outside the file or a reversed range.
    """
    rows: list[int] = []
    for match in _REFERENCE.finditer(message):
        for part in re.findall(_RANGE, match.group(1)):
            bounds = [int(n) for n in re.findall(r"\d+", part)]
            first, last = bounds[0], bounds[-1]
            if first > last or last >= n_obs:
                raise ValueError(f"cells {first}-{last} are outside the file's rows 0-{n_obs - 1}.")
            rows += range(first, last + 1)
    return rows


@dataclass
class Turn:
    """One answered message: the user's text, the model's answer, the rows of the cells it showed.

    ``first`` is the number its first cell had in the conversation when it was asked (the answer names the
    cells by those numbers).
    """

    message: str
    answer: str
    rows: list[int]
    first: int = 1


class ChatSession:
    """One ``instructcell chat`` conversation (also usable from Python: :meth:`respond`).

    Parameters
    ----------
    pipe : InstructCellPipeline
        The model and its processor.
    adata : AnnData
        The cells (raw counts), backed or in memory.
    labels : list of str, optional
        The label set: answers about many cells are counted by label, saliency explains a label of it.
    history_turns : int
        Earlier turns kept in the prompt at most.
    max_new_tokens : int
        Answer length.
    batch_size : int
        Prompts per model call (questions asked cell by cell).
    seed : int
        Seed of the cell sampler (turn ``t`` samples with ``seed + t``).
    """

    def __init__(
        self,
        pipe,
        adata: anndata.AnnData,
        labels: list[str] | None = None,
        history_turns: int = 2,
        max_new_tokens: int = ANSWER_TOKENS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int = 0,
    ):
        if history_turns < 0 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError("history_turns must be >= 0, max_new_tokens and batch_size >= 1.")
        self.pipe, self.adata, self.labels = pipe, adata, labels
        self.model, self.processor = pipe.model, pipe.processor
        self.history_turns, self.max_new_tokens, self.batch_size, self.seed = (
            history_turns,
            max_new_tokens,
            batch_size,
            seed,
        )
        self.max_tokens = max_prompt_tokens(self.model.config, self.processor.tokenizer)
        self.turns: list[Turn] = []
        self.generated: anndata.AnnData | None = None

    def respond(self, message: str) -> str:
        """Answer one message; a message the model answered joins the conversation."""
        message = message.strip()
        if not message:
            return ""
        try:
            return self._dispatch(message)
        except (ValueError, OSError) as err:  # the session goes on after bad input or a failed write
            return f"Sorry, I could not do that: {err}"

    def _dispatch(self, message: str) -> str:
        if message.lower() in ("help", "?"):
            return HELP
        if match := _SAVE.match(message):
            return self._save(match.group(1))
        rows = cell_references(message, self.adata.n_obs)
        if _SALIENCY.search(message) and not rows:
            return self._saliency()
        if len(rows) > MAX_CELLS_PER_PROMPT:
            return self._cell_by_cell(message, rows)
        return self._ask(message, rows)

    def _cells(self, rows: list[int]) -> anndata.AnnData:
        """Return the file rows ``rows`` in memory."""
        view = self.adata[rows]
        return view.to_memory() if getattr(self.adata, "isbacked", False) else view.copy()

    def _counts(self, rows: list[int]) -> np.ndarray:
        """Raw counts ``(len(rows), n_genes)`` of file rows in the model's gene order."""
        cells = self._cells(sorted(set(rows)))
        values = self.processor.feature_extractor(cells, return_tensors="np")["cell_values"]
        position = {row: i for i, row in enumerate(sorted(set(rows)))}
        return values[[position[row] for row in rows]]

    def _question(self, message: str, one_cell: bool = False, first: int = 1) -> str:
        """Replace every cell reference of the message by its cell slots, numbered as the model reads them.

        ``cells 10-13`` becomes ``cell 1: <CELL>, ..., cell 4: <CELL>`` (numbered from ``first``, the number
        of the message's first cell in the conversation); a message about one cell (or, with ``one_cell``,
        each cell of a message asked cell by cell) reads ``this cell <CELL>``.
        """
        token = self.processor.cell_start_token
        n_cells = 1 if one_cell else len(cell_references(message, self.adata.n_obs))
        parts, shown, end = [], 0, 0
        for match in _REFERENCE.finditer(message):
            parts.append(_escape(message[end : match.start()]))
            count = 1 if n_cells == 1 else len(cell_references(match.group(0), self.adata.n_obs))
            if n_cells == 1:
                parts.append("" if shown else f"this cell {token}")
            else:
                parts.append(cell_list(count, token, first=first + shown))
            shown += count
            end = match.end()
        return "".join(parts) + _escape(message[end:])

    def _history(self, kept: list[Turn]) -> list[tuple[str, str]]:
        """(user message, answer) of the kept turns, their cells numbered from the prompt's first cell."""
        history, first = [], 1
        for turn in kept:
            history.append(
                (
                    self._question(turn.message, first=first),
                    shift_cell_numbers(turn.answer, first - turn.first),
                )
            )
            first += len(turn.rows)
        return history

    def _encode(
        self, message: str, rows: list[int]
    ) -> tuple[dict[str, torch.Tensor], list[int], np.ndarray | None]:
        """Model inputs for ``message`` after the most recent earlier turns that fit (see the module).

        Also returns the file rows of the prompt's cells, kept turns first, and their raw counts
        ``(n_cells, n_genes)`` (None for a prompt without cells).
        """
        kept = self.turns[len(self.turns) - self.history_turns :] if self.history_turns else []
        while True:
            all_rows = [row for turn in kept for row in turn.rows] + rows
            if len(all_rows) <= MAX_CELLS_PER_PROMPT:
                question = self._question(message, first=first_question_cell(len(all_rows), len(rows)))
                prompt = conversation(self._history(kept), question)
                cells = self._counts(all_rows) if all_rows else None
                inputs = self.processor(text=[prompt], cells=cells)
                if inputs["input_ids"].shape[-1] <= self.max_tokens:
                    return {k: v.to(self.model.device) for k, v in inputs.items()}, all_rows, cells
            if not kept:
                length = inputs["input_ids"].shape[-1] if len(all_rows) <= MAX_CELLS_PER_PROMPT else None
                size = f"{length} tokens long" if length else f"about {len(all_rows)} cells"
                raise PromptTooLongError(
                    f"the question is {size} (cell slots included); this model reads at most "
                    f"{self.max_tokens} tokens and {MAX_CELLS_PER_PROMPT} cells: ask about fewer cells, or "
                    "in fewer words."
                )
            kept = kept[1:]

    @torch.inference_mode()
    def _ask(self, message: str, rows: list[int]) -> str:
        inputs, conversation_rows, counts = self._encode(message, rows)
        leftover = _REFERENCE.sub(" ", message)
        numbers = _NUMBER.findall(leftover)
        n_cells = int(numbers[0]) if numbers and int(numbers[0]) > 0 else DEFAULT_CELLS_TO_GENERATE
        library = None if counts is None else float(np.median(counts.sum(axis=1)))
        output = self.model.generate_cells(
            **inputs,
            num_cells=n_cells,
            library_size=library,
            seed=self.seed + len(self.turns),
            max_new_tokens=self.max_new_tokens,
        )
        answer = self.processor.post_process_generation(output.sequences)[0]["text"]
        first = first_question_cell(len(conversation_rows), len(rows))
        self.turns.append(Turn(message, answer, rows, first))
        reply = answer or "(the model gave an empty answer)"
        position = parse_position(conclusion(answer, CONCLUSION_MARK), len(conversation_rows))
        if position is not None and len(rows) > 1 and position >= first:
            reply += f" (cell {position} is row {rows[position - first]} of the file)"
        if bool(output.has_signal[0]):
            self.generated = self._generated_cells(output.cell_values, answer)
            totals = np.asarray(self.generated.X.sum(axis=1)).ravel()
            reply += (
                f" [sampled {self.generated.n_obs} cells, median {np.median(totals):.0f} counts; say 'save "
                "generated to FILE.h5ad' to keep them]"
            )
        return reply

    def _generated_cells(self, values: torch.Tensor, answer: str) -> anndata.AnnData:
        genes = list(self.processor.feature_extractor.gene_names)
        obs = pd.DataFrame(
            {"answer": [answer] * values.shape[0]}, index=[f"generated_{i}" for i in range(values.shape[0])]
        )
        matrix = sp.csr_matrix(values.cpu().numpy().astype(np.int32))
        return anndata.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes))

    @torch.inference_mode()
    def _cell_by_cell(self, message: str, rows: list[int]) -> str:
        """Ask the message about each cell on its own; count the answers (by label when labels are given)."""
        question = self._question(message, one_cell=True)
        answers = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            inputs = self.processor(text=[question] * len(chunk), cells=self._counts(chunk))
            inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
            sequences = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            answers += [a["text"] for a in self.processor.post_process_generation(sequences)]
        if self.labels:
            answers = [extract_label(a, self.labels) or a for a in answers]
        counted = ", ".join(f"{n} x {answer}" for answer, n in Counter(answers).most_common())
        return (
            f"More than {MAX_CELLS_PER_PROMPT} cells: I asked about each of the {len(rows)} cells on its "
            "own. "
            f"Answers: {counted}."
        )

    def _save(self, path: str) -> str:
        if self.generated is None:
            return "Nothing generated yet: ask, e.g., 'Generate 20 more like the first one.'"
        destination = check_destination(path, overwrite=False, flag=None)  # never replaces a file
        write_anndata(self.generated, destination)
        return f"Saved {self.generated.n_obs} generated cells to {destination}."

    def _saliency(self) -> str:
        shown = [turn for turn in self.turns if turn.rows]
        if not shown:
            return "No call to explain yet: ask about a cell first, e.g. 'What is cell 20?'."
        turn = shown[-1]
        label = extract_label(turn.answer, self.labels) if self.labels else None
        frame = inference.gene_saliency(
            self.pipe,
            self._cells(turn.rows),
            label or turn.answer,
            labels=self.labels if label else None,
            template=get_task("cta").default_instruction,
            top_k=10,
            batch_size=self.batch_size,
        )
        genes = ", ".join(f"{gene} ({'+' if g > 0 else '-'})" for gene, g in frame["mean_gradient"].items())
        return (
            f"Top genes behind '{label or turn.answer}' for {len(turn.rows)} cells (vanilla gradient of "
            "log p; "
            f"+ = more counts favour it): {genes}."
        )


def run(args, stdin: TextIO, out: TextIO) -> int:
    """Load the file and answer messages from ``stdin`` until "quit" or end of input."""
    if args.labels and args.labels_from_obs:
        raise ValueError("Give either --labels or --labels-from-obs, not both.")
    adata = read_anndata(args.input)
    try:
        labels = parse_labels(args.labels) if args.labels else None
        if args.labels_from_obs:
            labels = obs_label_set(adata, args.labels_from_obs)
        session = ChatSession(
            model_source(args).load(),
            adata,
            labels=labels,
            history_turns=args.history_turns,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        print(
            f"Loaded {args.input}: {adata.n_obs} cells x {adata.n_vars} genes. Type 'help' for examples, "
            "'quit' to leave.",
            file=out,
        )
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
