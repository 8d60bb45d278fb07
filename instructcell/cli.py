"""``instructcell`` command line: annotate, predict-drug, generate, chat.

Examples
--------
::

    instructcell annotate MODEL data.h5ad -o annotated.h5ad --labels "B cells,CD14+ Monocytes,..."
    instructcell predict-drug MODEL pc9.h5ad -o pc9_pred.h5ad --drug erlotinib
    instructcell generate MODEL -o fake.h5ad --cell-type "naive B cell" --cell-type "CD14+ Monocyte" \
        --species human --tissue blood --n-cells 50
    instructcell chat MODEL data.h5ad --labels-from-obs cell_type
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from typing import TextIO

import anndata
import numpy as np

from instructcell import inference

PROMPT = "you> "


def _labels(args, adata: anndata.AnnData | None = None) -> list[str] | None:
    if getattr(args, "labels", None):
        return [label.strip() for label in args.labels.split(",") if label.strip()]
    column = getattr(args, "labels_from_obs", None)
    if column:
        if adata is None:
            adata = anndata.read_h5ad(args.input, backed="r")
        if column not in adata.obs.columns:
            raise SystemExit(f"error: obs has no column {column!r}; columns: {list(adata.obs.columns)}")
        values = adata.obs[column]
        return [
            str(v)
            for v in (values.cat.categories if hasattr(values, "cat") else sorted(set(values.astype(str))))
        ]
    return None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="bf16: language model in bfloat16"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, 0, ... (default: GPU if available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="use the model folder's own code")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per model call")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _annotate_args(parser: argparse.ArgumentParser, label_key: str, template: str) -> None:
    _common(parser)
    parser.add_argument("input", help=".h5ad file (read in backed mode, chunk by chunk)")
    parser.add_argument("-o", "--output", required=True, help="output .h5ad (may equal the input)")
    parser.add_argument(
        "--template", default=template, help="instruction with {input} (default: %(default)r)"
    )
    parser.add_argument("--labels", help="comma-separated label set")
    parser.add_argument("--labels-from-obs", metavar="COLUMN", help="take the label set from an obs column")
    parser.add_argument(
        "--label-key", default=label_key, help="obs column for the label (default: %(default)s)"
    )
    parser.add_argument("--probability-key", default=None, help="obs column for the probability")
    parser.add_argument(
        "--method",
        choices=["score", "generate"],
        default=None,
        help="score: arg-max of the label distribution (fast); generate: parse the greedy answer",
    )
    parser.add_argument("--layer", default=None, help="AnnData layer with raw counts (default X)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows read per chunk")
    parser.add_argument("--max-new-tokens", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with the four subcommands."""
    parser = argparse.ArgumentParser(
        prog="instructcell", description="Talk to single-cell data with InstructCell."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _annotate_args(
        sub.add_parser("annotate", help="annotate every cell of an .h5ad"),
        "instructcell_label",
        inference.CTA_TEMPLATE,
    )
    drug = sub.add_parser("predict-drug", help="predict drug response of every cell")
    _annotate_args(drug, "instructcell_drug_response", inference.DSP_TEMPLATE)
    drug.add_argument("--drug", help="drug name for {drug} (default: obs['drug'])")
    gen = sub.add_parser("generate", help="generate N cells per condition")
    _common(gen)
    gen.add_argument("-o", "--output", required=True, help="output .h5ad")
    gen.add_argument("--cell-type", action="append", default=[], help="a condition; repeat for several")
    gen.add_argument("--conditions", help="CSV with one condition per row (columns cell_type, species, ...)")
    gen.add_argument("--species")
    gen.add_argument("--tissue")
    gen.add_argument("--sequencing-method")
    gen.add_argument("--n-cells", type=int, default=100, help="cells per condition")
    gen.add_argument("--template", default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--library-size", type=float, default=None)
    gen.add_argument("--max-new-tokens", type=int, default=None)
    chat = sub.add_parser("chat", help="interactive conversation over an .h5ad")
    _common(chat)
    chat.add_argument("input", help=".h5ad file")
    chat.add_argument("--labels")
    chat.add_argument("--labels-from-obs", metavar="COLUMN")
    chat.add_argument("--template", default=inference.CTA_TEMPLATE)
    chat.add_argument("--history-turns", type=int, default=4, help="previous turns kept in the prompt")
    chat.add_argument("--max-new-tokens", type=int, default=32)
    return parser


def _pipe(args):
    return inference.load_pipeline(
        args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code
    )


def _call_kwargs(args) -> dict:
    return {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}


def _run_annotate(args, out: TextIO) -> int:
    pipe = _pipe(args)
    kwargs = dict(
        labels=_labels(args),
        template=args.template,
        output=args.output,
        label_key=args.label_key,
        method=args.method,
        layer=args.layer,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        progress=not args.quiet,
        **_call_kwargs(args),
    )
    kwargs["probability_key"] = args.probability_key or f"{args.label_key}_probability"
    if args.command == "predict-drug":
        kwargs["labels"] = kwargs["labels"] or list(inference.DRUG_RESPONSE_LABELS)
        path = inference.predict_drug(pipe, args.input, drug=args.drug, **kwargs)
    else:
        path = inference.annotate(pipe, args.input, **kwargs)
    result = anndata.read_h5ad(path, backed="r")
    counts = result.obs[args.label_key].value_counts(dropna=False)
    result.file.close()
    print(f"wrote {path}: obs[{args.label_key!r}] and obs[{kwargs['probability_key']!r}]", file=out)
    for label, count in counts.items():
        print(f"  {label}: {count}", file=out)
    return 0


def _run_generate(args, out: TextIO) -> int:
    import pandas as pd

    if args.conditions:
        rows = pd.read_csv(args.conditions).to_dict("records")
    elif args.cell_type:
        rows = [{"cell_type": cell_type} for cell_type in args.cell_type]
    else:
        raise SystemExit("error: give --cell-type (repeatable) or --conditions <csv>")
    shared = {"species": args.species, "tissue": args.tissue, "sequencing_method": args.sequencing_method}
    rows = [{**{k: v for k, v in shared.items() if v}, **row} for row in rows]
    adata = inference.generate_cells(
        _pipe(args),
        rows,
        n_cells=args.n_cells,
        template=args.template,
        output=args.output,
        batch_size=args.batch_size,
        seed=args.seed,
        library_size=args.library_size,
        progress=not args.quiet,
        **_call_kwargs(args),
    )
    print(
        f"wrote {args.output}: {adata.n_obs} cells x {adata.n_vars} genes for {len(rows)} conditions",
        file=out,
    )
    return 0


# ---------------------------------------------------------------------------------------------- chat
HELP = """Ask about the loaded cells, e.g.
  what are cells 0-99?            annotate a range (becomes the current selection)
  generate 50 naive B cells like these   sample cells conditioned on the selection's metadata
  which genes drive that call?    gradient saliency of the last call's label
  save generated to out.h5ad      write the last generated cells
  anything else                   free-text question (conversation history is kept in the prompt)
  quit"""

_RANGE = re.compile(r"\bcells?\s+(\d+)(?:\s*(?:-|–|to|\.\.)\s*(\d+))?", re.IGNORECASE)
_GENERATE = re.compile(
    r"^\s*(?:please\s+)?(?:generate|simulate|make)\s+(\d+)\s+(.+?)\s*[?.!]*\s*$", re.IGNORECASE
)
_SALIENCY = re.compile(r"\b(which|what)\s+genes?\b|\bwhy\b|\bdrive", re.IGNORECASE)
_SAVE = re.compile(r"^\s*save\s+(?:generated\s+)?(?:cells\s+)?(?:to\s+)?(\S+\.h5ad)\s*$", re.IGNORECASE)


class ChatSession:
    """State of one ``instructcell chat`` conversation (also usable from Python)."""

    def __init__(
        self,
        pipe,
        adata: anndata.AnnData,
        labels=None,
        template=inference.CTA_TEMPLATE,
        history_turns: int = 4,
        max_new_tokens: int = 32,
        batch_size: int = 64,
    ):
        self.pipe, self.adata, self.labels, self.template = pipe, adata, labels, template
        self.history_turns, self.max_new_tokens, self.batch_size = history_turns, max_new_tokens, batch_size
        self.history: list[tuple[str, str]] = []
        self.selection: np.ndarray | None = None
        self.last_call: tuple[np.ndarray, str] | None = None
        self.generated: anndata.AnnData | None = None

    def _history_prefix(self) -> str:
        turns = self.history[-self.history_turns :] if self.history_turns > 0 else []
        text = "".join(f"User: {user}\nAssistant: {reply}\n" for user, reply in turns)
        return text.replace("{", "{{").replace("}", "}}")

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
        except ValueError as err:
            reply = f"Sorry, I could not do that: {err}"
        self.history.append((message, reply.splitlines()[0] if reply else reply))
        return reply

    def _dispatch(self, message: str) -> str:
        if message.lower() in ("help", "?"):
            return HELP
        if match := _SAVE.match(message):
            if self.generated is None:
                return "Nothing generated yet; try 'generate 50 B cells like these'."
            with inference.atomic_output(match.group(1)) as tmp:
                self.generated.write_h5ad(tmp)
            return f"Saved {self.generated.n_obs} generated cells to {match.group(1)}."
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
        results = self.pipe(
            self._history_prefix() + self.template,
            cells=cells,
            labels=self.labels,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
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
                if name in obs.columns and len(obs):
                    condition[name] = str(obs[name].astype(str).mode().iloc[0])
            cells = self._cells(self.selection)
            values = self.pipe.processor.feature_extractor(cells, return_tensors="np")["cell_values"]
            library = float(np.median(values.sum(1)))
        template = inference.generation_template(condition)
        self.generated = inference.generate_cells(
            self.pipe,
            [condition],
            n_cells=n_cells,
            template=self._history_prefix() + template,
            library_size=library,
            progress=False,
            max_new_tokens=self.max_new_tokens,
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
        instruction = self._history_prefix() + message.replace("{", "{{").replace("}", "}}")
        result = self.pipe(instruction, max_new_tokens=self.max_new_tokens)[0]
        return result["answer"] or "(the model gave an empty answer)"


def _run_chat(args, stdin: TextIO, out: TextIO) -> int:
    adata = anndata.read_h5ad(args.input, backed="r")
    session = ChatSession(
        _pipe(args),
        adata,
        labels=_labels(args, adata),
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
        adata.file.close()
    print("", file=out)
    return 0


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Entry point of the ``instructcell`` console script; streams are injectable for tests."""
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("annotate", "predict-drug"):
            return _run_annotate(args, out)
        if args.command == "generate":
            return _run_generate(args, out)
        return _run_chat(args, stdin, out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
