"""A model folder in the Hub layout (weights, processor, remote code): writing it, reading its processor."""

import os
from pathlib import Path

from modeling_instructcell import (
    InstructCellConfig,
    InstructCellFeatureExtractor,
    InstructCellForConditionalGeneration,
    InstructCellPipeline,
    InstructCellProcessor,
)
from modeling_instructcell.pipeline_instructcell import TASK, _register

_MODEL_REFERENCE = "modeling_instructcell.InstructCellForConditionalGeneration"


def register_remote_code() -> None:
    """Mark the classes so that ``save_pretrained`` writes ``auto_map`` and copies their source files."""
    InstructCellConfig.register_for_auto_class("AutoConfig")
    InstructCellForConditionalGeneration.register_for_auto_class("AutoModel")
    InstructCellFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
    InstructCellProcessor.register_for_auto_class("AutoProcessor")


def save_for_hub(
    model: InstructCellForConditionalGeneration, processor: InstructCellProcessor, directory: str | Path
) -> Path:
    """Save ``model`` and ``processor`` into one folder loadable with ``trust_remote_code=True``.

    ``AutoConfig``, ``AutoModel``, ``AutoModelForSeq2SeqLM`` and ``AutoProcessor`` then load it in a
    process that cannot import this package, and so does
    ``pipeline(model=directory, trust_remote_code=True)``: the ``single-cell-instruction`` pipeline is
    registered and saved (``custom_pipelines`` in config.json, ``pipeline_instructcell.py`` copied). Push the
    folder with ``huggingface_hub.upload_folder`` or ``model.push_to_hub`` + ``processor.push_to_hub``.

    Parameters
    ----------
    model : InstructCellForConditionalGeneration
    processor : InstructCellProcessor
    directory : str or Path
        Created if missing.

    Returns
    -------
    Path
        The folder.
    """
    register_remote_code()
    directory = Path(directory)
    # register_for_auto_class records one auto class per class; the seq2seq entry is added by hand.
    auto_map = dict(getattr(model.config, "auto_map", None) or {})
    auto_map["AutoModelForSeq2SeqLM"] = _MODEL_REFERENCE
    model.config.auto_map = auto_map
    _register()
    pipe = InstructCellPipeline(model=model, processor=processor, task=TASK, device=model.device)
    # Pipeline.save_pretrained writes custom_pipelines + the pipeline file, then saves the model;
    # it does not save the processor (STYLE c9), hence the explicit processor.save_pretrained.
    pipe.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def check_processor_files(folder: Path) -> None:
    """Raise a ``ValueError`` that says what to do if ``folder`` has no ``preprocessor_config.json``."""
    if not (folder / "preprocessor_config.json").is_file():
        raise ValueError(
            f"{folder} has no processor (preprocessor_config.json with the gene vocabulary, and the "
            "tokenizer files): pass the folder `instructcell train` saved (<output_dir>/final), or save "
            "the processor next to the model with `processor.save_pretrained(folder)`."
        )


def load_processor(model: str | os.PathLike) -> InstructCellProcessor:
    """Load the processor (gene vocabulary + tokenizer) saved with a model folder, or raise a clear error.

    Parameters
    ----------
    model : str or PathLike
        A folder written by :func:`save_for_hub` (``instructcell train``'s ``<output_dir>/final``).

    Raises
    ------
    ValueError
        The folder does not exist, or it has no processor files (a bare ``model.save_pretrained`` folder or
        a training checkpoint).
    """
    folder = Path(model)
    if not folder.is_dir():
        raise ValueError(
            f"No model folder {folder}: pass a folder written by `instructcell train` (<output_dir>/final)."
        )
    check_processor_files(folder)
    try:
        return InstructCellProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"The processor of {folder} does not load ({err}): save it again with "
            "`processor.save_pretrained`."
        ) from err
