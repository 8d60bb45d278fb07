"""What training spends: per-module gradient norms and their plot, and the time of every optimizer step.

``benchmarks/learning_curve.py`` shows, for each recipe, how much of the update reaches the cell pathway
(cell MLP, Q-Former, query tokens) compared with the language model; ``benchmarks/run_benchmarks.py`` and
``benchmarks/training_scaling.py`` time the steps (:class:`StepTimer`).
"""

import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from torch import nn
from transformers import TrainerCallback

# Parameter-name patterns (searched in order; the first match names the group) of InstructCell's modules.
MODULE_GROUPS: tuple[tuple[str, str], ...] = (
    ("query tokens", r"cell_encoder\.query_tokens"),
    ("cell MLP", r"cell_encoder\.mlp\."),
    ("Q-Former", r"cell_encoder\.qformer\."),
    ("projection", r"language_projection\."),
    ("cell VAE", r"cell_vae\."),
    ("token embeddings", r"language_model\.(shared|.*embed_tokens|lm_head)"),
    ("LM encoder", r"language_model\.encoder\."),
    ("LM decoder", r"language_model\.decoder\."),
)


def module_group(parameter_name: str) -> str | None:
    """Return the :data:`MODULE_GROUPS` name of a parameter, or None when no pattern matches."""
    for group, pattern in MODULE_GROUPS:
        if re.search(pattern, parameter_name):
            return group
    return None


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the current gradients per module group (parameters without a gradient are skipped)."""
    squares: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        group = module_group(name)
        if group is None or parameter.grad is None:
            continue
        squares[group] = squares.get(group, 0.0) + float(parameter.grad.detach().float().pow(2).sum())
    return {group: math.sqrt(value) for group, value in squares.items()}


class GradientNormRecorder(TrainerCallback):
    """Record :func:`gradient_norms` every ``every`` optimizer steps.

    Norms are taken after clipping to ``max_grad_norm``: clipping scales every group alike, so the groups'
    ratios are those of the raw gradient.

    ``records`` holds one dict per recorded step: ``{"step": int, <group>: norm, ...}``.
    """

    def __init__(self, every: int = 10):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}.")
        self.every = every
        self.records: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        """Record the norms of the gradients about to be applied."""
        step = state.global_step + 1  # the step this update completes
        if model is not None and (step == 1 or step % self.every == 0):
            self.records.append({"step": step, **gradient_norms(model)})
        return control


def plot_gradient_norms(
    curves: Mapping[str, Sequence[Mapping[str, float]]], path: Path, title: str = ""
) -> None:
    """One panel per recipe: gradient norm of each module group against the optimizer step (log scale)."""
    figure, axes = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.6), squeeze=False, sharey=True)
    for axis, (recipe, records) in zip(axes[0], curves.items(), strict=True):
        steps = [r["step"] for r in records]
        for group, _ in MODULE_GROUPS:
            values = [r.get(group, float("nan")) for r in records]
            if any(v == v and v > 0 for v in values):
                axis.plot(steps, values, label=group, linewidth=1.2)
        axis.set(title=f"{title} {recipe}".strip(), xlabel="optimizer step", yscale="log")
    axes[0][0].set_ylabel("gradient L2 norm (after clipping)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


class StepTimer(TrainerCallback):
    """Wall-clock and CPU time (``time.perf_counter`` / ``time.process_time``) at the end of every step.

    ``begin`` is the wall time at the start of training; ``step_ends`` and ``cpu_ends`` have one entry per
    optimizer step of this process. CPU time over wall time between two entries is the share of a core
    the process got (above 1 with several threads).
    """

    def __init__(self) -> None:
        self.begin = 0.0
        self.step_ends: list[float] = []
        self.cpu_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock."""
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        """Record the step's end."""
        self.step_ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
