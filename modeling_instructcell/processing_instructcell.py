"""InstructCellProcessor: fills templates, expands cell slots, tokenizes text and featurizes cells."""

import json
import os
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.utils import cached_file

from .convert_original_instructcell import is_original_config_dict, load_original_gene_vocab
from .feature_extraction_instructcell import InstructCellFeatureExtractor

IGNORE_INDEX = -100

# The paper's template placeholders. `{input}` is the cell; `{output}` belongs to response templates.
CELL_PLACEHOLDER = "input"
METADATA_PLACEHOLDERS = ("species", "tissue", "sequencing_method", "drug", "cell_type", "choices")


def template_fields(template: str) -> list[str]:
    """Names of the ``{placeholders}`` in a template, in order (``"{{"`` escapes are skipped)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def is_present(value: Any) -> bool:
    """Tell whether a metadata value fills a placeholder: not None, NaN, pandas' NA/NaT or an empty string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return False
    if isinstance(value, (str, bytes, Sequence, Mapping)):
        return True
    if isinstance(value, np.ndarray):
        return value.size > 0
    try:
        return not bool(value != value)  # NaN, NaT and pd.NA are not equal to themselves
    except (TypeError, ValueError):  # pd.NA: its truth value is ambiguous
        return False


def metadata_from_obs(obs: Any, n_rows: int) -> list[dict[str, Any]]:
    """Return each row's placeholder values from the AnnData ``obs`` columns named like the placeholders.

    A missing value (NaN / None) is left out rather than written as the word "nan", so a template that needs
    it gets the clear missing-placeholder error. Returns ``n_rows`` empty dicts when ``obs`` is None or has
    another number of rows.
    """
    rows: list[dict[str, Any]] = [{} for _ in range(n_rows)]
    if obs is None or len(obs) != n_rows:
        return rows
    for name in METADATA_PLACEHOLDERS:
        if name not in obs.columns:
            continue
        column = obs[name]
        present = ~column.isna().to_numpy()
        for row, value, keep in zip(rows, column.astype(str).to_numpy(), present, strict=True):
            if keep:
                row[name] = value
    return rows


class InstructCellProcessor(ProcessorMixin):
    r"""Tokenizer + gene-vector featurizer for [`InstructCellForConditionalGeneration`].

    Instructions are written with the paper's placeholders: ``{input}`` for the cell, and ``{species}``,
    ``{tissue}``, ``{sequencing_method}``, ``{drug}``, ``{cell_type}``, ``{choices}`` for metadata.
    Each cell slot becomes ``<CELL>`` + ``num_query_tokens`` x ``<cell_query>`` + ``</CELL>``; the model
    scatters the cell embeddings into the ``<cell_query>`` positions. Text that already contains
    ``<CELL>`` (not expanded yet) is accepted as well.

    Parameters
    ----------
    feature_extractor : InstructCellFeatureExtractor
        Aligns cells to the gene vocabulary and returns raw counts ``cell_values``.
    tokenizer : PreTrainedTokenizerBase
        Any tokenizer; the four special tokens are added when missing (then resize the model's embeddings
        to ``len(processor.tokenizer)``).
    num_query_tokens : int
        Placeholders per cell; must equal the model's ``config.num_query_tokens``.
    prompt_format : str
        Wraps every filled instruction; must contain ``{prompt}``. The paper's is the default.
    cell_start_token, cell_end_token, cell_placeholder_token, signal_token : str
        The special tokens. ``<SIGNAL>`` in an answer asks the model's VAE for a cell.
    """

    def __init__(
        self,
        feature_extractor=None,
        tokenizer=None,
        num_query_tokens: int = 8,
        prompt_format: str = "User:\n{prompt}\n\nAssistant:\n",
        cell_start_token: str = "<CELL>",
        cell_end_token: str = "</CELL>",
        cell_placeholder_token: str = "<cell_query>",
        signal_token: str = "<SIGNAL>",
        **kwargs,
    ):
        if "{prompt}" not in prompt_format:
            raise ValueError(f"prompt_format must contain '{{prompt}}', got {prompt_format!r}.")
        self.num_query_tokens = num_query_tokens
        self.prompt_format = prompt_format
        self.cell_start_token = cell_start_token
        self.cell_end_token = cell_end_token
        self.cell_placeholder_token = cell_placeholder_token
        self.signal_token = signal_token
        if tokenizer is not None:
            self._add_special_tokens(tokenizer)
        super().__init__(feature_extractor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """Load a processor saved by this package, or build one for an original InstructCell checkpoint.

        A folder or Hub repo written by the original code (``zjunlp/InstructCell-chat`` / ``-instruct``) has
        no processor files, only the T5 tokenizer and an original ``config.json``. The processor is then built
        from that tokenizer, the original special tokens (``<CELL0>`` placeholder, ``<CELL1>`` signal) and
        ``num_query_tokens`` from the config, and a feature extractor over the original gene vocabulary.

        Parameters
        ----------
        pretrained_model_name_or_path : str or PathLike
            Local folder or Hub id.
        gene_names : list of str, optional
            Original checkpoints only: the checkpoint's gene vocabulary in column order. Defaults to the
            original 18,961-gene vocabulary (see ``load_original_gene_vocab``) when the checkpoint has 18,961
            genes; required otherwise.
        gene_vocab_file : str or PathLike, optional
            Original checkpoints only: a local copy of that vocabulary (``gene_vocab.npy`` or a text file).
        **kwargs
            Hub arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``...) and, for the
            native format, anything ``ProcessorMixin.from_pretrained`` accepts.
        """
        gene_names = kwargs.pop("gene_names", None)
        gene_vocab_file = kwargs.pop("gene_vocab_file", None)
        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            if key in kwargs
        }
        original_config = _original_config_dict(pretrained_model_name_or_path, hub_kwargs)
        if original_config is None:
            if gene_names is not None or gene_vocab_file is not None:
                raise ValueError(
                    "gene_names / gene_vocab_file only apply to original InstructCell checkpoints; a saved "
                    "processor already holds its gene vocabulary."
                )
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return cls._from_original_checkpoint(
            pretrained_model_name_or_path, original_config, gene_names, gene_vocab_file, hub_kwargs
        )

    @classmethod
    def _from_original_checkpoint(cls, path, config: dict, gene_names, gene_vocab_file, hub_kwargs: dict):
        encoder = config.get("feature_encoder_config") or {}
        n_genes = encoder.get("count_dim", 18961)
        if gene_names is None:
            if n_genes != 18961 and gene_vocab_file is None:
                raise ValueError(
                    f"This original checkpoint reads {n_genes} genes, not the published 18,961: pass "
                    "gene_names=[...] (its gene vocabulary in column order)."
                )
            gene_names = load_original_gene_vocab(gene_vocab_file)
        if len(gene_names) != n_genes:
            raise ValueError(
                f"The checkpoint reads {n_genes} genes but {len(gene_names)} gene names were given."
            )
        tokens = (config.get("base_model_config") or {}).get("special_tokens_dict") or {}
        signal_tokens = tokens.get("signal_tokens") or ["<CELL1>"]
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
        special = [
            tokens.get("start_tag", "<CELL>"),
            tokens.get("end_tag", "</CELL>"),
            tokens.get("placeholder", "<CELL0>"),
            *signal_tokens,
        ]
        # transformers 5.x reads the original added tokens as plain ones; the original treats them as special
        # (e.g. <CELL1> is dropped from decoded answers). Re-registering keeps their ids.
        tokenizer.add_tokens(
            [AddedToken(token, special=True, normalized=False) for token in special], special_tokens=True
        )
        return cls(
            # The original vocabulary holds human (ACTB) and mouse (Actb) symbols side by side, and the
            # original code aligns genes case-sensitively: so does this feature extractor.
            feature_extractor=InstructCellFeatureExtractor(gene_names=list(gene_names), case_sensitive=True),
            tokenizer=tokenizer,
            num_query_tokens=encoder.get("num_query_tokens", 8),
            cell_start_token=tokens.get("start_tag", "<CELL>"),
            cell_end_token=tokens.get("end_tag", "</CELL>"),
            cell_placeholder_token=tokens.get("placeholder", "<CELL0>"),
            signal_token=signal_tokens[0],
        )

    @property
    def special_tokens(self) -> list[str]:
        """The four tokens this processor needs in the tokenizer."""
        return [self.cell_start_token, self.cell_end_token, self.cell_placeholder_token, self.signal_token]

    def _add_special_tokens(self, tokenizer) -> None:
        vocab = tokenizer.get_vocab()
        missing = [token for token in self.special_tokens if token not in vocab]
        if missing:
            tokenizer.add_tokens(
                [AddedToken(token, special=True, normalized=False) for token in missing], special_tokens=True
            )

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The token-id fields of ``InstructCellConfig`` for this tokenizer."""
        ids = self.tokenizer.convert_tokens_to_ids(self.special_tokens)
        names = ("cell_start_token_index", "cell_end_token_index", "cell_token_index", "signal_token_index")
        return dict(zip(names, ids, strict=True))

    @property
    def model_input_names(self) -> list[str]:
        """Names of the tokenizer's inputs followed by the feature extractor's (``cell_values``)."""
        return list(self.tokenizer.model_input_names) + list(self.feature_extractor.model_input_names)

    def fill_template(self, template: str, metadata: Mapping[str, Any] | None = None) -> str:
        """Fill every placeholder of an instruction template; ``{input}`` becomes ``<CELL>``.

        Parameters
        ----------
        template : str
            Instruction with the paper's placeholders, or plain text.
        metadata : Mapping, optional
            Values of the metadata placeholders; ``choices`` may be a list (joined with ", "). A missing value
            (None, NaN, an empty string) counts as absent: it never becomes the word "nan".

        Returns
        -------
        str
        """
        metadata = dict(metadata or {})
        values: dict[str, str] = {}
        missing = []
        for name in template_fields(template):
            if name == CELL_PLACEHOLDER:
                values[name] = self.cell_start_token
            elif is_present(metadata.get(name)):
                value = metadata[name]
                is_list = isinstance(value, Sequence) and not isinstance(value, str)
                values[name] = ", ".join(map(str, value)) if is_list else str(value)
            elif name == "":
                raise ValueError(
                    f"Template {template!r} has an empty '{{}}' placeholder; name it, e.g. '{{tissue}}'."
                )
            else:
                missing.append(name)
        if missing:
            raise ValueError(
                f"Template needs values for {sorted(set(missing))} but metadata has {sorted(metadata)}. "
                "Pass them with `metadata=` or as AnnData obs columns of the same names."
            )
        return template.format(**values)

    def _expand_cell_slots(self, text: str) -> str:
        expansion = (
            self.cell_start_token + self.cell_placeholder_token * self.num_query_tokens + self.cell_end_token
        )
        return text.replace(self.cell_start_token, expansion)

    def _count_cell_slots(self, text: str) -> int:
        return len(re.findall(re.escape(self.cell_start_token), text))

    def _count_template_slots(self, template: str) -> int:
        """Cell slots of an unfilled template: ``{input}`` placeholders and ``<CELL>`` tokens."""
        return template_fields(template).count(CELL_PLACEHOLDER) + self._count_cell_slots(template)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        cells: Any = None,
        metadata: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        text_target: str | Sequence[str] | None = None,
        target_cells: Any = None,
        cell_captions: Sequence[str] | None = None,
        target_captions: Sequence[str] | None = None,
        gene_names: Sequence[str] | None = None,
        layer: str | None = None,
        padding: bool | str = True,
        truncation: bool | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Prepare model inputs from instructions, cells and (for training) answers.

        One instruction with one cell slot and ``n`` cells is broadcast to ``n`` prompts (one cell each).
        Otherwise the number of ``{input}``/``<CELL>`` slots over all instructions must equal the number of
        cells, given in slot order (an instruction about several cells has one slot per cell).

        Parameters
        ----------
        text : str or list of str
            Instruction templates or plain instructions.
        cells : AnnData, array, sparse matrix or DataFrame, optional
            ``n_cells`` cells of raw counts; AnnData ``obs`` columns named like placeholders fill them.
        metadata : dict or list of dict, optional
            Placeholder values, one dict for all prompts or one per prompt; override ``obs``.
        text_target : str or list of str, optional
            Answers; returned as ``labels`` with padding set to -100.
        target_cells : optional
            Cells the ``<SIGNAL>`` tokens of the answers stand for (same input types as ``cells``).
        cell_captions : list of str, optional
            The label text of each input cell, for the alignment loss; returned as ``cell_caption_ids``.
        target_captions : list of str, optional
            The label text of each target cell (one per ``<SIGNAL>``); returned as ``target_caption_ids``.
        gene_names : list of str, optional
            Gene names of array inputs without names.
        layer : str, optional
            AnnData layer holding raw counts (default ``X``).
        padding, truncation, max_length, return_tensors
            Passed to the tokenizer.

        Returns
        -------
        BatchFeature
            ``input_ids``, ``attention_mask`` ``(batch, seq_len)``; ``cell_values`` ``(n_cells, n_genes)``;
            ``labels`` ``(batch, target_len)`` and ``target_cell_values`` ``(n_signals, n_genes)`` when given.
        """
        if text is None:
            raise ValueError("Pass `text`: an instruction (template) per prompt.")
        texts = [text] if isinstance(text, str) else list(text)
        cell_features = None
        n_cells = 0
        if cells is not None:
            cell_features = self.feature_extractor(
                cells, gene_names=gene_names, layer=layer, return_tensors="np"
            )
            n_cells = cell_features["cell_values"].shape[0]
            if len(texts) == 1 and n_cells > 1 and self._count_template_slots(texts[0]) == 1:
                texts = texts * n_cells
        metadata_rows = self._metadata_rows(cells, metadata, len(texts))
        prompts = [self.fill_template(t, m) for t, m in zip(texts, metadata_rows, strict=True)]
        n_slots = sum(self._count_cell_slots(prompt) for prompt in prompts)
        if n_slots != n_cells:
            raise ValueError(
                f"The instructions have {n_slots} cell slots ('{{input}}' or '{self.cell_start_token}') but "
                f"{n_cells} cells were given. Write one slot per cell, or one instruction for all cells."
            )
        prompts = [self._expand_cell_slots(self.prompt_format.format(prompt=prompt)) for prompt in prompts]
        encoding = self.tokenizer(
            prompts,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
        )
        data = dict(encoding)
        if cell_features is not None:
            data["cell_values"] = cell_features["cell_values"]
        if text_target is not None:
            data["labels"] = self._encode_targets(text_target, len(prompts), return_tensors)
        if cell_captions is not None:
            if len(cell_captions) != n_cells:
                raise ValueError(
                    f"Got {len(cell_captions)} cell labels for {n_cells} cells; pass one per cell."
                )
            data["cell_caption_ids"] = self._encode_captions(cell_captions, return_tensors)
        if target_captions is not None:
            data["target_caption_ids"] = self._encode_captions(target_captions, return_tensors)
        if target_cells is not None:
            target = self.feature_extractor(
                target_cells, gene_names=gene_names, layer=layer, return_tensors="np"
            )
            data["target_cell_values"] = target["cell_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _encode_captions(self, texts: Sequence[str], return_tensors: str | None):
        encoding = self.tokenizer(list(texts), padding=True, add_special_tokens=False, return_tensors="np")
        ids = np.where(encoding["attention_mask"] == 1, encoding["input_ids"], IGNORE_INDEX)
        return (
            ids if return_tensors is None else BatchFeature({"ids": ids}, tensor_type=return_tensors)["ids"]
        )

    def _encode_targets(self, text_target: str | Sequence[str], batch_size: int, return_tensors: str | None):
        targets = [text_target] if isinstance(text_target, str) else list(text_target)
        if len(targets) != batch_size:
            raise ValueError(
                f"Got {len(targets)} answers for {batch_size} prompts; pass one answer per prompt."
            )
        for target in targets:
            if self._count_cell_slots(target):
                raise ValueError(
                    f"Answers cannot contain '{self.cell_start_token}'; use '{self.signal_token}'."
                )
        encoding = self.tokenizer(targets, padding=True, return_tensors="np")
        labels = np.where(encoding["attention_mask"] == 1, encoding["input_ids"], IGNORE_INDEX)
        return (
            labels
            if return_tensors is None
            else BatchFeature({"labels": labels}, tensor_type=return_tensors)["labels"]
        )

    def _metadata_rows(self, cells: Any, metadata: Any, n_prompts: int) -> list[dict[str, Any]]:
        """One metadata dict per prompt: AnnData ``obs`` columns, overridden by ``metadata``."""
        rows = metadata_from_obs(getattr(cells, "obs", None), n_prompts)
        if metadata is None:
            return rows
        if isinstance(metadata, Mapping):
            return [{**row, **metadata} for row in rows]
        metadata = list(metadata)
        if len(metadata) != n_prompts:
            raise ValueError(
                f"Got {len(metadata)} metadata dicts for {n_prompts} prompts; pass one per prompt."
            )
        return [{**row, **extra} for row, extra in zip(rows, metadata, strict=True)]

    def post_process_generation(self, sequences, skip_special_tokens: bool = True) -> list[dict[str, Any]]:
        """Decode generated ids into answers.

        Parameters
        ----------
        sequences : torch.LongTensor or list of list of int
            ``(batch, length)`` ids from ``model.generate``.
        skip_special_tokens : bool
            Strip special tokens (``<SIGNAL>`` included) from the text.

        Returns
        -------
        list of dict
            Per answer: ``text`` (str) and ``has_signal`` (bool: the model asked for a cell).
        """
        signal_id = self.tokenizer.convert_tokens_to_ids(self.signal_token)
        rows = sequences.tolist() if hasattr(sequences, "tolist") else [list(row) for row in sequences]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens)
        return [
            {"text": text.strip(), "has_signal": signal_id in row}
            for text, row in zip(texts, rows, strict=True)
        ]


def _original_config_dict(path, hub_kwargs: dict) -> dict | None:
    """Return ``config.json`` as a dict when ``path`` is an original checkpoint without processor files."""
    lookup = {**hub_kwargs, "_raise_exceptions_for_missing_entries": False}
    lookup.setdefault("_raise_exceptions_for_connection_errors", False)
    for name in ("processor_config.json", "preprocessor_config.json"):
        if cached_file(path, name, **lookup) is not None:
            return None
    config_file = cached_file(path, "config.json", **lookup)
    if config_file is None:
        return None
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    return config if is_original_config_dict(config) else None


__all__ = ["InstructCellProcessor", "is_present", "metadata_from_obs", "template_fields"]
