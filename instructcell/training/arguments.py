"""Arguments of a training run (with ``help`` metadata, as peft's configs) and the recipe that fills them.

A run's values come from a recipe (``configuration/recipes/*.yaml``, read by
:func:`instructcell.configuration.load_recipe`) overridden by flags or keyword arguments:
:func:`parse_training_arguments` is the one place that turns them into the three dataclasses.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from instructcell.configuration import load_recipe

DEFAULT_RECIPE = "default"


@dataclass
class ModelArguments:
    """Which model to build."""

    preset: str = field(default="small", metadata={"help": "Preset name (tiny, small, base) or JSON path."})
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Fine-tune a saved model folder: keep its weights, gene vocabulary, tokenizer and cell "
            "decoder (preset, backbone and tokenizer do not apply). Build the data with `instructcell "
            "build-data --gene-vocab-from` this folder."
        },
    )
    backbone: str | None = field(
        default=None,
        metadata={
            "help": "Start the language model from pretrained weights, e.g. google-t5/t5-base "
            "(its tokenizer is used too). Default: random weights of the preset's size."
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer name or path. Default: the backbone's, or one trained offline on the "
            "training instructions."
        },
    )
    tokenizer_vocab_size: int = field(default=2000, metadata={"help": "Vocabulary of the offline tokenizer."})
    alignment_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the cell-label contrastive loss (0 = the paper's objective)."},
    )
    standardize_genes: bool = field(
        default=False,
        metadata={"help": "Center and scale each gene by training-cell statistics before the cell MLP."},
    )
    cell_slots: int = field(
        default=0,
        metadata={
            "help": "Add the embedding of the word '1', '2', ... to a prompt's first, second, ... cell, for "
            "this many cells (the most a prompt may hold; 16 for the multi-cell tasks). 0: none, the "
            "paper's model."
        },
    )
    vae_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the ELBO relative to the text loss."}
    )
    vae_kl_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of KL(q(z|x) || p(z)) in the ELBO (default: the preset's, 3.0 as the original)."
        },
    )
    use_lora: bool = field(
        default=False, metadata={"help": "LoRA on the backbone's q/v; cell modules in full."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})


@dataclass
class DataArguments:
    """Which examples to train on."""

    dataset_dir: str = field(
        default="outputs/instructcell-data",
        metadata={
            "help": "A folder written by `instructcell build-data` (splits as Parquet, gene_vocab.txt)."
        },
    )
    tasks: str = field(default="cta,dsp,cpcg", metadata={"help": "Comma-separated tasks to mix."})
    variant: str = field(default="instruct", metadata={"help": "instruct (answer only) or chat."})
    datasets: str | None = field(
        default=None, metadata={"help": "Comma-separated dataset names to keep (default: all)."}
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Cap on training rows."})
    max_eval_examples: int | None = field(default=512, metadata={"help": "Cap on validation rows."})


@dataclass
class InstructCellTrainingArguments(Seq2SeqTrainingArguments):
    """Seq2SeqTrainingArguments plus InstructCell's options: a wall-clock cap and the cell-decoder stage.

    The values of a training run come from a recipe (:func:`parse_training_arguments`; ``default`` unless
    another is named); the defaults here are the Trainer's.
    """

    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads the text and sparse columns."}
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Wall-clock cap. With max_steps it is only a safety cap: training stops there, says so "
            "and keeps a resumable checkpoint. Without max_steps it is the budget (learning curves)."
        },
    )
    anneal_to_time_limit: bool = field(
        default=False,
        metadata={
            "help": "Without max_steps, with max_train_minutes: run the lr schedule (linear or cosine, after "
            "the warmup steps) over the wall-clock budget, so the lr reaches 0 when the time is up."
        },
    )
    cell_modules_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak lr of the modules InstructCell adds to the language model (cell encoder, "
            "language projection, cell VAE); default: learning_rate for all, as the paper."
        },
    )
    restore_callback_states_from_checkpoint: bool = field(
        default=True, metadata={"help": "Resume the wall-clock budget where the checkpoint left it."}
    )
    cell_decoder_steps: int = field(
        default=0,
        metadata={
            "help": "Steps of a second stage that fits the cell VAE on frozen <SIGNAL> states "
            "(instructcell/training/cell_decoder.py); 0 skips it (the paper's joint training only)."
        },
    )
    cell_decoder_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW lr of that stage."})
    cell_decoder_batch_size: int = field(default=64, metadata={"help": "Batch size of that stage."})


def argument_parser() -> HfArgumentParser:
    """Parser of the three dataclasses; abbreviated flags are refused (``--learning_rat`` is an error)."""
    return HfArgumentParser(
        (ModelArguments, DataArguments, InstructCellTrainingArguments),
        prog="instructcell train",
        allow_abbrev=False,
    )


def _flags(values: Mapping[str, Any]) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def parse_training_arguments(
    recipe: str | os.PathLike | None = DEFAULT_RECIPE,
    overrides: Mapping[str, Any] | Sequence[str] = (),
) -> tuple[ModelArguments, DataArguments, "InstructCellTrainingArguments", dict[str, dict]]:
    """Turn a recipe plus overrides into the run's arguments.

    Parameters
    ----------
    recipe : str or PathLike, optional
        A shipped recipe name (``default``, ``demo``, ``paper``...) or a YAML path; None starts from the
        dataclass defaults.
    overrides : mapping or sequence of str
        ``{"max_steps": 100}`` or command-line flags (``["--max_steps", "100"]``); they win over the recipe.

    Returns
    -------
    model_args, data_args, training_args
        The three dataclasses.
    sections : dict
        The recipe's non-argument sections (e.g. ``demo``).

    Raises
    ------
    ValueError
        An unknown or misspelled argument in the recipe or the overrides (nothing is matched by prefix).
    """
    values = load_recipe(recipe) if recipe is not None else {}
    sections = {key: value for key, value in values.items() if isinstance(value, dict)}
    arguments = {key: value for key, value in values.items() if key not in sections}
    unsupported = [key for key, value in arguments.items() if value is None or isinstance(value, list)]
    if unsupported:
        raise ValueError(
            f"Recipe {recipe!s}: {unsupported} are not scalar `key: value` arguments (omit a key to keep "
            "its default)."
        )
    flags = _flags(arguments) + (_flags(overrides) if isinstance(overrides, Mapping) else list(overrides))
    parser = argument_parser()
    known = {action.dest for action in parser._actions}
    given = [flag[2:].split("=", 1)[0] for flag in flags if flag.startswith("--")]
    unknown = sorted({name for name in given if name not in known and name.replace("-", "_") not in known})
    if unknown:
        raise ValueError(
            f"Unknown training argument(s) {unknown} (recipe {recipe!s} or flags); see "
            "`instructcell train --help` for the names."
        )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=flags)
    return model_args, data_args, training_args, sections
