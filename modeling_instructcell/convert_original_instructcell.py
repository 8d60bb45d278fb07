"""Read checkpoints written by the original InstructCell code (zjunlp/InstructCell-chat / -instruct).

The original ``InstructCell.save_pretrained`` (transformers 4.33.3) writes a ``config.json`` with three nested
parts (``base_model_config``: a T5 config stored as a diff against ``T5Config()`` defaults;
``feature_encoder_config``; ``feature_decoder_config``), a ``pytorch_model.bin`` whose keys all start with
``assistant.``, and the slow T5 tokenizer files. This module holds the pure translation of both into this
package's format:

* :func:`is_original_config_dict` / :func:`original_config_to_native`: config ``dict`` ->
  ``InstructCellConfig`` keyword arguments (used by ``InstructCellConfig.from_dict``, hence by every
  ``from_pretrained``);
* :data:`ORIGINAL_KEY_MAPPING`: regex renamings for ``from_pretrained(..., key_mapping=...)`` (transformers'
  ``WeightRenaming``), applied in order, each on the output of the previous one;
  :func:`convert_original_state_dict` applies the same renamings to an in-memory state dict;
* :func:`load_original_gene_vocab`: the original 18,961-gene vocabulary in checkpoint order.

This file is Hub remote code: it imports only the standard library.
"""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Where the original repository publishes its gene vocabulary (a numpy ``.npy`` array of gene symbols).
ORIGINAL_GENE_VOCAB_URL = "https://raw.githubusercontent.com/zjunlp/InstructCell/main/exp_log/gene_vocab.npy"
#: Copy of that vocabulary shipped with this package, one symbol per line (MIT-licensed original repository).
ORIGINAL_GENE_VOCAB_FILE = Path(__file__).with_name("original_gene_vocab.txt")
ORIGINAL_N_GENES = 18961

# transformers 4.33 `T5Config()` defaults: the original `base_model_config` only stores the keys that differ.
_T5_433_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_decoder_layers": None,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,
    "feed_forward_proj": "relu",
    "is_encoder_decoder": True,
    "use_cache": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "classifier_dropout": 0.0,
    "tie_word_embeddings": True,
}
# Attributes the original code adds to the T5 config (they become InstructCellConfig token ids) or that
# describe the original wrapper rather than the backbone.
_ORIGINAL_T5_EXTRAS = (
    "special_tokens_dict",
    "special_tokens_index_dict",
    "num_signal_tokens",
    "ignore_index",
    "architectures",
    "_name_or_path",
    "transformers_version",
)
_ORIGINAL_TOP_LEVEL = ("base_model_config", "feature_encoder_config", "feature_decoder_config")

# Checkpoint key renamings, original -> this package. Applied in order by transformers (every match fires,
# chaining), so the catch-all rules come last and every rule is anchored on the original `assistant.` prefix.
_B = r"^assistant\.feature_decoder\.base_model\."
ORIGINAL_KEY_MAPPING: dict[str, str] = {
    # T5 backbone (the tied embedding is stored under four names; all four load into the one tensor).
    r"^assistant\.base_model\.": "language_model.",
    # Cell encoder: residual MLP, query tokens, then the BLIP-2 Q-Former (`layernorm`, `encoder.layer.*`).
    r"^assistant\.feature_encoder\.cell_encoder\.(\d+)\.linear": r"cell_encoder.mlp.\1.linear",
    r"^assistant\.feature_encoder\.query_tokens": "cell_encoder.query_tokens",
    r"^assistant\.feature_encoder\.": "cell_encoder.qformer.",
    # Conditional VAE.
    r"^assistant\.feature_decoder\.mapping_layer": "cell_vae.condition_mapping",
    _B + r"px_r": "cell_vae.px_r",
    _B + r"library_log_means": "cell_vae.library_log_mean",
    _B + r"library_log_vars": "cell_vae.library_log_var",
    _B + r"z_encoder\.encoder\.fc_layers\.Layer (\d+)\.0": r"cell_vae.z_encoder.layers.\1.linear",
    _B + r"l_encoder\.encoder\.fc_layers\.Layer (\d+)\.0": r"cell_vae.l_encoder.layers.\1.linear",
    _B + r"z_encoder\.": "cell_vae.z_encoder.",
    _B + r"l_encoder\.": "cell_vae.l_encoder.",
    _B + r"decoder\.px_decoder\.fc_layers\.Layer (\d+)\.0": r"cell_vae.decoder.layers.\1.linear",
    _B + r"decoder\.px_scale_decoder\.0": "cell_vae.decoder.scale_head",
    _B + r"decoder\.px_dropout_decoder": "cell_vae.decoder.dropout_head",
    _B + r"library_decoder\.": "cell_vae.library_head.",
}
#: Original keys without a counterpart: the per-cell dispersion head, never used with "gene" dispersion.
ORIGINAL_UNUSED_KEYS = (r"^assistant\.feature_decoder\.base_model\.decoder\.px_r_decoder\.",)


def is_original_config_dict(config_dict: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` dict was written by the original InstructCell code."""
    return any(key in config_dict for key in _ORIGINAL_TOP_LEVEL)


def _original_t5_config(base: Mapping[str, Any]) -> dict[str, Any]:
    """Full T5 config dict from the stored diff: 4.33 defaults + stored keys, original extras dropped."""
    text_config = dict(_T5_433_DEFAULTS)
    text_config.update({k: v for k, v in base.items() if k not in _ORIGINAL_T5_EXTRAS})
    if text_config.get("num_decoder_layers") is None:
        text_config["num_decoder_layers"] = text_config["num_layers"]
    if text_config.get("decoder_start_token_id") is None:
        text_config["decoder_start_token_id"] = text_config["pad_token_id"]
    text_config["model_type"] = "t5"
    # `vocab_size` stays as stored (e.g. 32112 = transformers 4.33's over-padding of 32104): it is the shape
    # of the checkpoint's embedding and LM head, rows without a token included.
    return text_config


def original_config_to_native(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an original ``config.json`` dict into ``InstructCellConfig`` keyword arguments.

    Parameters
    ----------
    config_dict : Mapping
        The original config (top-level ``base_model_config``, ``feature_encoder_config``,
        ``feature_decoder_config``, ``normalize_total``, ``log_variational``...).

    Returns
    -------
    dict
        Keyword arguments of ``InstructCellConfig``, the backbone as ``text_config`` and the Q-Former as
        ``qformer_config``; ``use_language_projection`` is False (the original feeds the Q-Former output
        to T5 directly).

    Raises
    ------
    ValueError
        For original options this package does not implement (batch norm, partial layer norm, a non-Q-Former
        encoder, a VAE without ``log_variational``).
    """
    base = dict(config_dict.get("base_model_config") or {})
    if base.get("model_type", "t5") != "t5" or not base.get("is_encoder_decoder", True):
        raise ValueError(
            f"Only T5 backbones of the original InstructCell are supported, got {base.get('model_type')!r}."
        )
    encoder = dict(config_dict.get("feature_encoder_config") or {})
    decoder = dict(config_dict.get("feature_decoder_config") or {})
    text_config = _original_t5_config(base)
    d_model, num_heads = text_config["d_model"], text_config["num_heads"]

    if not encoder.get("is_q_former_encoder", True):
        raise ValueError("The original checkpoint uses a non-Q-Former cell encoder, which is not supported.")
    hidden_dropout = encoder.get("hidden_dropout_prob", 0.1)
    qformer_config = {
        "hidden_size": d_model,
        "num_hidden_layers": encoder.get("num_hidden_layers", 4),
        "num_attention_heads": num_heads,
        "intermediate_size": 4 * d_model,
        "hidden_act": "gelu",
        "hidden_dropout_prob": hidden_dropout,
        "attention_probs_dropout_prob": 0.1,
        "layer_norm_eps": 1e-12,
        "cross_attention_frequency": encoder.get("cross_attention_frequency", 1),
        "encoder_hidden_size": d_model,
    }

    for option in ("use_batch_norm",):
        if decoder.get(option, "none") != "none":
            raise ValueError(
                f"feature_decoder_config.{option}={decoder[option]!r} is not supported (only 'none')."
            )
    layer_norm = decoder.get("use_layer_norm", "both")
    if layer_norm not in ("both", "none"):
        raise ValueError(
            f"feature_decoder_config.use_layer_norm={layer_norm!r} is not supported ('both' or 'none')."
        )
    if not decoder.get("log_variational", True):
        raise ValueError("feature_decoder_config.log_variational=False is not supported.")
    n_condition = decoder.get("condition_input_dim", 256)

    special = dict(base.get("special_tokens_index_dict") or {})
    token_ids = {
        "cell_start_token_index": special.get("start_tag", 32100),
        "cell_end_token_index": special.get("end_tag", 32101),
        "cell_token_index": special.get("placeholder", 32102),
        "signal_token_index": special.get("first_signal_token", 32103),
    }
    native = {
        "text_config": text_config,
        "qformer_config": qformer_config,
        "n_genes": encoder.get("count_dim", ORIGINAL_N_GENES),
        "num_query_tokens": encoder.get("num_query_tokens", 8),
        "num_kv_tokens": encoder.get("num_key_value_tokens", 6),
        "cell_mlp_num_blocks": encoder.get("num_blocks", 3),
        "cell_mlp_dropout": hidden_dropout,
        "use_language_projection": False,
        "target_sum": 1e4 if config_dict.get("normalize_total", True) else None,
        "log1p": bool(config_dict.get("log_variational", True)),
        "vae_n_latent": decoder.get("n_latent", 256),
        "vae_n_hidden": decoder.get("n_hidden", 1024),
        "vae_n_layers": decoder.get("n_layers", 4),
        "vae_n_condition": n_condition,
        "vae_dropout": decoder.get("dropout_rate", 0.1),
        "vae_use_layer_norm": layer_norm == "both",
        "vae_adaptive_library": bool(decoder.get("adaptive_library", True)),
        # The original sizes its adaptive library head (1 + covariates) // 2 (128 in the published models).
        "vae_library_hidden": (1 + n_condition) // 2,
        "vae_kl_weight": 3.0,
        **token_ids,
    }
    for key in ("torch_dtype", "dtype"):
        if config_dict.get(key) is not None:
            native["dtype"] = config_dict[key]
    return native


def convert_original_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an original state dict to this package's keys (unused original keys are dropped).

    Parameters
    ----------
    state_dict : Mapping
        ``torch.load(".../pytorch_model.bin", weights_only=True)`` of an original checkpoint.

    Returns
    -------
    dict
        Same tensors under this package's names. Keys that match no rule are kept unchanged.
    """
    rules = [(re.compile(pattern), target) for pattern, target in ORIGINAL_KEY_MAPPING.items()]
    unused = [re.compile(pattern) for pattern in ORIGINAL_UNUSED_KEYS]
    converted = {}
    for key, value in state_dict.items():
        if any(pattern.search(key) for pattern in unused):
            continue
        for pattern, target in rules:
            key = pattern.sub(target, key, count=1)
        converted[key] = value
    return converted


def _read_vocab_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_original_gene_vocab(
    path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> list[str]:
    """Return the original 18,961-gene vocabulary in the order the published checkpoints expect.

    Looked up in this order: ``path`` (a ``.txt`` with one symbol per line, or the original ``.npy``); the
    copy shipped with the package (``original_gene_vocab.txt``); a cached download; a download of the
    original repository's ``exp_log/gene_vocab.npy`` (:data:`ORIGINAL_GENE_VOCAB_URL`, needs numpy).

    Parameters
    ----------
    path : str or PathLike, optional
        A local copy of the vocabulary.
    cache_dir : str or PathLike, optional
        Download cache (default ``$HF_HOME/instructcell``, else ``~/.cache/huggingface/instructcell``).

    Returns
    -------
    list of str
        Gene symbols, column order of the model's count vectors.
    """
    if path is not None:
        path = Path(path)
        if path.suffix == ".npy":
            return _load_npy_vocab(path)
        return _read_vocab_lines(path)
    if ORIGINAL_GENE_VOCAB_FILE.is_file():
        return _read_vocab_lines(ORIGINAL_GENE_VOCAB_FILE)
    if cache_dir is None:
        hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        cache_dir = os.path.join(hf_home, "instructcell")
    cached = Path(cache_dir) / "original_gene_vocab.npy"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(ORIGINAL_GENE_VOCAB_URL, timeout=60) as response:  # noqa: S310 (fixed https URL)
                data = response.read()
        except OSError as error:
            raise OSError(
                f"Could not download the original gene vocabulary from {ORIGINAL_GENE_VOCAB_URL} ({error}). "
                "Download it yourself and pass gene_vocab_file=<path to gene_vocab.npy or .txt>, or pass "
                "gene_names=[...] (18,961 symbols in checkpoint order)."
            ) from error
        partial = cached.with_suffix(".npy.partial")
        partial.write_bytes(data)
        partial.replace(cached)
    return _load_npy_vocab(cached)


def _load_npy_vocab(path: Path) -> list[str]:
    try:  # numpy is a dependency of the feature extractor; the try block keeps check_imports quiet
        import numpy as np
    except ImportError as error:  # pragma: no cover
        raise ImportError("Reading gene_vocab.npy needs numpy: pip install numpy") from error
    return [str(gene) for gene in np.load(path, allow_pickle=False).tolist()]


__all__ = [
    "ORIGINAL_GENE_VOCAB_URL",
    "ORIGINAL_KEY_MAPPING",
    "ORIGINAL_N_GENES",
    "ORIGINAL_UNUSED_KEYS",
    "convert_original_state_dict",
    "is_original_config_dict",
    "load_original_gene_vocab",
    "original_config_to_native",
]
