"""``instructcell train [RECIPE] [--flag value ...]``: train (or resume) and save the model in the Hub layout.

``RECIPE`` is a shipped recipe name (``default`` when omitted; ``demo``, ``small-instruct``, ``paper``...) or
a YAML file; flags after it override its values (``--max_steps 500``; ``--help`` lists them). Launch with
``accelerate launch -m instructcell train ...`` for several processes. Rerunning the same command resumes
from the last checkpoint in ``--output_dir``; Ctrl-C writes one first. The final model is saved to
``<output_dir>/final``.
"""

from __future__ import annotations

import argparse
import logging
from typing import TextIO

from instructcell.configuration import recipe_names
from instructcell.training import DEFAULT_RECIPE, parse_training_arguments, run_training, training_budget
from instructcell.training.arguments import argument_parser


def add_parsers(subparsers) -> None:
    """Register ``train``; its flags are the training arguments, parsed by :func:`parse_training_arguments`."""
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("modeling_instructcell").setLevel(logging.WARNING)  # per-batch gene alignment notes
    recipe, flags = split_recipe(args.arguments)
    model_args, data_args, training_args, _ = parse_training_arguments(recipe, flags)
    trainer, processor, interrupted = run_training(model_args, data_args, training_args)
    if interrupted:
        print(f"Interrupted: rerun the same command to resume from {training_args.output_dir}.", file=out)
        return 130
    budget = training_budget(trainer)
    if budget["stopped_by_time_cap"]:
        print(
            f"Stopped by the wall-clock cap at step {budget['steps']} of {budget['planned_steps']}: rerun the "
            "same command to train the rest; no final model was saved.",
            file=out,
        )
        return 3
    if trainer.is_world_process_zero():
        model = trainer.model.merge_and_unload() if model_args.use_lora else trainer.model
        final = save_for_hub(model, processor, f"{training_args.output_dir}/final")
        print(f"Trained {budget['steps']} of {budget['planned_steps']} planned steps.", file=out)
        print(f"Saved the model (Hub layout) to {final}", file=out)
    return 0
