"""``single-cell-instruction``: a transformers pipeline that answers instructions about cells.

Hub remote code: only stdlib, numpy, torch, transformers and the sibling files are imported at module level;
anndata is imported in a ``try:`` block (transformers' ``check_imports`` skips those), and without it the
generated cells come back as a numpy array instead of an AnnData.

Inputs
------
An instruction (a template with the paper's placeholders ``{input}``, ``{species}``, ``{tissue}``,
``{sequencing_method}``, ``{drug}``, ``{cell_type}``, ``{choices}``, or plain text), plus optionally
``cells`` (AnnData, possibly backed or a view, sparse matrix, array, DataFrame) and ``metadata`` (one dict
for all prompts, or one dict per prompt). One instruction with ``n`` cells gives ``n`` prompts; without
cells a list of ``n`` metadata dicts gives ``n`` prompts (e.g. ``n`` generation requests). Prompts are run
``batch_size`` at a time (``pipe(..., batch_size=64)`` sets the number of **prompts** per model call;
default :data:`DEFAULT_BATCH_SIZE`).

Outputs
-------
One dict per prompt:

``answer``
    The greedy (or configured) generated text; ``None`` with ``generate=False``.
``label``
    With a known label set: the label parsed from ``answer`` (``extract_label``), or, with ``generate=False``,
    the most probable label. ``None`` when the answer names no label or several, or without a label set.
``probability``
    Probability of ``label`` under the label distribution (``None`` without one).
``label_probabilities``
    ``{label: probability}`` over the label set: every candidate answer scored in one batched decoder pass
    over a shared encoder pass (:meth:`InstructCellForConditionalGeneration.score_labels`).
``argmax_label``
    The most probable label.
``has_signal`` / ``cells``
    Whether the answer asked for a cell (``<SIGNAL>``); if so, ``num_cells`` sampled cells as an AnnData
    (integer counts in ``X``, ``var_names`` = the gene vocabulary, ``obs`` = the request's metadata).

The label set is, in order of precedence: the ``labels=`` argument; the ``choices`` metadata when the
instruction has a ``{choices}`` placeholder; ``model.config.label_names`` (a list saved with a fine-tuned
model). Candidate answers are ``answer_template.format(output=label)``: the default ``"{output}"`` is the
instruct variant's answer (the label itself). For chat-variant models pass the response template the model
was trained with (e.g. ``"This is {output}."``), or ``answer_template="auto"``: each prompt's own greedy
answer with the parsed label's text replaced by each candidate (falls back to the bare label when the answer
names no label verbatim).

A ``{choices}`` placeholder without ``choices`` metadata is filled with the label set. Two labels the
tokenizer cannot tell apart are refused, and so is a prompt longer than :func:`max_prompt_tokens`
(:class:`PromptTooLongError`), before the model runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.pipelines.base import ChunkPipeline

from .answer_extraction import extract_label
from .processing_instructcell import metadata_from_obs, template_fields

try:  # optional: generated cells are returned as AnnData when it is installed
    import anndata
    import pandas as pd
except ImportError:  # pragma: no cover - anndata is a dependency of the package, not of remote code
    anndata = None
    pd = None

TASK = "single-cell-instruction"

#: Longest prompt, in tokens, when neither the language model (``max_position_embeddings``) nor the tokenizer
#: (``model_max_length``) states one, as with T5's relative positions and a tokenizer trained offline. Memory
#: of the encoder's attention grows with the square of the length: 20,000 tokens need gigabytes per prompt.
DEFAULT_MAX_PROMPT_TOKENS = 1024

#: Prompts per model call when none is given: the fastest of 16, 64, 128 and 256 on 2 CPU cores for greedy
#: answers and label scoring, at 6.6M and 20M parameters (docs/speed.md).
DEFAULT_BATCH_SIZE = 128

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_PROMPT_TOKENS",
    "TASK",
    "InstructCellPipeline",
    "PromptTooLongError",
    "candidate_answers",
    "max_prompt_tokens",
    "resolve_label_set",
]


class PromptTooLongError(ValueError):
    """An instruction longer than the model reads (see :func:`max_prompt_tokens`)."""


def max_prompt_tokens(config: Any, tokenizer: Any) -> int:
    """Return the longest prompt the model reads: its position limit, else the tokenizer's, else the default.

    Parameters
    ----------
    config : InstructCellConfig or None
        ``text_config.max_position_embeddings`` (or ``n_positions``) bounds decoder-only backbones.
    tokenizer : PreTrainedTokenizerBase
        ``model_max_length`` (512 for the published T5 tokenizer); ignored when it is transformers'
        "no limit" sentinel.

    Returns
    -------
    int
    """
    text_config = getattr(config, "text_config", None)
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(text_config, name, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return DEFAULT_MAX_PROMPT_TOKENS


def _check_distinguishable(labels: Sequence[str], ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Refuse a label set in which two candidate answers tokenize to the same ids (they cannot be scored)."""
    seen: dict[tuple[int, ...], str] = {}
    for label, row, keep in zip(labels, ids.tolist(), mask.tolist(), strict=True):
        key = tuple(token for token, kept in zip(row, keep, strict=True) if kept)
        if key in seen:
            raise ValueError(
                f"The labels {seen[key]!r} and {label!r} are the same to this model's tokenizer (e.g. "
                "characters it does not know become the same unknown token); rename one of them."
            )
        seen[key] = label


def resolve_label_set(
    instruction: str,
    labels: Sequence[str] | None,
    metadata_rows: Sequence[Mapping[str, Any]],
    config: Any = None,
) -> list[str] | None:
    """Return the label set: ``labels``, else ``{choices}`` metadata, else ``config.label_names``."""
    if labels is not None:
        if isinstance(labels, str):
            raise ValueError("`labels` must be a list of label strings, not one string.")
        labels = [str(label) for label in labels]
    elif "choices" in template_fields(instruction) and metadata_rows:
        choices = metadata_rows[0].get("choices")
        if isinstance(choices, str):
            choices = [c.strip() for c in choices.split(",")]
        labels = None if choices is None else [str(c) for c in choices]
    elif config is not None and getattr(config, "label_names", None):
        labels = [str(label) for label in config.label_names]
    if labels is None:
        return None
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"A label set needs at least two distinct labels, got {labels}.")
    return labels


def candidate_answers(labels: Sequence[str], answer_template: str = "{output}") -> list[str]:
    """Candidate answer texts: ``answer_template`` with ``{output}`` replaced by each label."""
    if "{output}" not in answer_template:
        raise ValueError(f"answer_template must contain '{{output}}', got {answer_template!r}.")
    return [answer_template.replace("{output}", label) for label in labels]


def _auto_template(answer: str | None, label: str | None) -> str:
    """Turn the model's own answer into a template: the parsed label becomes ``{output}`` (chat)."""
    if answer and label:
        start = answer.lower().find(label.lower())
        if start >= 0:
            return answer[:start] + "{output}" + answer[start + len(label) :]
    return "{output}"


def generated_cells_to_anndata(counts: np.ndarray, gene_names: Sequence[str] | None, obs_rows: list[dict]):
    """Integer counts ``(n, n_genes)`` and one obs dict per cell as an AnnData (a dict without anndata)."""
    if anndata is None:
        return {"X": counts, "var_names": list(gene_names or []), "obs": obs_rows}
    try:
        import scipy.sparse as sparse
    except ImportError:  # pragma: no cover - anndata depends on scipy
        sparse = None
    obs = pd.DataFrame(obs_rows, index=[str(i) for i in range(len(obs_rows))])
    for column in obs.columns:
        if obs[column].map(lambda v: isinstance(v, (list, tuple))).any():
            obs[column] = obs[column].map(
                lambda v: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            )
    counts = counts.astype(np.int32)
    X = sparse.csr_matrix(counts) if sparse is not None else counts
    var = pd.DataFrame(index=[str(g) for g in gene_names]) if gene_names is not None else None
    return anndata.AnnData(X=X, obs=obs, var=var)


class InstructCellPipeline(ChunkPipeline):
    """Answer instructions about single cells; label probabilities and generated cells included.

    A :class:`~transformers.ChunkPipeline` (a ``Pipeline`` whose ``preprocess`` yields chunks): one request
    (instruction + cells/metadata) is cut into chunks of ``batch_size`` prompts, each chunk is one batched
    ``generate`` (+ one ``score_labels``) call under ``torch.inference_mode``, and the chunks' outputs are
    joined into one list with a dict per prompt (see the module docstring). The prompts of a chunk are
    encoded once (:meth:`~InstructCellForConditionalGeneration.encode_prompts`); the answer, the ``<SIGNAL>``
    states and the label scores all read that encoding.

    Call parameters
    ---------------
    cells, metadata, labels, instruction
        As the keys of a dict input (the dict wins).
    answer_template : str
        ``"{output}"`` (default), a response template with ``{output}``, or ``"auto"``.
    generate : bool
        Generate the answer text (default True). ``False`` only scores the label set (fast annotation).
    num_cells : int
        Cells sampled per answer with ``<SIGNAL>`` (default 1).
    return_probabilities : bool
        Score the label set (default True). False skips the scoring pass: labels are parsed from the
        greedy answers only and ``probability`` is None (fastest annotation).
    force_signal : bool
        Treat every prompt as a generation request: answers without ``<SIGNAL>`` get one appended and still
        condition the VAE (default False).
    seed, library_size
        Passed to ``generate_cells``: the sampler's seed, and the total counts the cell decoder is conditioned
        on (its library input; the sampled totals scatter around the decoder's rate, they are not equal to
        it). :func:`instructcell.inference.generate_cells` gives every generated cell exactly that total.
    max_new_tokens, generate_kwargs
        Generation settings (the model's ``generation_config`` otherwise).
    gene_names, layer, alignment
        Gene names of unnamed arrays, the AnnData layer with raw counts, a precomputed ``GeneAlignment``.
    batch_size
        Prompts per model call (default :data:`DEFAULT_BATCH_SIZE`, 128).
    """

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False

    _preprocess_keys = (
        "cells",
        "metadata",
        "labels",
        "instruction",
        "answer_template",
        "gene_names",
        "layer",
        "alignment",
        "generate",
    )
    _forward_keys = (
        "return_probabilities",
        "max_new_tokens",
        "generate_kwargs",
        "num_cells",
        "seed",
        "library_size",
        "force_signal",
        "max_rows_per_pass",
    )

    def _sanitize_parameters(self, **kwargs):
        preprocess = {key: kwargs.pop(key) for key in self._preprocess_keys if key in kwargs}
        forward = {key: kwargs.pop(key) for key in self._forward_keys if key in kwargs}
        if "generate" in preprocess:
            forward["generate"] = preprocess["generate"]
        if "answer_template" in preprocess:
            forward["answer_template"] = preprocess["answer_template"]
        if "cell_batch_size" in kwargs:
            preprocess["batch_size"] = kwargs.pop("cell_batch_size")
        if kwargs:
            raise ValueError(f"Unknown arguments {sorted(kwargs)} for the {TASK} pipeline.")
        return preprocess, forward, {}

    def __call__(self, inputs=None, *args, batch_size: int | None = None, **kwargs):
        """Run one request (or a list of requests); ``batch_size`` = prompts per model call."""
        size = (self._batch_size or DEFAULT_BATCH_SIZE) if batch_size is None else batch_size
        return super().__call__(inputs, *args, batch_size=1, cell_batch_size=size, **kwargs)

    def get_inference_context(self):
        """Run ``_forward`` under ``torch.inference_mode`` (faster than no_grad)."""
        return torch.inference_mode

    # ------------------------------------------------------------------ preprocess
    def preprocess(  # noqa: D102 - the call parameters are documented on the class
        self,
        inputs,
        cells=None,
        metadata=None,
        labels=None,
        instruction=None,
        answer_template: str = "{output}",
        gene_names=None,
        layer=None,
        alignment=None,
        generate: bool = True,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        if isinstance(inputs, Mapping):
            request = dict(inputs)
            instruction = request.pop("instruction", request.pop("text", instruction))
            cells = request.pop("cells", cells)
            metadata = request.pop("metadata", metadata)
            labels = request.pop("labels", labels)
            if request:
                raise ValueError(
                    f"Unknown input keys {sorted(request)}; use instruction, cells, metadata, labels."
                )
        elif isinstance(inputs, str):
            instruction = inputs
        elif inputs is not None:
            raise ValueError(
                f"Pass an instruction string or a dict with 'instruction', got {type(inputs).__name__}."
            )
        if not instruction or not isinstance(instruction, str):
            raise ValueError("Pass an instruction: a template with placeholders or plain text.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}.")
        if not generate and answer_template == "auto":
            raise ValueError(
                "answer_template='auto' scores labels inside the generated answer; keep generate=True."
            )

        processor = self.processor
        extractor = processor.feature_extractor
        parsed = None
        if cells is not None:
            parsed = extractor._parse_input(cells, gene_names, None, layer)
            if parsed.n_cells == 0:
                raise ValueError("The input has 0 cells; pass at least one cell (row).")
            if alignment is None:
                if parsed.gene_names is None and parsed.gene_ids is None:
                    alignment = extractor(parsed.matrix[:1], return_alignment=True)[1]
                else:
                    alignment = extractor.align_genes(parsed.gene_names, parsed.gene_ids)
            n_prompts = parsed.n_cells
        elif metadata is not None and not isinstance(metadata, Mapping):
            n_prompts = len(metadata)
        else:
            n_prompts = 1
        rows = metadata_from_obs(getattr(cells, "obs", None), n_prompts)
        if isinstance(metadata, Mapping):
            rows = [{**row, **metadata} for row in rows]
        elif metadata is not None:
            metadata = list(metadata)
            if len(metadata) != n_prompts:
                raise ValueError(
                    f"Got {len(metadata)} metadata dicts for {n_prompts} prompts; pass one per prompt."
                )
            rows = [{**row, **dict(extra)} for row, extra in zip(rows, metadata, strict=True)]
        label_set = resolve_label_set(instruction, labels, rows, getattr(self.model, "config", None))
        if not generate and label_set is None:
            raise ValueError(
                "generate=False only scores a label set: pass labels=[...] (or {choices} metadata)."
            )
        if label_set is not None and "choices" in template_fields(instruction):
            rows = [row if row.get("choices") is not None else {**row, "choices": label_set} for row in rows]
        candidates = None
        if label_set is not None and answer_template != "auto":
            texts = candidate_answers(label_set, answer_template)
            candidates = processor.tokenizer(texts, padding=True, return_tensors="pt")
            _check_distinguishable(label_set, candidates["input_ids"], candidates["attention_mask"])
        max_tokens = max_prompt_tokens(getattr(self.model, "config", None), processor.tokenizer)

        for start in range(0, n_prompts, batch_size):
            stop = min(start + batch_size, n_prompts)
            chunk_rows = rows[start:stop]
            kwargs = {"metadata": chunk_rows, "return_tensors": "pt"}
            if parsed is not None:
                values = extractor(parsed.matrix[start:stop], alignment=alignment, return_tensors="np")[
                    "cell_values"
                ]
                kwargs["cells"] = values
            encoding = processor(text=[instruction] * (stop - start), **kwargs)
            length = int(encoding["input_ids"].shape[-1])
            if length > max_tokens:
                raise PromptTooLongError(
                    f"The instruction is {length} tokens long (cell slots included); this model reads at "
                    f"most {max_tokens}. Shorten it."
                )
            yield {
                "model_inputs": dict(encoding),
                "candidate_ids": None if candidates is None else candidates["input_ids"],
                "candidate_mask": None if candidates is None else candidates["attention_mask"],
                "labels": label_set,
                "rows": chunk_rows,
                "is_last": stop == n_prompts,
            }

    # ------------------------------------------------------------------ forward
    def _forward(
        self,
        model_inputs,
        max_new_tokens=None,
        generate_kwargs=None,
        num_cells: int = 1,
        seed=None,
        library_size=None,
        force_signal: bool = False,
        max_rows_per_pass=None,
        generate: bool = True,
        answer_template: str = "{output}",
        return_probabilities: bool = True,
    ):
        inputs = model_inputs["model_inputs"]
        out = {
            "rows": model_inputs["rows"],
            "labels": model_inputs["labels"],
            "is_last": model_inputs["is_last"],
        }
        model = self.model
        label_set = model_inputs["labels"]
        scores_labels = label_set is not None and (return_probabilities or not generate)
        # One encoder pass serves the answer, the <SIGNAL> states and the label scores.
        encoder_outputs = None
        if not model.config.use_decoder_only_language_model and (generate or scores_labels):
            encoder_outputs = model.encode_prompts(
                inputs.get("input_ids"), inputs.get("attention_mask"), inputs.get("cell_values")
            )
        if generate:
            kwargs = dict(generate_kwargs or {})
            if max_new_tokens is not None:
                kwargs["max_new_tokens"] = max_new_tokens
            if encoder_outputs is None:
                sequences = model.generate(**inputs, **kwargs)
            else:
                sequences = model.generate(
                    attention_mask=inputs.get("attention_mask"), encoder_outputs=encoder_outputs, **kwargs
                )
            if force_signal:
                sequences = self._append_signal(sequences)
            states, has_signal = model.signal_states_for_sequences(
                inputs.get("input_ids"),
                inputs.get("attention_mask"),
                inputs.get("cell_values"),
                sequences,
                encoder_outputs=encoder_outputs,
            )
            out["answers"] = self.processor.post_process_generation(sequences)
            out["has_signal"] = has_signal
            if states.shape[0]:
                generator = (
                    None if seed is None else torch.Generator(device=states.device).manual_seed(int(seed))
                )
                out["generated"] = model.sample_signal_cells(
                    states,
                    has_signal,
                    inputs.get("input_ids"),
                    inputs.get("cell_values"),
                    num_cells=num_cells,
                    library_size=library_size,
                    generator=generator,
                ).long()
                out["request_index"] = torch.nonzero(has_signal).flatten().repeat_interleave(num_cells)
        if scores_labels:
            candidate_ids, candidate_mask = model_inputs["candidate_ids"], model_inputs["candidate_mask"]
            if candidate_ids is None:  # answer_template="auto": per-prompt candidates from the greedy answer
                texts = []
                for answer in out["answers"]:
                    template = _auto_template(answer["text"], extract_label(answer["text"], label_set))
                    texts.extend(candidate_answers(label_set, template))
                encoded = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
                shape = (len(out["answers"]), len(label_set), -1)
                candidate_ids = encoded["input_ids"].reshape(shape)
                candidate_mask = encoded["attention_mask"].reshape(shape)
            scores = model.score_labels(
                inputs.get("input_ids"),
                inputs.get("attention_mask"),
                inputs.get("cell_values"),
                candidate_ids.to(self.device),
                candidate_mask.to(self.device),
                max_rows_per_pass=max_rows_per_pass,
                encoder_outputs=encoder_outputs,
            )
            out["probabilities"] = scores.probabilities
        return out

    def _append_signal(self, sequences: torch.Tensor) -> torch.Tensor:
        """Put ``<SIGNAL>`` after the last real token of answers that lack one."""
        config = self.model.config
        signal = config.signal_token_index
        has_signal = (sequences == signal).any(-1)
        if bool(has_signal.all()):
            return sequences
        pad = config.text_config.pad_token_id or 0
        eos = config.text_config.eos_token_id
        sequences = torch.cat([sequences, torch.full_like(sequences[:, :1], pad)], dim=1)
        start = 1 if config.is_encoder_decoder else 0
        for row in torch.nonzero(~has_signal).flatten().tolist():
            tokens = sequences[row, start:]
            real = torch.nonzero((tokens != pad) & (tokens != eos)).flatten()
            position = start + (int(real[-1]) + 1 if real.numel() else 0)
            sequences[row, position] = signal
            sequences[row, position + 1 :] = pad
        return sequences

    # ------------------------------------------------------------------ postprocess
    def postprocess(self, all_outputs):
        """Join the chunks' outputs into one dict per prompt (see the module docstring)."""
        results = []
        gene_names = getattr(self.processor.feature_extractor, "gene_names", None)
        for out in all_outputs:
            label_set = out["labels"]
            probabilities = out.get("probabilities")
            answers = out.get("answers")
            n = len(out["rows"])
            generated = out.get("generated")
            request_index = out.get("request_index")
            for i in range(n):
                result: dict[str, Any] = {"answer": None if answers is None else answers[i]["text"]}
                label = probability = argmax_label = distribution = None
                if probabilities is not None:
                    p = probabilities[i].float().cpu().numpy()
                    distribution = {name: float(v) for name, v in zip(label_set, p, strict=True)}
                    argmax_label = label_set[int(p.argmax())]
                    label = argmax_label if answers is None else extract_label(answers[i]["text"], label_set)
                    probability = None if label is None else distribution[label]
                elif label_set is not None and answers is not None:
                    label = extract_label(answers[i]["text"], label_set)
                result.update(
                    label=label,
                    probability=probability,
                    label_probabilities=distribution,
                    argmax_label=argmax_label,
                )
                if answers is not None:
                    result["has_signal"] = bool(answers[i]["has_signal"] or bool(out["has_signal"][i]))
                    if generated is not None and bool((request_index == i).any()):
                        counts = generated[request_index == i].cpu().numpy()
                        obs_row = {**out["rows"][i], "answer": result["answer"]}
                        result["cells"] = generated_cells_to_anndata(
                            counts, gene_names, [obs_row] * len(counts)
                        )
                results.append(result)
        return results


def _register() -> None:
    """Register the task with transformers' pipeline registry (local use; ``save_for_hub`` saves it)."""
    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    if TASK not in PIPELINE_REGISTRY.supported_tasks or (
        PIPELINE_REGISTRY.supported_tasks[TASK]["impl"] is not InstructCellPipeline
    ):
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=InstructCellPipeline, pt_model=AutoModel)
