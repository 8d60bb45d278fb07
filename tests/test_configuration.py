import pytest
from instructcell.configuration import load_preset, load_recipe, recipe_names

from instructcell.training import config_for_processor, parse_training_arguments
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


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_shipped_recipe_parses(recipe):
    overrides = {"output_dir": "unused"}
    if load_recipe(recipe).get("bf16"):  # a GPU recipe: the Trainer refuses bf16 on a CPU-only machine
        overrides["bf16"] = False
    model_args, data_args, training_args, sections = parse_training_arguments(recipe, overrides)
    assert model_args.preset in ("small", "base") and data_args.variant in ("instruct", "chat")
    assert all(isinstance(section, dict) for section in sections.values())


def test_recipes_extend_and_flags_override(tmp_path):
    _, _, training_args, _ = parse_training_arguments("demo", ["--max_steps", "7"])
    assert (
        training_args.max_steps == 7
        and training_args.learning_rate == load_recipe("default")["learning_rate"]
    )
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: small-chat\nlearning_rate: 0.0005\n")
    model_args, data_args, training_args, _ = parse_training_arguments(mine)
    assert (data_args.variant, training_args.learning_rate, model_args.alignment_loss_weight) == (
        "chat",
        5e-4,
        1.0,
    )


def test_misspelled_or_unknown_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown training argument\(s\) \['learning_rat'\]"):
        parse_training_arguments("default", {"learning_rat": 0.1})
    typo = tmp_path / "typo.yaml"
    typo.write_text("extends: default\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_training_arguments(typo)
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ValueError, match="extends itself"):
        load_recipe(loop)
    with pytest.raises(ValueError, match="No recipe 'nope'.*default"):
        load_recipe("nope")
