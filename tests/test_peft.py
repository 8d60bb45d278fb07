"""LoRA on the backbone with peft; the cell modules are trained in full (modules_to_save)."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model


@pytest.mark.parametrize("task_type", [None, "SEQ_2_SEQ_LM"])
def test_lora_trains_saves_and_reloads(tester, tmp_path, task_type):
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*language_model.*\.(q|v)",
        task_type=task_type,
        modules_to_save=["cell_encoder", "language_projection", "cell_vae"],
    )
    model = get_peft_model(tester.make_model().train(), lora)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable)
    assert not any("language_model" in name and "lora" not in name for name in trainable)
    assert any("cell_encoder" in name for name in trainable) and any("cell_vae" in name for name in trainable)

    batch = tester.task_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    first = model(**batch).lm_loss.item()
    for _ in range(40):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    assert model(**batch).lm_loss.item() < first

    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tester.make_model(), tmp_path).eval()
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        cell_values=batch["cell_values"],
        max_new_tokens=5,
    )
    assert torch.equal(reloaded.generate(**kwargs), model.generate(**kwargs))
