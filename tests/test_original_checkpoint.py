"""Original InstructCell checkpoints (zjunlp/InstructCell-chat, -instruct) load and reproduce the original.

Fixture: ``../shared/reference/original_tiny/`` (a tiny checkpoint written by the original code and its
recorded outputs, see its README). A fresh clone has no ``../shared``; then every test here is skipped.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from script_modules import load_script
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoProcessor

from modeling_instructcell import (
    InstructCellConfig,
    InstructCellForConditionalGeneration,
    InstructCellProcessor,
)
from modeling_instructcell.convert_original_instructcell import (
    ORIGINAL_GENE_VOCAB_FILE,
    convert_original_state_dict,
    load_original_gene_vocab,
)
from modeling_instructcell.modeling_cell_encoder import normalize_counts
from modeling_instructcell.modeling_cell_vae import VAE_KEYS

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
TINY = REFERENCE / "original_tiny"
CHECKPOINT = TINY / "checkpoint"
if not (CHECKPOINT / "config.json").is_file() or not (TINY / "reference.pt").is_file():
    pytest.skip(
        f"original-checkpoint fixture not found at {TINY} (it lives in ../shared, next to the repository; "
        "a fresh clone does not have it)",
        allow_module_level=True,
    )

TOL = {"atol": 1e-4, "rtol": 1e-4}
TINY_GENES = [f"GENE{i}" for i in range(200)]  # the tiny checkpoint reads 200 unnamed genes
GEN_TARGET = "Sure, here is a profile of a human T cell:<CELL1>"


@pytest.fixture(scope="module")
def ref():
    return torch.load(TINY / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def model():
    return InstructCellForConditionalGeneration.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(CHECKPOINT, gene_names=TINY_GENES)


@pytest.fixture(scope="module")
def batch_a(processor, ref):
    return processor(
        text=ref["inputs/prompt_template"],
        cells=ref["inputs/counts_int"].numpy(),
        metadata=ref["inputs/sc_metadata"],
        text_target=ref["inputs/target_text"],
    )


def collapse_placeholders(ids: torch.Tensor, placeholder: int) -> torch.Tensor:
    """One placeholder per run of placeholders: our k copies -> the original's single <CELL0>."""
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[..., 1:] = ~((ids[..., 1:] == placeholder) & (ids[..., :-1] == placeholder))
    return ids[keep]


# ------------------------------------------------------------------------------------------------ loading
def test_config_translation():
    config = AutoConfig.from_pretrained(CHECKPOINT)
    assert isinstance(config, InstructCellConfig)
    text, qformer = config.text_config, config.qformer_config
    assert text.model_type == "t5" and text.vocab_size == 312  # the 4.33 over-padded size, kept as stored
    assert (text.d_model, text.d_kv, text.d_ff, text.num_layers, text.num_decoder_layers, text.num_heads) == (
        64,
        16,
        128,
        2,
        2,
        4,
    )
    assert (text.pad_token_id, text.eos_token_id, text.decoder_start_token_id) == (0, 1, 0)
    assert text.tie_word_embeddings and text.feed_forward_proj == "relu"
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.num_attention_heads) == (64, 2, 4)
    assert (qformer.intermediate_size, qformer.encoder_hidden_size, qformer.layer_norm_eps) == (
        256,
        64,
        1e-12,
    )
    assert (config.n_genes, config.num_query_tokens, config.num_kv_tokens, config.cell_mlp_num_blocks) == (
        200,
        4,
        2,
        3,
    )
    assert not config.use_language_projection
    assert (config.target_sum, config.log1p) == (1e4, True)
    assert (config.vae_n_latent, config.vae_n_hidden, config.vae_n_layers, config.vae_n_condition) == (
        16,
        64,
        2,
        16,
    )
    assert config.vae_library_hidden == 8 and config.vae_kl_weight == 3.0
    assert (
        config.cell_start_token_id,
        config.cell_end_token_id,
        config.cell_token_id,
        config.signal_token_id,
    ) == (300, 301, 302, 303)


@pytest.mark.parametrize(
    "auto_class", [AutoModel, AutoModelForSeq2SeqLM, InstructCellForConditionalGeneration]
)
def test_entry_points_load_every_weight(auto_class):
    loaded, info = auto_class.from_pretrained(CHECKPOINT, output_loading_info=True)
    assert isinstance(loaded, InstructCellForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not loaded.training
    assert loaded.generation_config.eos_token_id == [1, 303]  # the original stops at </s> or <CELL1>


def test_key_mapping_matches_state_dict_conversion(model):
    original = torch.load(CHECKPOINT / "pytorch_model.bin", weights_only=True)
    converted = convert_original_state_dict(original)
    fresh = InstructCellForConditionalGeneration(model.config)
    missing, unexpected = fresh.load_state_dict(converted, strict=False)
    assert not missing and not unexpected
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, fresh.state_dict()[name], atol=0, rtol=0, msg=name)


def test_processor_for_original_folder(processor, batch_a, ref):
    assert isinstance(processor, InstructCellProcessor)
    assert processor.special_token_ids == {
        "cell_start_token_index": 300,
        "cell_end_token_index": 301,
        "cell_token_index": 302,
        "signal_token_index": 303,
    }
    assert processor.num_query_tokens == 4 and len(processor.tokenizer) == 304
    ids = batch_a["input_ids"][0]
    assert int((ids == 302).sum()) == 4
    torch.testing.assert_close(collapse_placeholders(ids, 302), ref["inputs/input_ids"][0], atol=0, rtol=0)
    torch.testing.assert_close(batch_a["labels"], ref["inputs/labels"], atol=0, rtol=0)
    torch.testing.assert_close(batch_a["cell_values"], ref["inputs/input_counts_float32"], atol=0, rtol=0)


def test_processor_aligns_genes_in_any_order(processor, ref):
    counts = ref["inputs/counts_int"].numpy()
    order = np.random.default_rng(0).permutation(len(TINY_GENES))
    shuffled = processor.feature_extractor(counts[:, order], gene_names=[TINY_GENES[i] for i in order])
    np.testing.assert_array_equal(shuffled["cell_values"], counts.astype(np.float32))


def test_processor_defaults_to_original_gene_vocabulary(tmp_path):
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (tmp_path / name).write_bytes((CHECKPOINT / name).read_bytes())
    config = json.loads((CHECKPOINT / "config.json").read_text())
    config["feature_encoder_config"]["count_dim"] = 18961
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoProcessor.from_pretrained(tmp_path)
    expected = (REFERENCE / "original_vocab" / "gene_vocab.txt").read_text().splitlines()
    assert loaded.feature_extractor.gene_names == expected
    with pytest.raises(ValueError, match="18,961"):
        AutoProcessor.from_pretrained(CHECKPOINT)  # 200 genes: the caller must name them


def test_original_gene_vocabulary_copy():
    expected = (REFERENCE / "original_vocab" / "gene_vocab.txt").read_text().splitlines()
    assert ORIGINAL_GENE_VOCAB_FILE.is_file()
    assert load_original_gene_vocab() == expected and len(expected) == 18961
    assert load_original_gene_vocab(REFERENCE / "original_vocab" / "gene_vocab.npy") == expected


# ------------------------------------------------------------------------------ (a) encoder + teacher forcing
def test_cell_encoder_matches(model, batch_a, ref):
    config = model.config
    cell_values = batch_a["cell_values"]
    torch.testing.assert_close(
        normalize_counts(cell_values, config.target_sum, config.log1p), ref["a/preprocessed_counts"], **TOL
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.cell_encoder.get_kv_tokens(cell_values), ref["a/cell_encoder_kv_tokens"], **TOL
        )
        torch.testing.assert_close(model.get_cell_features(cell_values), ref["a/qformer_features"], **TOL)
        text_embeds = model.get_input_embeddings()(ref["inputs/input_ids"])
        torch.testing.assert_close(text_embeds, ref["a/text_inputs_embeds"], **TOL)
        # Ours has k placeholder positions where the original inserted k vectors: the same layout.
        merged, _ = model.merge_cell_embeddings(batch_a["input_ids"], cell_values)
    torch.testing.assert_close(merged, ref["a/merged_inputs_embeds"], **TOL)
    torch.testing.assert_close(batch_a["attention_mask"], ref["a/merged_attention_mask"], atol=0, rtol=0)


def test_teacher_forced_logits_and_loss(model, batch_a, ref):
    with torch.no_grad():
        out = model(**batch_a, output_hidden_states=True)
    lm = out.language_model_outputs
    torch.testing.assert_close(lm.encoder_last_hidden_state, ref["a/encoder_last_hidden_state"], **TOL)
    torch.testing.assert_close(lm.decoder_hidden_states[-1], ref["a/decoder_last_hidden_state"], **TOL)
    torch.testing.assert_close(out.logits, ref["a/logits"], **TOL)
    torch.testing.assert_close(out.loss, ref["a/loss"], **TOL)


def test_batched_padded_teacher_forcing(model, processor, ref):
    batch = processor(
        text=[ref["inputs/prompt_template"], ref["b2/prompt_template"]],
        cells=ref["a2/input_counts_float32"].numpy(),
        metadata=[ref["inputs/sc_metadata"], ref["inputs/sc_metadata"]],
        text_target=[ref["inputs/target_text"], GEN_TARGET],
    )
    torch.testing.assert_close(batch["labels"], ref["a2/labels"], atol=0, rtol=0)
    mask = batch["attention_mask"]
    torch.testing.assert_close(mask, ref["a2/merged_attention_mask"], atol=0, rtol=0)
    with torch.no_grad():
        merged, _ = model.merge_cell_embeddings(batch["input_ids"], batch["cell_values"])
        out = model(**batch)
    # The original zeroes the embeddings of pad positions; ours keep the pad embedding. Both are masked out
    # of attention, so only real positions are compared, and the logits and loss show they do not matter.
    real = mask.bool()
    torch.testing.assert_close(merged[real], ref["a2/merged_inputs_embeds"][real], **TOL)
    torch.testing.assert_close(out.logits, ref["a2/logits"], **TOL)
    torch.testing.assert_close(out.loss, ref["a2/loss"], **TOL)


# ---------------------------------------------------------------------------------- (b) greedy decoding
def test_greedy_annotation(model, processor, ref):
    inputs = processor(
        text=ref["inputs/prompt_template"],
        cells=ref["inputs/counts_int"].numpy(),
        metadata=ref["inputs/sc_metadata"],
    )
    ids = model.generate(**inputs, max_new_tokens=ref["b/max_new_tokens"], do_sample=False)
    torch.testing.assert_close(ids, ref["b/greedy_generated_ids"], atol=0, rtol=0)
    answer = processor.post_process_generation(ids)[0]
    assert answer == {"text": ref["b/greedy_text"], "has_signal": False}


@pytest.fixture(scope="module")
def generation_inputs(processor, ref):
    inputs = processor(text=ref["b2/prompt_template"], metadata=ref["inputs/sc_metadata"])
    torch.testing.assert_close(inputs["input_ids"], ref["b2/input_ids"], atol=0, rtol=0)
    return inputs


def test_greedy_cell_generation_and_condition(model, processor, generation_inputs, ref):
    out = model.generate_cells(
        **generation_inputs, max_new_tokens=ref["b2/max_new_tokens"], do_sample=False, seed=0
    )
    torch.testing.assert_close(out.sequences, ref["b2/greedy_generated_ids"], atol=0, rtol=0)
    assert processor.post_process_generation(out.sequences)[0] == {
        "text": ref["b2/greedy_text"],
        "has_signal": True,
    }
    torch.testing.assert_close(out.condition_states, ref["b2/condition_embeds"], **TOL)
    # The original samples with the global RNG seeded 0; a torch.Generator seeded 0 gives the same stream.
    torch.testing.assert_close(out.cell_values.float(), ref["b2/sampled_cell_seed0"][None], atol=0, rtol=0)


def test_global_seed_path_matches_too(model, generation_inputs, ref):
    torch.manual_seed(0)
    out = model.generate_cells(**generation_inputs, max_new_tokens=ref["b2/max_new_tokens"], do_sample=False)
    torch.testing.assert_close(out.cell_values.float(), ref["b2/sampled_cell_seed0"][None], atol=0, rtol=0)


# ---------------------------------------------------------------------------------- (c) conditional VAE
def test_vae_generative_parameters(model, ref):
    vae = model.cell_vae
    with torch.no_grad():
        condition = vae.map_condition(ref["c/condition_embeds"])
        outputs = vae.generative(ref["c/z"], ref["c/library_log"], condition)
    px, pl = outputs[VAE_KEYS.px], outputs[VAE_KEYS.pl]
    torch.testing.assert_close(condition, ref["c/cont_covs"], **TOL)
    torch.testing.assert_close(outputs[VAE_KEYS.size_factor_log], ref["c/size_factor_log"], **TOL)
    torch.testing.assert_close(px.scale, ref["c/px_scale"], **TOL)
    torch.testing.assert_close(px.mu, ref["c/mu"], **TOL)
    torch.testing.assert_close(px.theta, ref["c/theta"], **TOL)
    torch.testing.assert_close(px.zi_logits, ref["c/zi_logits"], **TOL)
    torch.testing.assert_close(pl.loc, ref["c/p_library_loc"], **TOL)
    torch.testing.assert_close(pl.scale, ref["c/p_library_scale"], **TOL)
    torch.testing.assert_close(px.log_prob(ref["c/x_for_log_prob"].float()), ref["c/zinb_log_prob"], **TOL)


def test_condition_from_signal_state(model, generation_inputs, ref):
    states, has_signal = model.signal_states_for_sequences(
        generation_inputs["input_ids"], None, None, ref["c2/decoder_input_ids"]
    )
    assert has_signal.tolist() == [True]
    torch.testing.assert_close(states, ref["c2/condition_embeds"][:, 0], **TOL)
    with torch.no_grad():
        px = model.cell_vae.generative(
            ref["c/z"][:1], ref["c/library_log"][:1], model.cell_vae.map_condition(states)
        )
    px = px[VAE_KEYS.px]
    torch.testing.assert_close(px.mu, ref["c2/mu"], **TOL)
    torch.testing.assert_close(px.theta, ref["c2/theta"], **TOL)
    torch.testing.assert_close(px.zi_logits, ref["c2/zi_logits"], **TOL)


def test_vae_inference(model, ref):
    with torch.no_grad():
        outputs = model.cell_vae.inference(ref["c/x_for_log_prob"].float(), ref["c/cont_covs"])
    torch.testing.assert_close(outputs[VAE_KEYS.qz].loc, ref["c3/qz_loc"], **TOL)
    torch.testing.assert_close(outputs[VAE_KEYS.qz].scale, ref["c3/qz_scale"], **TOL)
    torch.testing.assert_close(outputs[VAE_KEYS.ql].loc, ref["c3/ql_loc"], **TOL)
    torch.testing.assert_close(outputs[VAE_KEYS.ql].scale, ref["c3/ql_scale"], **TOL)


@pytest.mark.parametrize("use_generator", [True, False])
def test_seeded_samples_with_given_library(model, ref, use_generator):
    # The original takes a natural-log library; ours takes total counts.
    library_size = ref["c/library_log"].exp().flatten()
    generator = torch.Generator().manual_seed(7) if use_generator else None
    if not use_generator:
        torch.manual_seed(7)
    cells = model.cell_vae.sample(ref["c/condition_embeds"], library_size=library_size, generator=generator)
    torch.testing.assert_close(cells, ref["c4/sampled_counts_seed7"], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ conversion
def _load_converter():
    return load_script("examples/convert_original_checkpoint.py", "convert_original_checkpoint")


def test_converted_folder_gives_the_same_outputs(tmp_path, model, batch_a, ref):
    names = tmp_path / "genes.txt"
    names.write_text("\n".join(TINY_GENES))
    out = _load_converter().main([str(CHECKPOINT), str(tmp_path / "converted"), "--gene-names", str(names)])
    saved = json.loads((out / "config.json").read_text())
    assert "base_model_config" not in saved and saved["use_language_projection"] is False
    assert {"AutoConfig", "AutoModel", "AutoModelForSeq2SeqLM"} <= set(saved["auto_map"])
    assert (out / "processor_config.json").is_file() and (out / "modeling_instructcell.py").is_file()
    with safe_open(out / "model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert not [key for key in keys if re.match(r"assistant\.", key)]
    assert all(key.split(".")[0] in {"cell_encoder", "language_model", "cell_vae"} for key in keys)

    converted = AutoModel.from_pretrained(out)
    converted_processor = AutoProcessor.from_pretrained(out)
    batch = converted_processor(
        text=ref["inputs/prompt_template"],
        cells=ref["inputs/counts_int"].numpy(),
        metadata=ref["inputs/sc_metadata"],
        text_target=ref["inputs/target_text"],
    )
    for key in batch_a:
        torch.testing.assert_close(batch[key], batch_a[key], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(converted(**batch).logits, ref["a/logits"], **TOL)
    batch.pop("labels")
    ids = converted.generate(**batch, max_new_tokens=24)
    torch.testing.assert_close(ids, ref["b/greedy_generated_ids"], atol=0, rtol=0)
    assert converted.generation_config.eos_token_id == [1, 303]
