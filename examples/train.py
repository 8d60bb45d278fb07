"""Fine-tune InstructCell on the builder's dataset with the HF Trainer.

    python examples/train.py --dataset_dir outputs/instructcell-data --output_dir outputs/small-instruct
    accelerate launch --config_file configuration/accelerate/single_cpu.yaml examples/train.py \
        configuration/train/small-instruct.yaml

Arguments come from the command line, or from a YAML recipe (``configuration/train/*.yaml``) given first and
overridden by any flags after it (``examples/train.py recipe.yaml --max_train_minutes 10``); see ``--help``.
Rerunning the same command resumes from the last checkpoint in ``--output_dir`` (Ctrl-C writes one first).
The final model (the best by validation loss with ``--load_best_model_at_end``) is saved in the Hub layout to
``<output_dir>/final``.
"""

import logging
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from instructcell.hub import save_for_hub
from instructcell.training import DataArguments, InstructCellTrainingArguments, ModelArguments, run_training


def recipe_flags(path: Path) -> list[str]:
    """Turn a YAML recipe of scalar arguments into command-line flags (``key: value`` -> ``--key value``)."""
    recipe = yaml.safe_load(path.read_text()) or {}
    unsupported = [key for key, value in recipe.items() if value is None or isinstance(value, (dict, list))]
    if unsupported:
        raise ValueError(
            f"{path}: {unsupported} are not scalar `key: value` training arguments "
            "(omit a key to keep its default)."
        )
    return [item for key, value in recipe.items() for item in (f"--{key}", str(value))]


def main() -> None:
    """Parse the recipe and flags, train (or resume) and save the model in the Hub layout."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("modeling_instructcell").setLevel(logging.WARNING)  # per-batch gene alignment notes
    parser = HfArgumentParser((ModelArguments, DataArguments, InstructCellTrainingArguments))
    argv = sys.argv[1:]
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = recipe_flags(Path(argv[0])) + argv[1:]  # later flags win
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    trainer, processor, interrupted = run_training(model_args, data_args, training_args)
    if interrupted:
        print(
            "Interrupted: rerun the same command to resume from the checkpoint in "
            f"{training_args.output_dir}."
        )
        return
    if trainer.is_world_process_zero():
        model = trainer.model
        if model_args.use_lora:
            model = model.merge_and_unload()
        final = save_for_hub(model, processor, f"{training_args.output_dir}/final")
        print(f"Saved the model (Hub layout) to {final}")


if __name__ == "__main__":
    main()
