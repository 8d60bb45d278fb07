import pytest
import torch

from instructcell.training.build import number_token_ids
from modeling_instructcell import InstructCellConfig, InstructCellForConditionalGeneration


def test_forward_shapes_and_loss_parts(model, tester):
    batch = tester.task_batch()
    out = model(**batch)
    config = tester.config
    assert out.logits.shape == (3, batch["labels"].shape[1], config.text_config.vocab_size)
    assert out.cell_embeds.shape == (2, config.num_query_tokens, config.text_config.d_model)
    assert out.signal_hidden_states.shape == (1, config.text_config.d_model)
    expected = out.lm_loss + config.vae_loss_weight * out.vae_loss * (1 / 3)
    torch.testing.assert_close(out.loss, expected)
    assert out.vae_reconstruction_loss > 0 and out.vae_kl_loss >= 0


def test_cell_embeddings_land_on_placeholders(model, tester):
    batch = tester.task_batch()
    merged, cell_embeds = model.merge_cell_embeddings(batch["input_ids"], batch["cell_values"])
    mask = batch["input_ids"] == tester.config.cell_token_index
    assert int(mask.sum()) == 2 * tester.config.num_query_tokens
    torch.testing.assert_close(merged[mask], cell_embeds.reshape(-1, cell_embeds.shape[-1]))
    text_only = model.get_input_embeddings()(batch["input_ids"])
    torch.testing.assert_close(merged[~mask], text_only[~mask])


def test_each_cell_carries_the_embedding_of_its_number_in_the_prompt(tester):
    numbers = number_token_ids(tester.processor, 2)
    assert tester.processor.tokenizer.decode(numbers[1]).strip() == "2"
    config = InstructCellConfig.from_dict({**tester.config.to_dict(), "cell_slot_token_ids": numbers})
    torch.manual_seed(0)
    model = InstructCellForConditionalGeneration(config).eval()
    counts = tester.make_counts(3)
    batch = tester.processor(
        text=["Which differs? cell 1: <CELL>, cell 2: <CELL>", "What is this cell? <CELL>"], cells=counts
    )
    mask = batch["input_ids"] == config.cell_token_index
    assert model.cell_slots(mask).tolist() == [0, 1, 0]
    merged, cell_embeds = model.merge_cell_embeddings(batch["input_ids"], batch["cell_values"])
    words = model.get_input_embeddings()(torch.tensor(numbers)).mean(1)  # "1", "2": one token each here
    slots = words[[0, 1, 0]].unsqueeze(1).expand_as(cell_embeds)
    torch.testing.assert_close(merged[mask], (cell_embeds + slots).reshape(-1, cell_embeds.shape[-1]))
    three = tester.processor(text="cell 1: <CELL>, cell 2: <CELL>, cell 3: <CELL>", cells=counts)
    with pytest.raises(ValueError, match="numbers at most 2"):
        model(**three)


def test_placeholder_cell_count_mismatch_raises(model, tester):
    batch = tester.task_batch()
    with pytest.raises(ValueError, match="placeholder tokens but 1 cells"):
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            cell_values=batch["cell_values"][:1],
        )
    with pytest.raises(ValueError, match="no `cell_values`"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])


def test_signal_target_mismatch_raises(model, tester):
    batch = tester.task_batch()
    batch["target_cell_values"] = torch.cat([batch["target_cell_values"]] * 2)
    with pytest.raises(ValueError, match="1 <SIGNAL> tokens but 2 target cells"):
        model(**batch)


def test_wrong_gene_count_raises(model, tester):
    batch = tester.task_batch()
    batch["cell_values"] = batch["cell_values"][:, :-1]
    with pytest.raises(ValueError, match="Align genes"):
        model(**batch)


def test_gradients_reach_every_cell_module(tester):
    model = tester.make_model().train()
    model(**tester.task_batch()).loss.backward()
    for prefix in [
        "cell_encoder.query_tokens",
        "cell_encoder.mlp",
        "cell_encoder.qformer",
        "language_projection",
        "cell_vae.condition_mapping",
        "cell_vae.z_encoder",
        "cell_vae.decoder",
        "cell_vae.px_r",
        "language_model",
    ]:
        grads = [p.grad for name, p in model.named_parameters() if name.startswith(prefix)]
        assert grads, prefix
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches {prefix}"


def test_overfits_a_few_examples_of_each_task(tester):
    torch.manual_seed(0)  # the initialization must not depend on what earlier tests drew
    model = tester.make_model().train()
    batch = tester.task_batch()
    model.cell_vae.set_library_prior(torch.cat([batch["cell_values"], batch["target_cell_values"]]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(**batch)
    for _ in range(300):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    last = model(**batch)
    assert last.lm_loss < 0.3 * first.lm_loss
    assert last.vae_loss < first.vae_loss
    model.eval()
    generated = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        cell_values=batch["cell_values"],
        max_new_tokens=30,
    )
    answers = tester.processor.post_process_generation(generated)
    assert answers[0]["text"] == "This is a T cell."
    assert answers[1]["text"] == "The cell is resistant."
    assert answers[2]["has_signal"] and not answers[0]["has_signal"]


def test_generate_cells_samples_integer_counts(model, tester):
    batch = tester.task_batch()
    # Force every request to answer <SIGNAL> at once: every other token is suppressed.
    vocab_size = model.get_output_embeddings().weight.shape[0]
    signal = tester.config.signal_token_index
    request = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        cell_values=batch["cell_values"],
        num_cells=5,
        seed=3,
        max_new_tokens=4,
        suppress_tokens=[i for i in range(vocab_size) if i != signal],
    )
    out = model.generate_cells(**request)
    assert out.has_signal.tolist() == [True, True, True]
    assert out.cell_values.shape == (15, tester.config.n_genes)
    assert out.cell_values.dtype == torch.long and bool((out.cell_values >= 0).all())
    assert out.request_index.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    again = model.generate_cells(**request)
    assert torch.equal(out.cell_values, again.cell_values)
    sized = model.generate_cells(**{**request, "num_cells": 2, "seed": 0, "library_size": 5000.0})
    assert sized.cell_values.shape == (6, tester.config.n_genes)


def test_generate_cells_without_signal_returns_no_cells(model, tester):
    batch = tester.task_batch()
    signal = tester.config.signal_token_index
    out = model.generate_cells(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        cell_values=batch["cell_values"],
        max_new_tokens=3,
        suppress_tokens=[signal],
    )
    assert not out.has_signal.any()
    assert out.cell_values.shape == (0, tester.config.n_genes)


def test_save_load_gives_identical_outputs(model, tester, tmp_path):
    batch = tester.task_batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = InstructCellForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        cell_values=batch["cell_values"],
        max_new_tokens=6,
    )
    assert torch.equal(reloaded.generate(**kwargs), model.generate(**kwargs))


def test_generation_config_is_respected_after_reload(model, tester, tmp_path):
    model.generation_config.max_new_tokens = 2
    model.generation_config.min_new_tokens = 2
    model.save_pretrained(tmp_path)
    reloaded = InstructCellForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = tester.task_batch()
    generated = reloaded.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], cell_values=batch["cell_values"]
    )
    assert generated.shape[1] == 1 + 2
    assert tester.config.signal_token_index in reloaded.generation_config.eos_token_id


def test_resize_token_embeddings_updates_config(model):
    new_size = model.config.text_config.vocab_size + 8
    model.resize_token_embeddings(new_size)
    assert model.get_input_embeddings().weight.shape[0] == new_size
    assert model.get_output_embeddings().weight.shape[0] == new_size
    assert model.config.text_config.vocab_size == new_size


def test_decoder_only_backbone_trains_and_generates(tester):
    processor = tester.processor
    processor.tokenizer.padding_side = "left"
    vocab = -(-len(processor.tokenizer) // 8) * 8
    config = InstructCellConfig(
        text_config={
            "model_type": "gpt2",
            "n_embd": 32,
            "n_layer": 1,
            "n_head": 2,
            "vocab_size": vocab,
            "n_positions": 128,
            "bos_token_id": 1,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
        qformer_config=tester.config.qformer_config.to_dict(),
        n_genes=tester.config.n_genes,
        num_query_tokens=4,
        num_kv_tokens=2,
        vae_n_latent=4,
        vae_n_hidden=16,
        vae_n_layers=1,
        vae_n_condition=4,
        vae_library_hidden=4,
        **processor.special_token_ids,
    )
    torch.manual_seed(0)
    model = InstructCellForConditionalGeneration(config)
    assert model.config.use_decoder_only_language_model
    batch = tester.task_batch()
    out = model(**batch)
    assert out.signal_hidden_states.shape == (1, 32)
    out.loss.backward()
    assert model.cell_encoder.query_tokens.grad.abs().sum() > 0
    model.eval()
    generated = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        cell_values=batch["cell_values"],
        max_new_tokens=3,
        min_new_tokens=3,
    )
    assert generated.shape == (3, 3)
    processor.tokenizer.padding_side = "right"
    right_padded = tester.task_batch()
    with pytest.raises(ValueError, match="left-padded"):
        model(**right_padded)


def test_bf16_keeps_cell_modules_in_fp32(model, tester, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = InstructCellForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert reloaded.language_model.shared.weight.dtype == torch.bfloat16
    assert reloaded.cell_encoder.qformer.layernorm.weight.dtype == torch.float32
    assert reloaded.cell_vae.px_r.dtype == torch.float32
    out = reloaded(**tester.task_batch())
    assert torch.isfinite(out.loss)


def test_alignment_loss_pulls_cells_to_their_label_text(tester):
    config = tester.config
    config.alignment_loss_weight = 1.0
    model = InstructCellForConditionalGeneration(config).train()
    counts = tester.make_counts(4, seed=1)
    counts[2:, :20] *= 20  # two kinds of cells
    batch = tester.processor(
        text="What cell type is this? {input}",
        cells=counts,
        text_target=["This is a T cell."] * 2 + ["This is a B cell."] * 2,
        cell_captions=["T cell", "T cell", "B cell", "B cell"],
    )
    assert batch["cell_caption_ids"].shape[0] == 4
    out = model(**batch)
    torch.testing.assert_close(out.loss, out.lm_loss + out.alignment_loss)
    out.loss.backward()
    assert model.cell_encoder.query_tokens.grad.abs().sum() > 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out.alignment_loss.item()
    for _ in range(30):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    assert model(**batch).alignment_loss.item() < 0.5 * first
    with pytest.raises(ValueError, match="one label per cell"):
        model.cell_caption_alignment_loss(out.cell_embeds, batch["cell_caption_ids"][:2])


def test_alignment_also_contrasts_signal_states_with_requested_labels(tester):
    tester.config.alignment_loss_weight = 1.0
    model = InstructCellForConditionalGeneration(tester.config).train()
    batch = tester.processor(
        text=["Generate a {cell_type} cell."] * 2,
        metadata=[{"cell_type": "T cell"}, {"cell_type": "B cell"}],
        text_target=["Here is the cell you asked for: <SIGNAL>"] * 2,
        target_cells=tester.make_counts(2),
        target_captions=["T cell", "B cell"],
    )
    out = model(**batch)
    assert out.alignment_loss is not None and out.alignment_loss > 0
    out.loss.backward()
    decoder_grads = [p.grad for n, p in model.named_parameters() if "decoder" in n and "language_model" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in decoder_grads)


def test_standardized_genes_use_saved_training_statistics(tester, tmp_path):
    from dataclasses import replace

    from modeling_instructcell.modeling_cell_encoder import normalize_counts

    torch.manual_seed(0)
    model = InstructCellForConditionalGeneration(replace(tester.config, standardize_genes=True)).eval()
    train = torch.tensor(tester.make_counts(50, seed=1), dtype=torch.float32)
    train[:, 5] = 0  # a gene that never varies keeps a scale of 1
    model.cell_encoder.set_gene_statistics(train)
    normalized = normalize_counts(train, model.config.target_sum, model.config.log1p)
    torch.testing.assert_close(model.cell_encoder.gene_mean, normalized.mean(0).double().to(torch.float32))
    assert model.cell_encoder.gene_std[5] == 1.0
    cells = torch.tensor(tester.make_counts(4, seed=2), dtype=torch.float32)
    expected_input = (
        normalize_counts(cells, 1e4, True) - model.cell_encoder.gene_mean
    ) / model.cell_encoder.gene_std
    expected = model.cell_encoder.mlp(expected_input.clamp(-10, 10))
    torch.testing.assert_close(model.cell_encoder.get_kv_tokens(cells).flatten(1), expected)
    model.save_pretrained(tmp_path)
    reloaded = InstructCellForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded.cell_encoder.gene_std, model.cell_encoder.gene_std, rtol=0, atol=0)
    plain = tester.make_model()
    with pytest.raises(ValueError, match="standardize_genes=False"):
        plain.cell_encoder.set_gene_statistics(train)
    with pytest.raises(ValueError, match="at least 2 cells"):
        model.cell_encoder.set_gene_statistics(train[:1])
