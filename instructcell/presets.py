"""Model presets (``configuration/presets/*.json``) turned into an ``InstructCellConfig`` for a processor."""

import json
from pathlib import Path
from typing import Any

from modeling_instructcell import InstructCellConfig, InstructCellProcessor

PRESET_DIR = Path(__file__).resolve().parents[1] / "configuration" / "presets"


def load_preset(preset: str | Path) -> dict[str, Any]:
    """Read a preset by name (``tiny``, ``small``, ``base``) or path; keys starting with ``_`` are notes."""
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.json"
    if not path.is_file():
        available = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise ValueError(f"No preset {str(preset)!r}; use one of {available} or a path to a JSON file.")
    return {key: value for key, value in json.loads(path.read_text()).items() if not key.startswith("_")}


def config_for_processor(
    preset: str | Path, processor: InstructCellProcessor, **overrides: Any
) -> InstructCellConfig:
    """Build the model config of a preset that matches ``processor``.

    The gene count, special-token ids, placeholder count and the vocabulary size (the tokenizer's
    length rounded up to a multiple of 8) come from the processor, so model and processor agree.

    Parameters
    ----------
    preset : str or Path
        Preset name or JSON path.
    processor : InstructCellProcessor
        The processor the model will be used with.
    **overrides
        Config fields that replace the preset's.

    Returns
    -------
    InstructCellConfig
    """
    kwargs = {**load_preset(preset), **overrides}
    num_query_tokens = kwargs.pop("num_query_tokens", processor.num_query_tokens)
    if num_query_tokens != processor.num_query_tokens:
        raise ValueError(
            f"The preset uses num_query_tokens={num_query_tokens} but the processor expands cells into "
            f"{processor.num_query_tokens}; build the processor with num_query_tokens={num_query_tokens}."
        )
    vocab_size = -(-len(processor.tokenizer) // 8) * 8
    text_config = {**kwargs.pop("text_config", {}), "vocab_size": vocab_size}
    text_config.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    text_config.setdefault("eos_token_id", processor.tokenizer.eos_token_id)
    return InstructCellConfig(
        text_config=text_config,
        n_genes=processor.feature_extractor.vocab_size,
        num_query_tokens=processor.num_query_tokens,
        **processor.special_token_ids,
        **kwargs,
    )
