"""Training: build a processor and model, fine-tune them with the Hugging Face Trainer, fit the cell decoder.

- :mod:`.arguments`: the run's arguments and the recipe that fills them (:func:`parse_training_arguments`).
- :mod:`.build`: processor (gene vocabulary + tokenizer) and model (preset, backbone, LoRA).
- :mod:`.trainer`: the Trainer with its loss parts, wall-clock cap and checkpoint-on-interrupt callbacks.
- :mod:`.cell_decoder`: the second stage that fits the cell VAE on frozen ``<SIGNAL>`` states.
- :mod:`.processes`: several processes (DDP): the launch check and the decisions they take together.
- :mod:`.run`: one training run from a built dataset folder (:func:`run_training`), resumable.
"""

from .arguments import (
    DEFAULT_RECIPE,
    DataArguments,
    InstructCellTrainingArguments,
    ModelArguments,
    parse_training_arguments,
)
from .build import build_model, build_processor, config_for_processor
from .run import budget_report, run_training, training_budget
from .tokenization import train_instruction_tokenizer

__all__ = [
    "DEFAULT_RECIPE",
    "DataArguments",
    "InstructCellTrainingArguments",
    "ModelArguments",
    "budget_report",
    "build_model",
    "build_processor",
    "config_for_processor",
    "parse_training_arguments",
    "run_training",
    "train_instruction_tokenizer",
    "training_budget",
]
