"""Configuration of InstructCell: a language model that reads and writes single cells."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Blip2QFormerConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .convert_original_instructcell import is_original_config_dict, original_config_to_native

# google-t5/t5-base dimensions: the paper's backbone.
_T5_BASE = {
    "d_model": 768,
    "d_kv": 64,
    "d_ff": 3072,
    "num_layers": 12,
    "num_decoder_layers": 12,
    "num_heads": 12,
    "vocab_size": 32128,
    "decoder_start_token_id": 0,
}

# The paper's Q-Former: L=4 post-LayerNorm BERT layers at the T5 width, cross-attention in every layer.
_QFORMER_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "cross_attention_frequency": 1,
    "encoder_hidden_size": 768,
}


@strict
class InstructCellConfig(PreTrainedConfig):
    r"""Configuration of [`InstructCellForConditionalGeneration`].

    The defaults reproduce the paper's model (arXiv 2501.08187): a T5-base backbone, a cell encoder that
    turns one cell into ``num_kv_tokens`` (t=6) key/value tokens with a residual MLP and pools them into
    ``num_query_tokens`` (k=8) embeddings with a 4-layer Q-Former, and a conditional VAE with a
    zero-inflated negative binomial likelihood that turns the language model's ``<SIGNAL>`` state into
    gene counts.

    Parameters
    ----------
    text_config : dict or PreTrainedConfig, optional
        The language model. Any encoder-decoder (T5 by default) or decoder-only model of the Auto mappings.
    qformer_config : dict or Blip2QFormerConfig, optional
        The Q-Former that pools the key/value tokens into ``num_query_tokens`` embeddings.
        ``encoder_hidden_size`` is the width of each key/value token.
    n_genes : int
        Size of the gene vocabulary: the width of every count vector the model reads or writes.
    num_query_tokens : int
        k, the number of cell embeddings spliced into the text for one cell.
    num_kv_tokens : int
        t, the number of key/value tokens the residual MLP makes from one cell.
    cell_slot_token_ids : list of list of int, optional
        Token ids of the numbers ``1, 2, ...`` as prompts write them before their cells (``cell 3: <CELL>``).
        The mean input embedding of entry i's ids is added to every embedding of a prompt's i-th cell where it
        is spliced in: a cell carries the vector of the word that numbers it, in the prompt and in answers
        (``3: B cells``, ``so cell 3``), so the language model can find "cell 3" by matching it (T5 has no
        absolute positions, and cross-attention none at all). A prompt then holds at most that many cells.
        None (the paper's model) adds nothing.
    cell_mlp_num_blocks : int
        Residual MLP blocks of the cell encoder (the first maps genes to t tokens and has no residual).
    cell_mlp_dropout : float
        Dropout after each MLP block but the last.
    use_language_projection : bool
        Map the Q-Former outputs into the language model with a Linear layer. False feeds them unchanged
        (then the Q-Former width must equal the language model's), as the original InstructCell does.
    target_sum : float or None
        Counts of each cell are scaled to this total before ``log1p`` (``scanpy.pp.normalize_total``);
        ``None`` keeps raw counts.
    log1p : bool
        Apply ``log(1 + x)`` to the (normalized) counts before the cell MLP.
    standardize_genes : bool
        Then center and scale every gene by training-set statistics, clipped to [-10, 10]
        (``scanpy.pp.scale(max_value=10)``); the statistics are buffers saved with the weights, set by
        ``cell_encoder.set_gene_statistics`` before training. False is the paper's model.
    vae_n_latent, vae_n_hidden, vae_n_layers : int
        Latent size, hidden width and hidden layers of the VAE encoder and decoder.
    vae_n_condition : int
        Width of the covariates the ``<SIGNAL>`` hidden state is mapped to.
    vae_dropout : float
        Dropout of the VAE encoders.
    vae_use_layer_norm : bool
        Affine-free LayerNorm after every hidden layer of the VAE.
    vae_adaptive_library : bool
        Let a small head turn (log library, covariates) into the log size factor actually used.
    vae_library_hidden : int
        Hidden width of that head.
    vae_kl_weight : float
        alpha: weight of KL(q(z|x) || p(z)) in the ELBO (3.0: what the original InstructCell trained with).
    vae_loss_weight : float
        Weight of the ELBO relative to the text cross-entropy.
    vae_encode_input_cell : bool
        When a prompt holds one cell and its answer asks for a cell (``<SIGNAL>``: perturbation response),
        the VAE encodes that cell under the ``<SIGNAL>`` condition and decodes it (style transfer, as scGen
        and trVAE do), with that cell's library size, instead of drawing ``z ~ N(0, I)``. Prompts without a
        cell (pseudo-cell generation) are unaffected.
    alignment_loss_weight : float
        Weight of the cell-label alignment loss (0 = the paper's objective): a contrastive loss that pulls
        each input cell's mean embedding towards the mean token embedding of its label text, against the
        other labels of the batch (BLIP-2's image-text contrast, with the label as the text).
    alignment_temperature : float
        Softmax temperature of that loss.
    cell_start_token_index, cell_end_token_index, cell_token_index, signal_token_index : int
        Token ids of ``<CELL>``, ``</CELL>``, the cell placeholder ``<cell_query>`` (replaced by cell
        embeddings) and ``<SIGNAL>`` (its hidden state conditions the VAE).
    initializer_range : float
        Standard deviation of the normal initializer of the new modules.
    label_names : list of str, optional
        The label set of a model fine-tuned on one classification task. The ``single-cell-instruction``
        pipeline scores these candidates when a request brings no label set of its own.
    perturbation_names : list of str, optional
        The perturbations (in words) the model was trained to predict responses to; perturbation inference
        refuses others.

    Notes
    -----
    A ``config.json`` written by the original InstructCell code (``base_model_config``,
    ``feature_encoder_config``, ``feature_decoder_config``, e.g. ``zjunlp/InstructCell-chat``) is translated
    on load by :meth:`from_dict` (see ``convert_original_instructcell.py``).

    Examples
    --------
    >>> from modeling_instructcell import InstructCellConfig
    >>> config = InstructCellConfig(n_genes=2000, text_config={"model_type": "t5", "d_model": 256})
    >>> config.is_encoder_decoder
    True
    """

    model_type = "instructcell"
    attribute_map = {
        "cell_token_id": "cell_token_index",
        "cell_start_token_id": "cell_start_token_index",
        "cell_end_token_id": "cell_end_token_index",
        "signal_token_id": "signal_token_index",
    }
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="t5", init_kwargs=_T5_BASE),
        "qformer_config": SubConfigSpec(config_class=Blip2QFormerConfig, init_kwargs=_QFORMER_BASE),
    }

    text_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    n_genes: int = 18961
    num_query_tokens: int = 8
    num_kv_tokens: int = 6
    cell_slot_token_ids: list[list[int]] | None = None
    cell_mlp_num_blocks: int = 3
    cell_mlp_dropout: float = 0.1
    use_language_projection: bool = True
    target_sum: float | None = 1e4
    log1p: bool = True
    standardize_genes: bool = False
    vae_n_latent: int = 256
    vae_n_hidden: int = 1024
    vae_n_layers: int = 4
    vae_n_condition: int = 256
    vae_dropout: float = 0.1
    vae_use_layer_norm: bool = True
    vae_adaptive_library: bool = True
    vae_library_hidden: int = 128
    vae_kl_weight: float = 3.0
    vae_loss_weight: float = 1.0
    vae_encode_input_cell: bool = True
    alignment_loss_weight: float = 0.0
    alignment_temperature: float = 0.1
    cell_start_token_index: int = 32100
    cell_end_token_index: int = 32101
    cell_token_index: int = 32102
    signal_token_index: int = 32103
    initializer_range: float = 0.02
    label_names: list[str] | None = None
    perturbation_names: list[str] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.is_encoder_decoder = self.text_config.is_encoder_decoder
        self.use_decoder_only_language_model = (
            self.text_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        )
        if self.is_encoder_decoder and getattr(self.text_config, "decoder_start_token_id", None) is None:
            # T5 starts decoding from the pad token; its config class has no field for it.
            self.text_config.decoder_start_token_id = self.text_config.pad_token_id
        # Seq2SeqTrainer (padding generated ids) and pipelines read the pad id from the top-level config.
        self.pad_token_id = self.text_config.pad_token_id
        if self.n_genes < 1 or self.num_query_tokens < 1 or self.num_kv_tokens < 1:
            raise ValueError(
                "n_genes, num_query_tokens and num_kv_tokens must be positive, got "
                f"{self.n_genes}, {self.num_query_tokens}, {self.num_kv_tokens}."
            )
        if self.cell_slot_token_ids is not None and not all(self.cell_slot_token_ids):
            raise ValueError("cell_slot_token_ids needs at least one token id per slot (the number's).")
        if self.cell_mlp_num_blocks < 1:
            raise ValueError(f"cell_mlp_num_blocks must be at least 1, got {self.cell_mlp_num_blocks}.")
        if self.target_sum is not None and self.target_sum <= 0:
            raise ValueError(f"target_sum must be positive or None, got {self.target_sum}.")
        if (
            not self.use_language_projection
            and self.qformer_config.hidden_size != self.text_config.hidden_size
        ):
            raise ValueError(
                "use_language_projection=False needs qformer_config.hidden_size == text_config.hidden_size, "
                "got "
                f"{self.qformer_config.hidden_size} and {self.text_config.hidden_size}."
            )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Build the config from a dict; dicts written by the original InstructCell code are translated."""
        if is_original_config_dict(config_dict):
            config_dict = original_config_to_native(config_dict)
        return super().from_dict(config_dict, **kwargs)


__all__ = ["InstructCellConfig"]
