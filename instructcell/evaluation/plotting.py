"""Figures of the evaluation reports (matplotlib, Agg): confusion matrices, UMAPs, dot plots, heatmaps.

Every function takes plain data (no model, no result type), writes one PNG to ``path`` and closes its figure.
The metric-family evaluators and the report sections of :mod:`instructcell.evaluation` call them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "plot_confusion",
    "plot_count_distributions",
    "plot_marker_dotplot",
    "plot_perturbation_means",
    "plot_robustness",
    "plot_saliency_heatmap",
    "plot_umap",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label_colors(plt, labels: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def plot_confusion(
    path: Path,
    title: str,
    references: Sequence[str],
    labels: Sequence[str],
    panels: Mapping[str, Sequence[str | None]],
) -> None:
    """Confusion matrices of several methods on the same cells, side by side.

    Rows are true labels, columns predicted ones; cells show counts, shaded by the fraction of the row.
    Unanswered predictions (None / outside the label set) are left out of the matrix but count as wrong in
    the accuracy of the panel's title.

    Parameters
    ----------
    path : Path
        PNG to write.
    title : str
        Figure title.
    references : sequence of str
        ``(n_cells,)`` true labels.
    labels : sequence of str
        The label set, in axis order.
    panels : mapping of str to sequence
        Panel title (a method) -> its ``(n_cells,)`` predictions.
    """
    plt = _pyplot()
    from sklearn.metrics import confusion_matrix

    labels = list(labels)
    size = max(4.0, 0.45 * len(labels) + 2.5)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(len(panels) * size + 1, size), constrained_layout=True, squeeze=False
    )
    for ax, (panel, preds) in zip(axes[0], panels.items(), strict=True):
        pairs = [(r, p) for r, p in zip(references, preds, strict=True) if p in labels]
        if pairs:
            matrix = confusion_matrix([r for r, _ in pairs], [p for _, p in pairs], labels=labels)
        else:  # nothing answered (e.g. greedy answers naming no label): an empty matrix
            matrix = np.zeros((len(labels), len(labels)), dtype=int)
        totals = matrix.sum(axis=1, keepdims=True)
        fractions = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=float), where=totals > 0)
        ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        str(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if fractions[i, j] > 0.5 else "black",
                    )
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        accuracy = np.mean([r == p for r, p in zip(references, preds, strict=True)])
        ax.set_title(f"{panel}: accuracy {accuracy:.3f}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_umap(path: Path, title: str, panels: Mapping[str, tuple[np.ndarray, Sequence[str]]]) -> None:
    """Cell sets in the real cells' UMAP, one panel each, coloured by label over the real cells in grey.

    Parameters
    ----------
    path : Path
        PNG to write.
    title : str
        Figure title.
    panels : mapping of str to (numpy.ndarray, sequence of str)
        Panel title -> ``(n, 2)`` coordinates and ``(n,)`` labels; the first panel holds the real cells
        (UMAP fitted on them, the others mapped in with ``transform``).
    """
    plt = _pyplot()
    panels = {name: (xy, np.asarray(labels).astype(str)) for name, (xy, labels) in panels.items()}
    labels = sorted(set().union(*(set(point_labels) for _, point_labels in panels.values())))
    colors = _label_colors(plt, labels)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(5 * len(panels), 5),
        sharex=True,
        sharey=True,
        constrained_layout=True,
        squeeze=False,
    )
    real_xy = next(iter(panels.values()))[0]
    for ax, (panel, (xy, point_labels)) in zip(axes[0], panels.items(), strict=True):
        ax.scatter(real_xy[:, 0], real_xy[:, 1], s=6, c="lightgrey", linewidths=0)
        for label in labels:
            mask = point_labels == label
            if mask.any():
                ax.scatter(xy[mask, 0], xy[mask, 1], s=8, color=colors[label], label=label, linewidths=0)
        ax.set_title(f"{panel} (n={len(xy)})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_ylabel("UMAP 2 (fitted on real test cells)")
    axes[0][len(panels) // 2].set_xlabel("UMAP 1")
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[label], label=label) for label in labels]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_marker_dotplot(path: Path, stats: pd.DataFrame, title: str) -> None:
    """Dot plot of marker genes: each label's real and generated cells over all labels' markers.

    Parameters
    ----------
    path : Path
        PNG to write.
    stats : pandas.DataFrame
        One row per (``group_label``, ``source``, ``gene``) with ``marker_of`` (the label whose marker the
        gene is), ``fraction`` (fraction of the group's cells with a positive count, the dot size) and
        ``mean`` (mean log-normalized expression, the colour). ``source`` is ``"real"`` or ``"generated"``.
        Row order of the plot follows the first appearance of ``group_label``; columns follow the first
        appearance of (``marker_of``, ``gene``).
    title : str
        Figure title.
    """
    plt = _pyplot()
    required = {"group_label", "source", "gene", "marker_of", "fraction", "mean"}
    missing = sorted(required - set(stats.columns))
    if missing:
        raise ValueError(f"Dot-plot statistics lack the columns {missing}.")
    if stats.empty:
        raise ValueError("No dot-plot statistics to plot (no label had marker genes).")
    columns = list(dict.fromkeys(zip(stats["marker_of"], stats["gene"], strict=True)))
    groups = list(dict.fromkeys(stats["group_label"]))
    sources = [s for s in ("real", "generated") if s in set(stats["source"])]
    rows = [(g, s) for g in groups for s in sources]
    col_index = {key: i for i, key in enumerate(columns)}
    row_index = {key: i for i, key in enumerate(rows)}
    x = [col_index[(m, g)] for m, g in zip(stats["marker_of"], stats["gene"], strict=True)]
    y = [row_index[(g, s)] for g, s in zip(stats["group_label"], stats["source"], strict=True)]
    fig, ax = plt.subplots(
        figsize=(max(6.0, 0.32 * len(columns) + 4.0), max(3.5, 0.3 * len(rows) + 1.8)),
        constrained_layout=True,
    )
    dots = ax.scatter(
        x,
        y,
        s=12 + 220 * stats["fraction"].to_numpy(dtype=float),
        c=stats["mean"].to_numpy(dtype=float),
        cmap="Reds",
        vmin=0,
        edgecolors="grey",
        linewidths=0.3,
    )
    ax.set_xticks(range(len(columns)), [g for _, g in columns], rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{g} · {s}" for g, s in rows], fontsize=7)
    ax.set_xlim(-0.7, len(columns) - 0.3)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    # shade the rows of generated cells and separate the marker blocks of each label
    for i, (_, source) in enumerate(rows):
        if source == "generated":
            ax.axhspan(i - 0.5, i + 0.5, color="0.94", zorder=0)
    owners = [m for m, _ in columns]
    for i in range(1, len(owners)):
        if owners[i] != owners[i - 1]:
            ax.axvline(i - 0.5, color="0.75", lw=0.6)
    fig.colorbar(dots, ax=ax, shrink=0.5, label="mean log-normalized expression")
    for fraction in (0.25, 0.5, 1.0):
        ax.scatter([], [], s=12 + 220 * fraction, c="white", edgecolors="grey", label=f"{fraction:.0%}")
    ax.legend(
        title="fraction expressing",
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
        title_fontsize=7,
        frameon=False,
        labelspacing=1.2,
    )
    ax.set_xlabel("top marker genes of each label (ranked on the real test cells)")
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_saliency_heatmap(path: Path, table: pd.DataFrame, title: str) -> None:
    """Heatmap of mean saliency: labels (rows) x the union of their top genes (columns).

    Parameters
    ----------
    path : Path
        PNG to write.
    table : pandas.DataFrame
        ``(n_labels, n_genes)`` mean normalized saliency, index = labels, columns = genes in plot order.
    title : str
        Figure title.
    """
    plt = _pyplot()
    if table.empty:
        raise ValueError("No saliency values to plot.")
    values = table.to_numpy(dtype=float)
    fig, ax = plt.subplots(
        figsize=(max(6.0, 0.2 * table.shape[1] + 3.5), max(3.0, 0.35 * table.shape[0] + 2.0)),
        constrained_layout=True,
    )
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(table.shape[1]), list(table.columns), rotation=90, fontsize=6)
    ax.set_yticks(range(table.shape[0]), list(table.index), fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.7, label="mean normalized saliency")
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_robustness(path: Path, per_template: pd.DataFrame, title: str) -> None:
    """Per-template accuracy and macro-F1, one point per template, grouped by options in the prompt.

    Parameters
    ----------
    path : Path
        PNG to write.
    per_template : pandas.DataFrame
        Columns ``group`` (e.g. ``"with options"``), ``accuracy`` and ``macro_f1``; one row per template.
    title : str
        Figure title.
    """
    plt = _pyplot()
    groups = list(dict.fromkeys(per_template["group"]))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), constrained_layout=True)
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, ("accuracy", "macro_f1"), strict=True):
        for i, group in enumerate(groups):
            values = per_template.loc[per_template["group"] == group, metric].to_numpy(dtype=float)
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=14, alpha=0.7)
            ax.errorbar(
                i + 0.3,
                values.mean(),
                yerr=values.std(ddof=1) if len(values) > 1 else 0,
                fmt="o",
                color="black",
                capsize=4,
            )
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_xlim(-0.5, len(groups) - 0.3)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(axis="y", color="0.9")
    fig.suptitle(f"{title}\none point per test template; black: mean ± sd", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_perturbation_means(
    path: Path, title: str, panels: Mapping[str, Mapping[str, Sequence[float] | None]]
) -> None:
    """Predicted vs real mean expression of the top DEGs: one scatter per panel (cell type).

    Parameters
    ----------
    path : Path
        PNG to write.
    title : str
        Figure title.
    panels : mapping
        Panel title -> ``{"real": (n_genes,) means of the real perturbed cells, legend entry: (n_genes,) means
        of a prediction, ...}`` (log-normalized); a prediction of None is left out.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (panel, means) in zip(axes[0], panels.items(), strict=True):
        real = np.asarray(means["real"], dtype=float)
        top = float(real.max()) if real.size else 1.0
        for i, (name, values) in enumerate((k, v) for k, v in means.items() if k != "real" and v is not None):
            values = np.asarray(values, dtype=float)
            ax.scatter(real, values, s=9, alpha=0.7, color=colors[i % len(colors)], label=name)
            top = max(top, float(values.max()))
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("real perturbed cells (mean log-normalized)")
        ax.set_ylabel("predicted")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_count_distributions(path: Path, title: str, statistics: Mapping[str, Mapping[str, Any]]) -> None:
    """Library sizes and detected genes per cell of several cell sets, as histograms side by side.

    Parameters
    ----------
    path : Path
        PNG to write.
    title : str
        Figure title.
    statistics : mapping
        Set name -> ``{"library_size": (n_cells,), "detected_genes": (n_cells,)}``
        (:func:`~.metrics.perturbation.count_statistics`).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.get_cmap("tab10").colors
    for i, (name, stats) in enumerate(statistics.items()):
        for ax, key in zip(axes, ("library_size", "detected_genes"), strict=True):
            values = np.asarray(stats[key], dtype=float)
            ax.hist(
                values,
                bins=40,
                alpha=0.45,
                color=colors[i % len(colors)],
                label=f"{name} (median {np.median(values):.0f})",
            )
    for ax, what in zip(axes, ("total counts (library size)", "genes with a count > 0"), strict=True):
        ax.set_xlabel(f"{what} per cell")
        ax.set_ylabel("cells")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
