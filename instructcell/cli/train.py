"""``instructcell train [RECIPE] [--flag value ...]``: train (or resume) and save the model in the Hub layout.

``RECIPE`` is a shipped recipe name (``default`` when omitted; ``demo``, ``small-instruct``, ``paper``...) or
a YAML file; flags after it override its values (``--max_steps 500``; ``--help`` lists them). For several
processes, launch it with ``accelerate launch --config_file configuration/accelerate/multi_gpu_ddp.yaml -m
instructcell train ...`` (GPUs) or ``accelerate launch --config_file configuration/accelerate/multi_cpu.yaml
-m instructcell train ... --use_cpu true`` (CPU); docs/scaling.md. Rerunning the same command resumes from
the last checkpoint in ``--output_dir``; Ctrl-C writes one first. It prints the steps trained against the
steps planned; the final model is saved to ``<output_dir>/final``. Exit status 3: the wall-clock cap
(``--max_train_minutes``) stopped training before the planned steps (rerun to train the rest); 130:
interrupted.
"""

from __future__ import annotations

import argparse
import logging
from typing import TextIO

from instructcell.configuration import recipe_names
from instructcell.training import (
    DEFAULT_RECIPE,
    budget_report,
    parse_training_arguments,
    run_training,
    training_budget,
)
from instructcell.training.arguments import argument_parser


def add_parsers(subparsers) -> None:
    """Register ``train``; its flags are the training arguments (:func:`parse_training_arguments`)."""
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a model on a built dataset",
        add_help=False,
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="[RECIPE] [--flag value ...]")
    parser.set_defaults(run=run, pass_through=True)


def split_recipe(arguments: list[str]) -> tuple[str, list[str]]:
    """``["demo", "--max_steps", "5"]`` -> ``("demo", ["--max_steps", "5"])``; the default recipe if none."""
    if arguments and not arguments[0].startswith("-"):
        return arguments[0], arguments[1:]
    return DEFAULT_RECIPE, arguments


def run(args, stdin: TextIO, out: TextIO) -> int:
    """Parse the recipe and flags, train (or resume) and save the final model."""
    from instructcell.hub import save_for_hub

    if any(flag in ("-h", "--help") for flag in args.arguments):
        print(__doc__, file=out)
        print(f"Shipped recipes: {', '.join(recipe_names())}\n", file=out)
        argument_parser().print_help(out)
        return 0
    recipe, flags = split_recipe(args.arguments)
    model_args, data_args, training_args, _ = parse_training_arguments(recipe, flags)
    main_process = training_args.process_index == 0
    logging.basicConfig(
        level=logging.INFO if training_args.should_log else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("modeling_instructcell").setLevel(logging.WARNING)  # per-batch gene alignment notes
    trainer, processor, interrupted = run_training(model_args, data_args, training_args)
    if interrupted:
        if main_process:
            print(f"Interrupted: rerun the same command to resume from {training_args.output_dir}.", file=out)
        return 130
    budget = training_budget(trainer)
    if main_process:
        print(budget_report(budget, training_args), file=out)
    if budget["stopped_by_time_cap"]:
        if main_process:
            print("No final model was saved.", file=out)
        return 3
    if main_process:
        model = trainer.model.merge_and_unload() if model_args.use_lora else trainer.model
        final = save_for_hub(model, processor, f"{training_args.output_dir}/final")
        print(f"Saved the model (Hub layout) to {final}", file=out)
    return 0
