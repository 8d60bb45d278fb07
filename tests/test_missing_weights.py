"""A checkpoint that lacks some of the model's weights is refused unless the caller asks for random ones."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from modeling_instructcell import InstructCellForConditionalGeneration


def _save_without(model, folder, prefix: str) -> None:
    model.save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    kept = {name: value for name, value in weights.items() if not name.startswith(prefix)}
    assert len(kept) < len(weights)
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("prefix", ["cell_vae.", "cell_encoder."])
@pytest.mark.parametrize("loader", [InstructCellForConditionalGeneration, AutoModel])
def test_missing_cell_weights_are_an_error(model, tmp_path, prefix, loader):
    _save_without(model, tmp_path, prefix)
    with pytest.raises(ValueError, match=rf"lacks \d+ weights .*\({prefix}.*allow_missing_weights=True"):
        loader.from_pretrained(tmp_path)


def test_missing_weights_start_random_when_asked(model, tmp_path):
    _save_without(model, tmp_path, "cell_vae.")
    loaded, info = InstructCellForConditionalGeneration.from_pretrained(
        tmp_path, allow_missing_weights=True, output_loading_info=True
    )
    assert info["missing_keys"] and all(key.startswith("cell_vae.") for key in info["missing_keys"])
    original = model.state_dict()
    for name, value in loaded.state_dict().items():
        if not name.startswith("cell_vae."):
            torch.testing.assert_close(value, original[name], rtol=0, atol=0, msg=name)


def test_a_complete_checkpoint_loads_with_or_without_loading_info(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert isinstance(InstructCellForConditionalGeneration.from_pretrained(tmp_path), type(model))
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and isinstance(loaded, type(model))
