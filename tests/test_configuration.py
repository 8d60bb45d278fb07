import pytest
from instructcell.configuration import load_preset

from instructcell.training import config_for_processor
from modeling_instructcell import InstructCellConfig


def test_defaults_are_the_papers_model():
    config = InstructCellConfig()
    assert (config.num_query_tokens, config.num_kv_tokens, config.qformer_config.num_hidden_layers) == (
        8,
        6,
        4,
    )
    assert config.text_config.model_type == "t5" and config.text_config.d_model == 768
    assert config.text_config.num_layers == 12 and config.text_config.decoder_start_token_id == 0
    assert config.qformer_config.cross_attention_frequency == 1
    assert config.is_encoder_decoder and not config.use_decoder_only_language_model
    assert config.target_sum == 1e4 and config.log1p
    assert config.vae_kl_weight == 3.0


def test_round_trip_and_token_aliases(tmp_path):
    config = InstructCellConfig(n_genes=123, signal_token_index=7)
    assert config.signal_token_id == 7
    config.save_pretrained(tmp_path)
    loaded = InstructCellConfig.from_pretrained(tmp_path)
    assert loaded.n_genes == 123 and loaded.signal_token_index == 7
    assert loaded.text_config.to_dict() == config.text_config.to_dict()


def test_decoder_only_backbone_detected():
    config = InstructCellConfig(text_config={"model_type": "gpt2", "n_embd": 32})
    assert config.use_decoder_only_language_model and not config.is_encoder_decoder


def test_strict_types_and_values():
    with pytest.raises(Exception, match="n_genes"):
        InstructCellConfig(n_genes="many")
    with pytest.raises(ValueError, match="positive"):
        InstructCellConfig(num_query_tokens=0)
    with pytest.raises(ValueError, match="target_sum"):
        InstructCellConfig(target_sum=-1.0)


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_presets_build_configs(name, processor):
    config = config_for_processor(name, processor, num_query_tokens=4)
    assert config.n_genes == processor.feature_extractor.vocab_size
    assert config.text_config.vocab_size >= len(processor.tokenizer)
    assert config.text_config.vocab_size % 8 == 0
    assert config.signal_token_index == processor.special_token_ids["signal_token_index"]


def test_unknown_preset_and_mismatched_queries(processor):
    with pytest.raises(ValueError, match="No preset"):
        load_preset("huge")
    with pytest.raises(ValueError, match="num_query_tokens"):
        config_for_processor("small", processor)
