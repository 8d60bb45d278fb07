"""InstructCell: a seq2seq (or decoder-only) language model that reads cells and writes cells.

One file, as transformers keeps a model family's ``modeling_*.py``: the output dataclasses, the pretrained
base class and ``InstructCellForConditionalGeneration`` (forward, generate, label scoring, cell generation,
loading of original checkpoints) belong together and travel to the Hub as one remote-code file.
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, ModelOutput
from transformers.models.bart.modeling_bart import shift_tokens_right

from .configuration_instructcell import InstructCellConfig
from .convert_original_instructcell import ORIGINAL_KEY_MAPPING, ORIGINAL_UNUSED_KEYS
from .modeling_cell_encoder import InstructCellCellEncoder
from .modeling_cell_vae import InstructCellConditionalVAE

IGNORE_INDEX = -100


@dataclass
class InstructCellForConditionalGenerationModelOutput(ModelOutput):
    """Outputs of [`InstructCellForConditionalGeneration.forward`].

    Attributes
    ----------
    loss : torch.Tensor, optional
        Scalar training loss: ``lm_loss + vae_loss_weight * vae_loss * n_target_cells / batch_size``.
    logits : torch.Tensor, optional
        Language-model logits, ``(batch_size, target_length, vocab_size)``.
    lm_loss : torch.Tensor, optional
        Token-mean text cross-entropy (scalar).
    vae_loss : torch.Tensor, optional
        Cell-mean negative ELBO of the target cells (scalar).
    vae_reconstruction_loss : torch.Tensor, optional
        Cell-mean ZINB negative log-likelihood summed over genes (scalar).
    vae_kl_loss : torch.Tensor, optional
        Cell-mean KL terms (latent, unweighted, plus library) (scalar).
    alignment_loss : torch.Tensor, optional
        Caption contrastive loss (scalar): input cells vs their label text (``cell_caption_ids``) plus
        ``<SIGNAL>`` states vs the requested label (``target_caption_ids``), when given.
    cell_embeds : torch.Tensor, optional
        Cell embeddings spliced into the text, ``(n_cells, num_query_tokens, hidden_size)``.
    signal_hidden_states : torch.Tensor, optional
        Last-layer hidden states at the ``<SIGNAL>`` inputs, ``(n_signals, hidden_size)``.
    language_model_outputs : ModelOutput, optional
        The backbone's own outputs.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    vae_loss: torch.FloatTensor | None = None
    vae_reconstruction_loss: torch.FloatTensor | None = None
    vae_kl_loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None
    cell_embeds: torch.FloatTensor | None = None
    signal_hidden_states: torch.FloatTensor | None = None
    language_model_outputs: ModelOutput | None = None

    def to_tuple(self) -> tuple:
        """Tuple of the set fields, the nested backbone output flattened to its own tuple."""
        return tuple(
            self[key].to_tuple() if key == "language_model_outputs" else self[key] for key in self.keys()
        )


@dataclass
class InstructCellGenerateCellsOutput(ModelOutput):
    """Outputs of [`InstructCellForConditionalGeneration.generate_cells`].

    Attributes
    ----------
    sequences : torch.LongTensor
        Generated token ids, ``(batch_size, generated_length)``.
    has_signal : torch.BoolTensor
        Whether each request produced ``<SIGNAL>``, ``(batch_size,)``.
    cell_values : torch.LongTensor
        Sampled integer counts, ``(n_signals * num_cells, n_genes)``, grouped by request.
    request_index : torch.LongTensor
        The request (row of ``sequences``) each sampled cell belongs to, ``(n_signals * num_cells,)``.
    condition_states : torch.FloatTensor
        The ``<SIGNAL>`` hidden states that conditioned the VAE, ``(n_signals, hidden_size)``.
    """

    sequences: torch.LongTensor | None = None
    has_signal: torch.BoolTensor | None = None
    cell_values: torch.LongTensor | None = None
    request_index: torch.LongTensor | None = None
    condition_states: torch.FloatTensor | None = None


@dataclass
class InstructCellLabelScoresOutput(ModelOutput):
    """Outputs of [`InstructCellForConditionalGeneration.score_labels`].

    Attributes
    ----------
    log_likelihoods : torch.FloatTensor
        Summed token log-probabilities of each candidate (EOS included), ``(batch_size, n_candidates)``.
    probabilities : torch.FloatTensor
        ``softmax(log_likelihoods)`` over the candidates of each prompt, ``(batch_size, n_candidates)``;
        rows sum to 1.
    """

    log_likelihoods: torch.FloatTensor | None = None
    probabilities: torch.FloatTensor | None = None


@dataclass
class CandidatePrefixTree:
    """Candidate answers of each prompt as a prefix tree: which decoder state scores which token.

    A node is a distinct (prompt, candidate prefix) pair; every candidate token is predicted from the node of
    the prefix before it, so candidates that share a prefix share its vocabulary projection.

    Attributes
    ----------
    node_state_index : torch.LongTensor
        Row of each node's decoder state in the scoring passes' stacked states, ``(n_nodes,)``.
    token_node : torch.LongTensor
        Node each scored candidate token is predicted from, ``(n_tokens,)``.
    token_target : torch.LongTensor
        The token's id, ``(n_tokens,)``.
    token_candidate : torch.LongTensor
        The token's flat (prompt x candidate) row, ``(n_tokens,)``.
    """

    node_state_index: torch.LongTensor
    token_node: torch.LongTensor
    token_target: torch.LongTensor
    token_candidate: torch.LongTensor


def candidate_prefix_tree(
    candidate_ids: torch.LongTensor, lengths: torch.LongTensor, state_index: torch.LongTensor
) -> CandidatePrefixTree:
    """Build the :class:`CandidatePrefixTree` of right-padded candidates.

    Parameters
    ----------
    candidate_ids : torch.LongTensor
        ``(n_rows, n_candidates, cand_len)``, right-padded.
    lengths : torch.LongTensor
        Real tokens per candidate, ``(n_rows, n_candidates)``, each at least 1.
    state_index : torch.LongTensor
        ``(n_rows, n_candidates, cand_len)``: the row, among the stacked decoder states of the scoring passes,
        of the state that predicts each candidate token (the state after the tokens before it).

    Returns
    -------
    CandidatePrefixTree
    """
    n_rows, n_candidates, _ = candidate_ids.shape
    device = candidate_ids.device
    flat = candidate_ids.reshape(n_rows * n_candidates, -1)
    flat_states = state_index.reshape(n_rows * n_candidates, -1)
    flat_lengths = lengths.reshape(-1)
    max_length = int(flat_lengths.max())
    candidate = torch.arange(flat.shape[0], device=device)
    node = candidate // n_candidates  # level 0: the empty prefix, one node per prompt
    level_start, level_size = 0, n_rows
    node_states, token_node, token_target, token_candidate = [], [], [], []
    for position in range(max_length):
        alive = flat_lengths > position
        rows = candidate[alive]
        state = flat_states[alive, position]
        local = node[alive] - level_start
        first = torch.full((level_size,), rows.shape[0], dtype=torch.long, device=device)
        first = first.scatter_reduce(0, local, torch.arange(rows.shape[0], device=device), reduce="amin")
        node_states.append(state[first])
        token_node.append(node[alive])
        token_target.append(flat[alive, position])
        token_candidate.append(rows)
        following = flat_lengths > position + 1
        if not bool(following.any()):
            break
        keys = torch.stack([node[following], flat[following, position]], dim=1)
        _, inverse = torch.unique(keys, dim=0, return_inverse=True)
        level_start += level_size
        level_size = int(inverse.max()) + 1
        node = torch.full_like(node, -1)
        node[following] = level_start + inverse
    return CandidatePrefixTree(
        node_state_index=torch.cat(node_states),
        token_node=torch.cat(token_node),
        token_target=torch.cat(token_target),
        token_candidate=torch.cat(token_candidate),
    )


class InstructCellPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading behaviour shared by InstructCell models."""

    config: InstructCellConfig
    config_class = InstructCellConfig
    base_model_prefix = "instructcell"
    main_input_name = "input_ids"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _no_split_modules = [
        "T5Block",
        "Blip2QFormerLayer",
        "InstructCellCellEncoder",
        "InstructCellConditionalVAE",
    ]
    # The Q-Former and the ZINB likelihood stay in float32 under bf16 (fp16-only `_keep_in_fp32_modules`
    # would not cover bf16 in transformers 5.x).
    _keep_in_fp32_modules_strict = ["cell_encoder", "cell_vae"]
    _skip_keys_device_placement = ["past_key_values"]
    # Original InstructCell checkpoints carry a per-cell dispersion head that "gene" dispersion never uses.
    _keys_to_ignore_on_load_unexpected = list(ORIGINAL_UNUSED_KEYS)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, allow_missing_weights: bool = False, **kwargs
    ):
        """``PreTrainedModel.from_pretrained`` that also reads original checkpoints and refuses partial ones.

        Checkpoints written by the original code (``zjunlp/InstructCell-chat`` / ``-instruct``: keys under
        ``assistant.``) are renamed on load through ``key_mapping`` (``convert_original_instructcell.py``);
        the config is translated by ``InstructCellConfig.from_dict``. Keys of this package's own checkpoints
        match no rule, so they load unchanged. ``save_pretrained`` afterwards writes this package's layout.

        A checkpoint that lacks some of the model's weights (e.g. ``cell_vae.*`` or ``cell_encoder.*``) is
        refused: those weights would start from random values and the model would read and generate cells
        from noise. ``allow_missing_weights=True`` starts them from random values on purpose (to train them).

        Raises
        ------
        ValueError
            The checkpoint lacks weights of the model and ``allow_missing_weights`` is False.
        """
        key_mapping = {**ORIGINAL_KEY_MAPPING, **(kwargs.pop("key_mapping", None) or {})}
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            key_mapping=key_mapping,
            output_loading_info=True,
            **kwargs,
        )
        missing = sorted(loading_info["missing_keys"])
        if missing and not allow_missing_weights:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise ValueError(
                f"{pretrained_model_name_or_path} lacks {len(missing)} weights of {cls.__name__} ({shown}): "
                "they would start from random values, and the model would read and generate cells from "
                "noise. Load a complete checkpoint, or pass allow_missing_weights=True to from_pretrained to "
                "start them from random values on purpose (e.g. to train them)."
            )
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            # transformers reverts used renamings on save; keep only the caller's own ones.
            model._weight_conversions = [
                conversion
                for conversion in conversions
                if not set(getattr(conversion, "_original_source_patterns", None) or [])
                & set(ORIGINAL_KEY_MAPPING)
            ]
        if model.generation_config is not None and model.generation_config.eos_token_id is None:
            # A generation_config.json without decoding settings (the original checkpoints' one): stop at
            # EOS or <SIGNAL>, as the original `generate` does.
            model._stop_generation_at_signal()
        return (model, loading_info) if output_loading_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, InstructCellCellEncoder):
            # Distinct random queries: zero queries (BLIP-2's choice for a pretrained Q-Former) stay identical
            # to each other when trained from scratch.
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)


class InstructCellForConditionalGeneration(InstructCellPreTrainedModel, GenerationMixin):
    """InstructCell (arXiv 2501.08187) in the shape of BLIP-2's T5 path.

    ``cell_values`` (raw counts) go through the cell encoder; its ``num_query_tokens`` outputs per cell
    replace the ``<cell_query>`` placeholders that the processor put between ``<CELL>`` and ``</CELL>``.
    The language model reads the merged embeddings. When the answer contains ``<SIGNAL>``, the
    last-layer hidden state at that token (fed back as input) conditions a ZINB conditional VAE that
    samples integer gene counts.
    """

    def __init__(self, config: InstructCellConfig):
        super().__init__(config)
        text_hidden_size = config.text_config.hidden_size
        self.cell_encoder = InstructCellCellEncoder(config)
        if config.use_language_projection:
            self.language_projection = nn.Linear(config.qformer_config.hidden_size, text_hidden_size)
        else:  # the original InstructCell feeds the Q-Former output to the language model unchanged
            self.language_projection = nn.Identity()
        if config.use_decoder_only_language_model:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        self.cell_vae = InstructCellConditionalVAE(
            n_genes=config.n_genes,
            condition_dim=text_hidden_size,
            n_latent=config.vae_n_latent,
            n_hidden=config.vae_n_hidden,
            n_layers=config.vae_n_layers,
            n_condition=config.vae_n_condition,
            dropout_rate=config.vae_dropout,
            use_layer_norm=config.vae_use_layer_norm,
            adaptive_library=config.vae_adaptive_library,
            library_hidden=config.vae_library_hidden,
        )
        self.post_init()
        if self.generation_config is not None:
            self._stop_generation_at_signal()

    def _stop_generation_at_signal(self) -> None:
        """Make ``<SIGNAL>`` end generation like EOS: its hidden state is what the VAE needs."""
        text_config = self.config.text_config
        eos = text_config.eos_token_id
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        self.generation_config.eos_token_id = eos_ids + [self.config.signal_token_index]
        self.generation_config.pad_token_id = (
            text_config.pad_token_id if text_config.pad_token_id is not None else eos_ids[0]
        )
        if self.config.is_encoder_decoder:
            self.generation_config.decoder_start_token_id = text_config.decoder_start_token_id

    def get_input_embeddings(self) -> nn.Module:
        """Return the language model's token embeddings."""
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the language model's token embeddings."""
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        """Return the language model's output projection (LM head)."""
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        """Replace the language model's output projection."""
        self.language_model.set_output_embeddings(new_embeddings)

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        """Return the language model's encoder (``generate`` runs it once per prompt)."""
        if modality is None:
            return self.language_model.get_encoder()
        return super().get_encoder(modality=modality)

    def get_decoder(self) -> nn.Module:
        """Return the language model's decoder."""
        return self.language_model.get_decoder()

    def get_cell_features(self, cell_values: torch.Tensor) -> torch.Tensor:
        """Cell embeddings in the language model's space.

        Parameters
        ----------
        cell_values : torch.Tensor
            Raw counts, ``(n_cells, n_genes)``.

        Returns
        -------
        torch.Tensor
            ``(n_cells, num_query_tokens, hidden_size)`` in the language model's dtype.
        """
        query_output = self.cell_encoder(cell_values)
        if not self.config.use_language_projection:
            return query_output.to(self.get_input_embeddings().weight.dtype)
        projection_dtype = self.language_projection.weight.dtype
        return self.language_projection(query_output.to(projection_dtype))

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Boolean mask of the ``<cell_query>`` positions, ``(batch_size, seq_len, 1)``."""
        if input_ids is None:
            placeholder_embedding = self.get_input_embeddings()(
                torch.tensor(self.config.cell_token_index, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == placeholder_embedding).all(-1)
        else:
            mask = input_ids == self.config.cell_token_index
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    def merge_cell_embeddings(
        self,
        input_ids: torch.LongTensor | None,
        cell_values: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed the text and scatter the cell embeddings into its placeholders.

        With ``config.cell_slot_token_ids``, the embedding of the number of each cell's order in the prompt
        (:meth:`cell_slot_embeddings`) is added to its embeddings where they are spliced in.

        Parameters
        ----------
        input_ids : torch.LongTensor, optional
            ``(batch_size, seq_len)``; each cell occupies ``num_query_tokens`` placeholder positions.
        cell_values : torch.Tensor, optional
            Raw counts of the cells in order of appearance, ``(n_cells, n_genes)``.
        inputs_embeds : torch.Tensor, optional
            Precomputed text embeddings ``(batch_size, seq_len, hidden_size)`` used instead of ``input_ids``.

        Returns
        -------
        tuple of torch.Tensor
            Merged embeddings ``(batch_size, seq_len, hidden_size)`` and the cell embeddings
            ``(n_cells, num_query_tokens, hidden_size)`` without their numbers (``None`` without cells).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass `input_ids` (from the processor) or `inputs_embeds`.")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        n_placeholders = int(mask.sum())
        if cell_values is None:
            if n_placeholders:
                raise ValueError(
                    f"The text has {n_placeholders} cell placeholder tokens but no `cell_values` were given. "
                    "Pass the cells to the processor together with the text."
                )
            return inputs_embeds, None
        cell_embeds = self.get_cell_features(cell_values)
        n_expected = cell_embeds.shape[0] * cell_embeds.shape[1]
        if n_placeholders != n_expected:
            raise ValueError(
                f"The text has {n_placeholders} cell placeholder tokens but {cell_embeds.shape[0]} cells "
                f"need {n_expected} ({self.config.num_query_tokens} each). Build inputs with the "
                "processor, which writes "
                "one `{input}`/<CELL> slot per cell and expands it."
            )
        cell_embeds = cell_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
        spliced = cell_embeds
        if self.config.cell_slot_token_ids is not None:
            numbers = self.cell_slot_embeddings()[self.cell_slots(mask[..., 0])]
            spliced = cell_embeds + numbers.to(cell_embeds.dtype).unsqueeze(1)
        inputs_embeds = inputs_embeds.masked_scatter(mask.expand_as(inputs_embeds), spliced)
        return inputs_embeds, cell_embeds

    def cell_rows(self, placeholder_mask: torch.Tensor) -> torch.LongTensor:
        """Return the prompt (batch row) of every cell, in order of appearance, ``(n_cells,)``.

        Parameters
        ----------
        placeholder_mask : torch.Tensor
            ``(batch_size, seq_len)``, True at the ``num_query_tokens`` placeholders of every cell.
        """
        return torch.nonzero(placeholder_mask)[:: self.config.num_query_tokens, 0].contiguous()

    def cell_slots(self, placeholder_mask: torch.Tensor) -> torch.LongTensor:
        """Each cell's order within its prompt (0 for a prompt's first cell), ``(n_cells,)``.

        Parameters
        ----------
        placeholder_mask : torch.Tensor
            ``(batch_size, seq_len)``, True at the ``num_query_tokens`` placeholders of every cell.
        """
        cell_rows = self.cell_rows(placeholder_mask)
        order = torch.arange(len(cell_rows), device=cell_rows.device)
        slots = order - torch.searchsorted(cell_rows, cell_rows)  # minus the index of the row's first cell
        n_slots = len(self.config.cell_slot_token_ids or ())
        if len(slots) and int(slots.max()) >= n_slots:
            raise ValueError(
                f"A prompt holds {int(slots.max()) + 1} cells, but this model numbers at most {n_slots} "
                "(config.cell_slot_token_ids): ask about fewer cells at once."
            )
        return slots

    def cell_slot_embeddings(self) -> torch.Tensor:
        """Return the number of each slot as the language model reads it, ``(n_slots, hidden_size)``.

        Row i is the mean input embedding of ``config.cell_slot_token_ids[i]`` (the tokens of the number
        i + 1): tied to the vocabulary, it is trained with it and needs no weights of its own.
        """
        embeddings = self.get_input_embeddings()
        return torch.stack(
            [
                embeddings(torch.tensor(ids, device=embeddings.weight.device)).mean(0)
                for ids in self.config.cell_slot_token_ids
            ]
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        cell_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        target_cell_values: torch.FloatTensor | None = None,
        cell_caption_ids: torch.LongTensor | None = None,
        target_caption_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> InstructCellForConditionalGenerationModelOutput:
        r"""Teacher-forced pass; returns text and cell losses when targets are given.

        Parameters
        ----------
        input_ids : torch.LongTensor, optional
            Prompt ids ``(batch_size, seq_len)`` with ``num_query_tokens`` placeholders per cell.
        attention_mask : torch.LongTensor, optional
            ``(batch_size, seq_len)``.
        cell_values : torch.FloatTensor, optional
            Raw counts of the input cells in order of appearance, ``(n_cells, n_genes)``.
        decoder_input_ids, decoder_attention_mask : torch.LongTensor, optional
            ``(batch_size, target_len)``; derived from ``labels`` when omitted (encoder-decoder backbones).
        labels : torch.LongTensor, optional
            Answer ids ``(batch_size, target_len)``, ``-100`` where no loss is wanted.
        target_cell_values : torch.FloatTensor, optional
            Raw counts ``(n_signals, n_genes)`` of the cells that the ``<SIGNAL>`` tokens in the answers
            stand for, in order of appearance.
        cell_caption_ids : torch.LongTensor, optional
            Token ids of each input cell's caption (its label) ``(n_cells, label_len)``, ``-100``-padded; adds
            ``config.alignment_loss_weight`` x the alignment loss.
        target_caption_ids : torch.LongTensor, optional
            Token ids of each target cell's label text ``(n_signals, label_len)``; aligns the ``<SIGNAL>``
            states that condition the VAE with the requested label in the same way.
        inputs_embeds : torch.FloatTensor, optional
            ``(batch_size, seq_len, hidden_size)`` instead of ``input_ids``.
        **kwargs
            Passed on to the language model (e.g. ``output_attentions``).

        Returns
        -------
        InstructCellForConditionalGenerationModelOutput
        """
        inputs_embeds, cell_embeds = self.merge_cell_embeddings(input_ids, cell_values, inputs_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(
                inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device
            )
        needs_signal_states = target_cell_values is not None
        if needs_signal_states:
            kwargs["output_hidden_states"] = True
        kwargs["return_dict"] = True
        if self.config.use_decoder_only_language_model:
            outputs, signal_states = self._decoder_only_forward(inputs_embeds, attention_mask, labels, kwargs)
        else:
            if decoder_input_ids is None and labels is not None:
                text_config = self.config.text_config
                decoder_input_ids = shift_tokens_right(
                    labels, text_config.pad_token_id, text_config.decoder_start_token_id
                )
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
                **kwargs,
            )
            signal_states = None
            if needs_signal_states:
                signal_states = self._signal_states(decoder_input_ids, outputs.decoder_hidden_states[-1])

        lm_loss = outputs.loss
        loss = lm_loss
        vae_output = None
        if needs_signal_states:
            if signal_states.shape[0] != target_cell_values.shape[0]:
                raise ValueError(
                    f"The answers hold {signal_states.shape[0]} <SIGNAL> tokens but "
                    f"{target_cell_values.shape[0]} "
                    "target cells were given: pass exactly one target cell per <SIGNAL>."
                )
            answer_ids = labels if self.config.use_decoder_only_language_model else decoder_input_ids
            signal_rows = torch.nonzero(answer_ids == self.config.signal_token_index)[:, 0]
            sources, has_source = self.prompt_cells(input_ids, cell_values, signal_rows)
            vae_output = self.cell_vae(
                target_cell_values,
                signal_states,
                kl_weight=self.config.vae_kl_weight,
                source_counts=sources,
                has_source=has_source,
            )
            batch_size = inputs_embeds.shape[0]
            vae_term = (
                self.config.vae_loss_weight * vae_output.loss * (target_cell_values.shape[0] / batch_size)
            )
            loss = vae_term if loss is None else loss + vae_term.to(loss.dtype)

        alignment_loss = None
        if self.config.alignment_loss_weight > 0:
            parts = []
            if cell_caption_ids is not None and cell_embeds is not None:
                parts.append(self.cell_caption_alignment_loss(cell_embeds, cell_caption_ids))
            if target_caption_ids is not None and signal_states is not None:
                parts.append(self.cell_caption_alignment_loss(signal_states.unsqueeze(1), target_caption_ids))
            if parts:
                alignment_loss = torch.stack(parts).sum()
                alignment_term = self.config.alignment_loss_weight * alignment_loss
                loss = alignment_term if loss is None else loss + alignment_term.to(loss.dtype)

        return InstructCellForConditionalGenerationModelOutput(
            loss=loss,
            logits=outputs.logits,
            lm_loss=lm_loss,
            vae_loss=None if vae_output is None else vae_output.loss,
            vae_reconstruction_loss=None if vae_output is None else vae_output.reconstruction_loss,
            vae_kl_loss=None if vae_output is None else vae_output.kl_z + vae_output.kl_library,
            alignment_loss=alignment_loss,
            cell_embeds=cell_embeds,
            signal_hidden_states=signal_states,
            language_model_outputs=outputs,
        )

    def prompt_cells(
        self, input_ids: torch.LongTensor | None, cell_values: torch.Tensor | None, rows: torch.LongTensor
    ) -> tuple[torch.Tensor | None, torch.BoolTensor]:
        """Find the cell each given prompt holds: the source of style transfer (``vae_encode_input_cell``).

        Parameters
        ----------
        input_ids : torch.LongTensor, optional
            Prompts ``(batch_size, seq_len)``; each cell fills ``num_query_tokens`` placeholder positions.
        cell_values : torch.Tensor, optional
            Raw counts of the prompts' cells in order of appearance, ``(n_cells, n_genes)``.
        rows : torch.LongTensor
            Prompt (batch row) of every ``<SIGNAL>``, ``(n_signals,)``.

        Returns
        -------
        tuple
            Counts ``(n_signals, n_genes)`` of each row's cell (None when no row has one) and the
            ``(n_signals,)`` mask of rows holding exactly one cell; prompts without a cell, or with several,
            and every prompt when ``config.vae_encode_input_cell`` is False, sample from the prior.
        """
        none = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        if not self.config.vae_encode_input_cell or input_ids is None or cell_values is None:
            return None, none
        cell_rows = self.cell_rows(input_ids == self.config.cell_token_index)
        if cell_rows.shape[0] == 0 or rows.shape[0] == 0:
            return None, none
        rows = rows.to(cell_rows.device)
        has_source = torch.bincount(cell_rows, minlength=input_ids.shape[0])[rows] == 1
        first = torch.searchsorted(cell_rows, rows).clamp_max(cell_rows.shape[0] - 1)
        return cell_values[first.to(cell_values.device)], has_source

    def sample_signal_cells(
        self,
        condition_states: torch.Tensor,
        has_signal: torch.BoolTensor,
        input_ids: torch.LongTensor | None = None,
        cell_values: torch.Tensor | None = None,
        num_cells: int = 1,
        library_size: float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``num_cells`` cells per ``<SIGNAL>`` state, each from its prompt's cell when it holds one.

        Parameters
        ----------
        condition_states : torch.Tensor
            ``(n_signals, hidden_size)`` from :meth:`signal_states_for_sequences`.
        has_signal : torch.BoolTensor
            ``(batch_size,)``: which prompts the states belong to, in order.
        input_ids, cell_values
            The prompts (see :meth:`prompt_cells`).
        num_cells, library_size, generator
            As in ``cell_vae.sample``.

        Returns
        -------
        torch.Tensor
            Integer-valued float32 counts, ``(n_signals * num_cells, n_genes)``, grouped by prompt.
        """
        sources, has_source = self.prompt_cells(input_ids, cell_values, torch.nonzero(has_signal).flatten())
        return self.cell_vae.sample(
            condition_states,
            num_cells_per_condition=num_cells,
            library_size=library_size,
            generator=generator,
            source_counts=sources,
            has_source=has_source,
        )

    def cell_caption_alignment_loss(
        self, cell_embeds: torch.Tensor, cell_caption_ids: torch.LongTensor
    ) -> torch.Tensor:
        """Contrast each cell with the labels of the batch (supervised, label text as the other modality).

        Parameters
        ----------
        cell_embeds : torch.Tensor
            ``(n_cells, num_query_tokens, hidden_size)`` from :meth:`get_cell_features`.
        cell_caption_ids : torch.LongTensor
            ``(n_cells, label_len)`` token ids of each cell's label, ``-100``-padded.

        Returns
        -------
        torch.Tensor
            Scalar cross-entropy of picking each cell's own label among the batch's distinct labels.
        """
        if cell_caption_ids.shape[0] != cell_embeds.shape[0]:
            raise ValueError(
                f"Got {cell_caption_ids.shape[0]} cell labels for {cell_embeds.shape[0]} cells; "
                "pass one label per cell."
            )
        label_mask = cell_caption_ids != IGNORE_INDEX
        distinct, label_index = torch.unique(cell_caption_ids, dim=0, return_inverse=True)
        distinct_mask = (distinct != IGNORE_INDEX).unsqueeze(-1)
        token_embeds = self.get_input_embeddings()(distinct.clamp_min(0)) * distinct_mask
        label_vectors = token_embeds.sum(1) / distinct_mask.sum(1).clamp_min(1)
        if not bool(label_mask.any(-1).all()):
            raise ValueError("Every cell label needs at least one token.")
        cell_vectors = nn.functional.normalize(cell_embeds.mean(1).float(), dim=-1)
        label_vectors = nn.functional.normalize(label_vectors.float(), dim=-1)
        logits = cell_vectors @ label_vectors.T / self.config.alignment_temperature
        return nn.functional.cross_entropy(logits, label_index)

    def _signal_states(self, token_ids: torch.LongTensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(n_signals, hidden)`` at the positions where ``<SIGNAL>`` is the input token."""
        return hidden_states[token_ids == self.config.signal_token_index].float()

    def _decoder_only_forward(
        self,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor,
        labels: torch.LongTensor | None,
        kwargs: dict,
    ) -> tuple[ModelOutput, torch.Tensor | None]:
        """Run a causal LM on ``[prompt | answer]`` with the loss on the answer only.

        The prompt must be left-padded and the labels right-padded, so that the real tokens are contiguous.
        """
        if bool((prompt_mask[:, -1] == 0).any()):
            raise ValueError(
                "Decoder-only backbones need left-padded prompts: "
                "set `processor.tokenizer.padding_side = 'left'`."
            )
        if labels is None:
            return self._causal_forward(prompt_embeds, prompt_mask, **kwargs), None
        answer_mask = labels != IGNORE_INDEX
        answer_ids = labels.masked_fill(~answer_mask, self.config.text_config.pad_token_id or 0)
        prompt_ignore = torch.full(prompt_mask.shape, IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        outputs = self._causal_forward(
            prompt_embeds,
            prompt_mask,
            answer_ids,
            answer_mask,
            labels=torch.cat([prompt_ignore, labels], 1),
            **kwargs,
        )
        signal_states = None
        if kwargs.get("output_hidden_states"):
            token_ids = torch.cat(
                [torch.full_like(prompt_ignore, -1), answer_ids.masked_fill(~answer_mask, -1)], 1
            )
            signal_states = self._signal_states(token_ids, outputs.hidden_states[-1])
        return outputs, signal_states

    def _causal_forward(
        self,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor,
        answer_ids: torch.LongTensor | None = None,
        answer_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> ModelOutput:
        """Run the causal LM on ``[prompt embeddings | embedded answer ids]`` (positions over real tokens).

        ``prompt_embeds`` ``(batch, prompt_len, hidden)`` (left-padded),
        ``prompt_mask`` ``(batch, prompt_len)``,
        ``answer_ids`` / ``answer_mask`` ``(batch, answer_len)``; ``kwargs`` go to the language model.
        """
        embeds, mask = prompt_embeds, prompt_mask
        if answer_ids is not None:
            answer_embeds = self.get_input_embeddings()(answer_ids).to(prompt_embeds.dtype)
            embeds = torch.cat([prompt_embeds, answer_embeds], dim=1)
            mask = torch.cat([prompt_mask, answer_mask.to(prompt_mask.dtype)], dim=1)
        position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
        return self.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, **kwargs
        )

    def encode_prompts(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        cell_values: torch.FloatTensor | None = None,
    ) -> BaseModelOutput:
        """Run the cell encoder and the language model's encoder once over the prompts.

        The result can be passed as ``encoder_outputs`` to :meth:`generate`, :meth:`score_labels` and
        :meth:`signal_states_for_sequences`, so that answering, scoring a label set and reading ``<SIGNAL>``
        states for the same prompts share one encoder pass. Encoder-decoder backbones only.

        Parameters
        ----------
        input_ids, attention_mask, cell_values
            The prompts, as given to :meth:`generate`.

        Returns
        -------
        BaseModelOutput
            ``last_hidden_state`` ``(batch_size, seq_len, hidden_size)``.
        """
        if self.config.use_decoder_only_language_model:
            raise ValueError(
                "encode_prompts needs an encoder-decoder backbone: decoder-only ones have no encoder."
            )
        inputs_embeds, _ = self.merge_cell_embeddings(input_ids, cell_values)
        return self.get_encoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        cell_values: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate answer ids, like ``Blip2ForConditionalGeneration.generate``.

        Generation stops at EOS or at ``<SIGNAL>``. This model's ``generation_config`` is used, updated
        with ``generate_kwargs``. Returns what the backbone's ``generate`` returns (ids, or a
        ``GenerateOutput`` with ``return_dict_in_generate=True``), so Seq2SeqTrainer, pipelines and peft
        work unchanged. Use :meth:`generate_cells` to also sample the requested cells.

        Parameters
        ----------
        input_ids : torch.LongTensor, optional
            ``(batch_size, seq_len)`` from the processor.
        attention_mask : torch.LongTensor, optional
            ``(batch_size, seq_len)``.
        cell_values : torch.FloatTensor, optional
            ``(n_cells, n_genes)`` raw counts.
        inputs_embeds : torch.FloatTensor, optional
            Text embeddings ``(batch_size, seq_len, hidden_size)`` instead of ``input_ids``.
        **generate_kwargs
            Generation settings (``max_new_tokens``, ``num_beams``, ...) and backbone kwargs, among them
            ``encoder_outputs`` from :meth:`encode_prompts` (then the prompts are not encoded again).

        Returns
        -------
        torch.LongTensor or transformers.generation.utils.GenerateOutput
            For encoder-decoder backbones ``(batch_size, 1 + new_tokens)`` starting with the decoder start
            token; for decoder-only backbones only the new tokens.
        """
        generate_kwargs.pop(
            "target_cell_values", None
        )  # training-only column that Seq2SeqTrainer passes along
        generation_config = copy.deepcopy(self.generation_config)
        model_kwargs = generation_config.update(**generate_kwargs)
        encoder_outputs = model_kwargs.get("encoder_outputs")
        if encoder_outputs is None:
            inputs_embeds, _ = self.merge_cell_embeddings(input_ids, cell_values, inputs_embeds)
            model_kwargs["inputs_embeds"] = inputs_embeds
            shape = inputs_embeds.shape[:2]
        else:  # the prompts were encoded once by `encode_prompts`
            shape = encoder_outputs.last_hidden_state.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(shape, dtype=torch.long, device=self.device)
        return self.language_model.generate(
            attention_mask=attention_mask, generation_config=generation_config, **model_kwargs
        )

    @torch.no_grad()
    def generate_cells(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        cell_values: torch.FloatTensor | None = None,
        num_cells: int = 1,
        library_size: float | torch.Tensor | None = None,
        seed: int | None = None,
        **generate_kwargs,
    ) -> InstructCellGenerateCellsOutput:
        """Answer the requests and sample ``num_cells`` cells for every answer that contains ``<SIGNAL>``.

        The answer is generated with :meth:`generate`. For each answer with ``<SIGNAL>``, the backbone runs
        once more with the answer fed back, and the last-layer hidden state at ``<SIGNAL>`` conditions the
        VAE, which samples integer counts (from the prompt's cell, when it holds one: :meth:`prompt_cells`).

        Parameters
        ----------
        input_ids, attention_mask, cell_values
            As in :meth:`generate`.
        num_cells : int
            Cells sampled per request that produced ``<SIGNAL>``.
        library_size : float or torch.Tensor, optional
            Total counts per sampled cell (scalar, or ``(n_signals * num_cells,)``); drawn from the
            learned library prior when omitted.
        seed : int, optional
            Seed of the cell sampler's ``torch.Generator`` (text decoding is unaffected unless sampling).
        **generate_kwargs
            Passed to :meth:`generate`.

        Returns
        -------
        InstructCellGenerateCellsOutput
        """
        if num_cells < 1:
            raise ValueError(f"num_cells must be at least 1, got {num_cells}.")
        generate_kwargs.pop("return_dict_in_generate", None)
        sequences = self.generate(
            input_ids=input_ids, attention_mask=attention_mask, cell_values=cell_values, **generate_kwargs
        )
        condition_states, has_signal = self.signal_states_for_sequences(
            input_ids, attention_mask, cell_values, sequences
        )
        request_index = torch.nonzero(has_signal).flatten().repeat_interleave(num_cells)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=sequences.device).manual_seed(seed)
        if condition_states.shape[0] == 0:
            cells = torch.zeros(0, self.config.n_genes, dtype=torch.long, device=sequences.device)
        else:
            cells = self.sample_signal_cells(
                condition_states, has_signal, input_ids, cell_values, num_cells, library_size, generator
            ).long()
        return InstructCellGenerateCellsOutput(
            sequences=sequences,
            has_signal=has_signal,
            cell_values=cells,
            request_index=request_index,
            condition_states=condition_states,
        )

    def score_labels(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        cell_values: torch.FloatTensor | None = None,
        candidate_ids: torch.LongTensor | None = None,
        candidate_attention_mask: torch.LongTensor | None = None,
        max_rows_per_pass: int | None = None,
        encoder_outputs: BaseModelOutput | None = None,
    ) -> InstructCellLabelScoresOutput:
        """Score every candidate answer of every prompt: one encoder pass, one batched decoder pass.

        The prompts (cells spliced in) are encoded once; the encoder states are repeated over the
        candidates and every candidate answer is teacher-forced in a single decoder pass. The score of a
        candidate is the sum of its token log-probabilities (EOS included, so ``"T cell"`` and
        ``"T cell subtype"`` differ), and the distribution is the softmax of these sums over the candidates.
        Decoder-only backbones run one causal pass over ``[prompt | candidate]`` with the merged prompt
        embeddings (cell encoder still run once). Runs under the caller's grad mode, so it also serves
        gradient saliency; wrap it in ``torch.inference_mode()`` for speed.

        Parameters
        ----------
        input_ids, attention_mask, cell_values
            The prompts, as given to :meth:`generate`.
        candidate_ids : torch.LongTensor
            Tokenized candidate answers as the model would write them (for encoder-decoder backbones with
            the tokenizer's EOS), right-padded: ``(n_candidates, cand_len)`` shared by all prompts, or
            ``(batch_size, n_candidates, cand_len)`` per prompt.
        candidate_attention_mask : torch.LongTensor, optional
            Same shape as ``candidate_ids``; 0 on padding. Derived from the pad token when omitted.
        max_rows_per_pass : int, optional
            Bound on prompt x candidate rows per decoder call (memory of the decoder states); the encoder
            still runs once. Default: all rows at once.
        encoder_outputs : BaseModelOutput, optional
            The prompts' encoding from :meth:`encode_prompts` (encoder-decoder backbones), reused instead of
            running the cell encoder and the encoder again, e.g. after :meth:`generate` on the same prompts.

        Returns
        -------
        InstructCellLabelScoresOutput
        """
        if candidate_ids is None:
            raise ValueError("Pass `candidate_ids`: the tokenized candidate answers (e.g. the label set).")
        if encoder_outputs is not None and self.config.use_decoder_only_language_model:
            raise ValueError("`encoder_outputs` only apply to encoder-decoder backbones.")
        if encoder_outputs is None:
            inputs_embeds, _ = self.merge_cell_embeddings(input_ids, cell_values)
        else:
            inputs_embeds = encoder_outputs.last_hidden_state
        batch_size = inputs_embeds.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(
                inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device
            )
        pad_id = self.config.text_config.pad_token_id or 0
        if candidate_attention_mask is None:
            candidate_attention_mask = (candidate_ids != pad_id).long()
        if candidate_ids.dim() == 2:
            candidate_ids = candidate_ids.unsqueeze(0).expand(batch_size, -1, -1)
            candidate_attention_mask = candidate_attention_mask.unsqueeze(0).expand(batch_size, -1, -1)
        if candidate_ids.dim() != 3 or candidate_ids.shape[0] != batch_size:
            raise ValueError(
                f"candidate_ids must be (n_candidates, len) or ({batch_size}, n_candidates, len); "
                f"got {tuple(candidate_ids.shape)}."
            )
        n_candidates = candidate_ids.shape[1]
        candidate_ids = candidate_ids.to(inputs_embeds.device)
        candidate_mask = candidate_attention_mask.to(inputs_embeds.device)
        if not self.config.use_decoder_only_language_model:
            if encoder_outputs is None:
                encoder_outputs = self.get_encoder()(
                    inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True
                )
            log_likelihoods = self._score_encoder_decoder(
                encoder_outputs.last_hidden_state,
                attention_mask,
                candidate_ids,
                candidate_mask,
                max_rows_per_pass,
            )
            return InstructCellLabelScoresOutput(
                log_likelihoods=log_likelihoods, probabilities=torch.softmax(log_likelihoods, dim=-1)
            )
        candidate_ids = candidate_ids.reshape(batch_size * n_candidates, -1)
        candidate_mask = candidate_mask.reshape(batch_size * n_candidates, -1)
        labels = candidate_ids.masked_fill(candidate_mask == 0, IGNORE_INDEX)
        row_prompt = torch.arange(batch_size, device=inputs_embeds.device).repeat_interleave(n_candidates)
        rows = batch_size * n_candidates
        step = rows if not max_rows_per_pass else max(1, int(max_rows_per_pass))
        scores = []
        for start in range(0, rows, step):
            index = row_prompt[start : start + step]
            chunk_labels = labels[start : start + step]
            outputs, _ = self._decoder_only_forward(
                inputs_embeds[index], attention_mask[index], chunk_labels, {"return_dict": True}
            )
            logits = outputs.logits[:, inputs_embeds.shape[1] - 1 : -1]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            target = chunk_labels.clamp_min(0).unsqueeze(-1)
            token_scores = log_probs.gather(-1, target).squeeze(-1) * (chunk_labels != IGNORE_INDEX)
            scores.append(token_scores.sum(-1))
        log_likelihoods = torch.cat(scores).reshape(batch_size, n_candidates)
        return InstructCellLabelScoresOutput(
            log_likelihoods=log_likelihoods, probabilities=torch.softmax(log_likelihoods, dim=-1)
        )

    def _score_encoder_decoder(
        self,
        encoder_states: torch.Tensor,
        attention_mask: torch.Tensor,
        candidate_ids: torch.LongTensor,
        candidate_mask: torch.LongTensor,
        max_rows_per_pass: int | None,
    ) -> torch.Tensor:
        """Return summed candidate log-probabilities ``(batch, n_candidates)`` (encoder-decoder backbones).

        ``encoder_states`` ``(batch, seq_len, hidden)`` come from one encoder pass. The decoder runs once per
        prompt on the start token plus the prefix that all candidates share (this also fills the
        cross-attention key/value cache), then once per bucket of candidates of equal remaining length over
        their remaining tokens, with that cache repeated (no decoder step on padding). The vocabulary
        projection and its log-normalizer, most of the work at a large vocabulary, run once per distinct
        candidate prefix of a prompt rather than once per candidate token (:func:`candidate_prefix_tree`).
        """
        batch_size, n_candidates, _ = candidate_ids.shape
        lengths = candidate_mask.sum(-1)
        if bool((lengths == 0).any()):
            raise ValueError("Every candidate answer needs at least one token.")
        flat = candidate_ids.reshape(-1, candidate_ids.shape[-1])
        same = (flat == flat[:1]).all(0)
        shared = 0
        while shared < int(lengths.min()) - 1 and bool(same[shared]):
            shared += 1
        step = batch_size if not max_rows_per_pass else max(1, int(max_rows_per_pass) // n_candidates)
        return torch.cat(
            [
                self._score_rows(
                    encoder_states[begin : begin + step],
                    attention_mask[begin : begin + step],
                    candidate_ids[begin : begin + step],
                    lengths[begin : begin + step],
                    shared,
                )
                for begin in range(0, batch_size, step)
            ]
        )

    def _score_rows(
        self,
        encoder_states: torch.Tensor,
        attention_mask: torch.Tensor,
        candidate_ids: torch.LongTensor,
        lengths: torch.LongTensor,
        shared: int,
    ) -> torch.Tensor:
        """Score candidates ``(n_rows, n_candidates, len)``: summed log-probabilities per candidate."""
        n_rows, n_candidates, _ = candidate_ids.shape
        decoder = self.get_decoder()
        start = torch.full(
            (n_rows, 1),
            self.config.text_config.decoder_start_token_id,
            dtype=candidate_ids.dtype,
            device=candidate_ids.device,
        )

        def shared_pass():  # also fills the cross-attention key/value cache
            return decoder(
                input_ids=torch.cat([start, candidate_ids[:, 0, :shared]], dim=1),
                encoder_hidden_states=encoder_states,
                encoder_attention_mask=attention_mask,
                use_cache=True,
                return_dict=True,
            )

        first = shared_pass()
        hidden = [first.last_hidden_state.reshape(n_rows * (shared + 1), -1)]
        # Row of the decoder state that predicts each candidate token: first the shared pass's states.
        state_index = torch.zeros_like(candidate_ids)
        prompt_states = torch.arange(n_rows * (shared + 1), device=state_index.device).reshape(n_rows, 1, -1)
        state_index[:, :, : shared + 1] = prompt_states
        offset = n_rows * (shared + 1)
        # Then the candidates' own tokens, in buckets of equal remaining length: no decoder step on padding.
        remaining = lengths.max(0).values - 1 - shared
        bucket_lengths = [length for length in remaining.unique().tolist() if length > 0]
        for number, length in enumerate(bucket_lengths):
            columns = torch.nonzero(remaining == length).flatten()
            n_columns = columns.shape[0]
            # Each bucket repeats a cache of its own (the repeat is in place; a copy would break autograd).
            cache = first.cache if number == 0 else shared_pass().cache
            cache.batch_repeat_interleave(n_columns)
            rest = decoder(
                input_ids=candidate_ids[:, columns, shared : shared + length].reshape(-1, length),
                encoder_hidden_states=encoder_states.repeat_interleave(n_columns, dim=0),
                encoder_attention_mask=attention_mask.repeat_interleave(n_columns, dim=0),
                cache=cache,
                use_cache=True,
                return_dict=True,
            )
            n_states = n_rows * n_columns * length
            hidden.append(rest.last_hidden_state.reshape(n_states, -1))
            rows = torch.arange(offset, offset + n_states, device=state_index.device)
            state_index[:, columns, shared + 1 : shared + 1 + length] = rows.reshape(
                n_rows, n_columns, length
            )
            offset += n_states
        tree = candidate_prefix_tree(candidate_ids, lengths, state_index)
        node_states = torch.cat(hidden)[tree.node_state_index]
        token_scores = self._token_log_probs(node_states, tree.token_node, tree.token_target)
        totals = torch.zeros(n_rows * n_candidates, dtype=token_scores.dtype, device=token_scores.device)
        return totals.index_add(0, tree.token_candidate, token_scores).reshape(n_rows, n_candidates)

    def _token_log_probs(
        self, node_states: torch.Tensor, token_node: torch.LongTensor, token_target: torch.LongTensor
    ) -> torch.Tensor:
        """Log-probabilities ``(n_tokens,)`` of ``token_target`` after the decoder states ``node_states``.

        ``node_states`` ``(n_nodes, hidden)`` are projected on the vocabulary in chunks of at most ``2**22``
        logits, so memory stays flat at any vocabulary size; token ``i`` reads node ``token_node[i]``.
        """
        vocab_size = self.config.text_config.vocab_size
        chunk = max(1, 2**22 // vocab_size)
        scores = []
        for begin in range(0, node_states.shape[0], chunk):
            logits = self._decoder_logits(node_states[begin : begin + chunk]).float()
            in_chunk = (token_node >= begin) & (token_node < begin + chunk)
            rows = token_node[in_chunk] - begin
            target_logits = logits[rows, token_target[in_chunk]]
            scores.append((in_chunk, target_logits - torch.logsumexp(logits, dim=-1)[rows]))
        token_scores = torch.zeros(token_node.shape[0], dtype=torch.float32, device=node_states.device)
        for in_chunk, values in scores:
            token_scores = token_scores.masked_scatter(in_chunk, values)
        return token_scores

    def _decoder_logits(self, decoder_states: torch.Tensor) -> torch.Tensor:
        """Project last-layer decoder states ``(..., hidden)`` on the vocabulary: ``(..., vocab)`` logits.

        What ``language_model.forward`` does after its decoder: T5's ``d_model ** -0.5`` rescaling of tied
        embeddings, the LM head, and BART-style ``final_logits_bias``.
        """
        language_model = self.language_model
        if getattr(language_model.config, "scale_decoder_outputs", False):
            decoder_states = decoder_states * language_model.config.d_model**-0.5
        logits = language_model.get_output_embeddings()(decoder_states)
        bias = getattr(language_model, "final_logits_bias", None)
        return logits if bias is None else logits + bias.to(logits.dtype)

    @torch.no_grad()
    def signal_states_for_sequences(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.LongTensor | None,
        cell_values: torch.FloatTensor | None,
        sequences: torch.LongTensor,
        encoder_outputs: BaseModelOutput | None = None,
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        """Hidden state at the first ``<SIGNAL>`` of each generated answer, with the answer fed back.

        Parameters
        ----------
        input_ids, attention_mask, cell_values
            The prompts, as given to :meth:`generate`.
        sequences : torch.LongTensor
            Generated ids ``(batch_size, generated_length)``.
        encoder_outputs : BaseModelOutput, optional
            The prompts' encoding from :meth:`encode_prompts` (encoder-decoder backbones), reused.

        Returns
        -------
        tuple of torch.Tensor
            ``(n_signals, hidden_size)`` float32 states and the ``(batch_size,)`` mask of requests with one.
        """
        is_signal = sequences == self.config.signal_token_index
        has_signal = is_signal.any(dim=-1)
        first_signal = is_signal & (is_signal.long().cumsum(-1) == 1)
        if not bool(has_signal.any()):
            hidden_size = self.config.text_config.hidden_size
            return torch.zeros(0, hidden_size, device=sequences.device), has_signal
        if self.config.use_decoder_only_language_model:
            inputs_embeds, _ = self.merge_cell_embeddings(input_ids, cell_values)
            if attention_mask is None:
                attention_mask = torch.ones(
                    inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device
                )
            outputs = self._causal_forward(
                inputs_embeds,
                attention_mask,
                sequences,
                torch.ones_like(sequences),
                output_hidden_states=True,
            )
            hidden = outputs.hidden_states[-1][:, inputs_embeds.shape[1] :]
        else:
            if encoder_outputs is None:
                encoder_outputs = self.encode_prompts(input_ids, attention_mask, cell_values)
            outputs = self.language_model(
                encoder_outputs=encoder_outputs,
                attention_mask=attention_mask,
                decoder_input_ids=sequences,
                output_hidden_states=True,
            )
            hidden = outputs.decoder_hidden_states[-1]
        return hidden[first_signal].float(), has_signal


__all__ = [
    "InstructCellForConditionalGeneration",
    "InstructCellLabelScoresOutput",
    "InstructCellForConditionalGenerationModelOutput",
    "InstructCellGenerateCellsOutput",
    "InstructCellPreTrainedModel",
]
