"""The main experiment's figures (SPEC "Figures"), each written as PNG and SVG, atomically.

1. :func:`plot_entropy_matrices`: two 256x256 binary matrices with their H_C and Lp norms.
2. :func:`plot_weight_matrices`: trained weight matrices, one seed per arm, zero grey,
   positive white, negative black.
3. :func:`plot_accuracy_vs_kept`: test accuracy vs kept weights, median and min-max over seeds.

Figures are built on :class:`matplotlib.figure.Figure` with the non-interactive Agg canvas, so
nothing here touches pyplot's global state or needs a display. SVG output is made
reproducible (no date, fixed hash salt).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sparsebench.aggregate import order_arms, select_criteria
from sparsebench.provenance import atomic_path

DPI = 150
WEIGHT_SCALE_PERCENTILE = 99.0
"""Figure 2 maps +-(this percentile of |w|) of each panel to white/black; beyond it saturates."""


def save_figure(fig: Figure, png: Path | str, svg: Path | str, dpi: int = DPI) -> None:
    """Write ``fig`` to ``png`` and ``svg``, each atomically (no half-written file on failure)."""
    FigureCanvasAgg(fig)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    with matplotlib.rc_context({"svg.hashsalt": "sparsebench"}), atomic_path(svg) as tmp:
        fig.savefig(tmp, format="svg", metadata={"Date": None})


# --------------------------------------------------------------------------------------------
# Figure 1: configuration entropy of two binary matrices with equal Lp norms


def plot_entropy_matrices(
    png: Path | str, svg: Path | str, seed: int = 0
) -> dict[str, dict[str, float]]:
    """SPEC figure 1: ones scattered over the whole matrix vs inside the central 64x64 block.

    Ones are drawn black on white; the dashed square marks the central block. Each panel's
    title gives its H_C (``configuration_entropy_reference``) and its L1 and L2 norms, which are
    equal for the two matrices (1024 ones each). Returns the annotated numbers:
    ``{"scattered": {"H_C", "L1", "L2"}, "block": {...}}``; the paper's claim is
    ``scattered H_C > block H_C``.
    """
    from sparsebench.regularizers.configuration_entropy import (
        configuration_entropy_reference,
        figure1_matrices,
    )

    scattered, block = figure1_matrices(seed=seed)
    stacked = torch.stack([scattered, block]).to(torch.float64)
    entropies = configuration_entropy_reference(stacked)
    values: dict[str, dict[str, float]] = {}
    descriptions = {
        "scattered": "1024 ones scattered over the whole matrix",
        "block": "1024 ones scattered inside the central 64×64 block",
    }
    fig = Figure(figsize=(10.5, 5.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, name, matrix, entropy in zip(
        axes, ("scattered", "block"), stacked, entropies, strict=True
    ):
        flat = matrix.flatten()
        record = {
            "H_C": float(entropy),
            "L1": float(flat.abs().sum()),
            "L2": float(flat.pow(2).sum().sqrt()),
        }
        values[name] = record
        ax.imshow(matrix.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="none")
        side = matrix.shape[0]
        lo = (side - 64) / 2 - 0.5
        ax.add_patch(Rectangle((lo, lo), 64, 64, fill=False, edgecolor="tab:red", ls="--", lw=0.8))
        ax.set_title(
            f"{descriptions[name]}\n"
            f"$H_C$ = {record['H_C']:.3f}    "
            f"$\\|W\\|_1$ = {record['L1']:.0f},  $\\|W\\|_2$ = {record['L2']:.0f}",
            fontsize=10,
        )
        ax.set_xticks([0, side // 2, side - 1])
        ax.set_yticks([0, side // 2, side - 1])
    fig.suptitle(
        "Configuration entropy tells apart matrices that Lp norms cannot "
        f"(256×256, seed {seed}; red: central 64×64 block)",
        fontsize=11,
    )
    save_figure(fig, png, svg)
    return values


# --------------------------------------------------------------------------------------------
# Figure 2: trained weight matrices


def weight_matrices(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Layer name -> 2-D weight matrix (out x in) of a state dict, in its order.

    Weight matrices are the entries ending ``.weight`` with at least 2 dimensions; a conv
    weight (out, in, kh, kw) is shown reshaped to (out, in*kh*kw). Biases and 1-D weights
    (e.g. normalisation scales) are skipped.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    matrices = {}
    for key, value in state_dict.items():
        if not (key.endswith(".weight") and isinstance(value, torch.Tensor) and value.dim() >= 2):
            continue
        tensor = value.detach().to("cpu", torch.float64)
        matrices[key[: -len(".weight")]] = tensor.reshape(tensor.shape[0], -1).numpy()
    return matrices


def _load_state_dict(source: Path | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    return torch.load(Path(source), map_location="cpu", weights_only=True)


def plot_weight_matrices(
    weights_by_arm: Mapping[str, Path | str | Mapping[str, Any]],
    png: Path | str,
    svg: Path | str,
    layer: str | Sequence[str] | None = None,
    scale_percentile: float = WEIGHT_SCALE_PERCENTILE,
) -> list[dict[str, Any]]:
    """SPEC figure 2: a grid, one row per arm (in the mapping's order), one column per layer.

    ``weights_by_arm`` maps an arm label to a weights file (``torch.load`` gives a state dict)
    or to a state dict. ``layer``: None for every weight layer (those of the first arm, in
    state-dict order), or one layer name or several (``"fc1"``; ``"fc1.weight"`` also works).

    Colours: a grey colormap with a symmetric norm centred at 0: zero is mid grey, positive
    weights lighter up to white, negative darker down to black. Each panel has its own scale:
    ``scale_percentile`` (default 99) of its |w| maps to white/black, larger magnitudes
    saturate; the scale and the share of exact zeros are in the panel's title. Panels use
    ``aspect="auto"`` (every row the same height, widths by input size), so read the
    shape from the title. Returns one record per drawn panel: arm, layer, shape, scale,
    zero_fraction.
    """
    if not weights_by_arm:
        raise ValueError("no arms given")
    arms = list(weights_by_arm)
    matrices = {arm: weight_matrices(_load_state_dict(weights_by_arm[arm])) for arm in arms}
    for arm, found in matrices.items():
        if not found:
            raise ValueError(f"arm {arm!r}: no weight matrices (keys ending '.weight', 2-D+)")
    if layer is None:
        layers = list(matrices[arms[0]])
    else:
        requested = [layer] if isinstance(layer, str) else list(layer)
        layers = [name.removesuffix(".weight") for name in requested]
        for name in layers:
            if not any(name in found for found in matrices.values()):
                raise ValueError(
                    f"layer {name!r} not in any arm's weights (first arm has "
                    f"{list(matrices[arms[0]])})"
                )

    def width(name: str) -> float:
        ins = [found[name].shape[1] for found in matrices.values() if name in found]
        return float(np.clip(max(ins) / 400.0, 0.6, 2.0))

    widths = [width(name) for name in layers]
    row_height = 2.6
    fig = Figure(
        figsize=(max(5.0, 2.8 * sum(widths) + 1.0), row_height * len(arms) + 0.8),
        layout="constrained",
    )
    axes = fig.subplots(len(arms), len(layers), squeeze=False, gridspec_kw={"width_ratios": widths})
    records: list[dict[str, Any]] = []
    for i, arm in enumerate(arms):
        for j, name in enumerate(layers):
            ax = axes[i][j]
            if name not in matrices[arm]:
                ax.set_axis_off()
                ax.text(
                    0.5, 0.5, f"{arm}: no {name}", ha="center", va="center", transform=ax.transAxes
                )
                continue
            matrix = matrices[arm][name]
            magnitudes = np.abs(matrix)
            scale = float(np.percentile(magnitudes, scale_percentile))
            if not math.isfinite(scale) or scale <= 0.0:
                scale = float(magnitudes.max()) or 1.0
            zero_fraction = float((matrix == 0).mean())
            image = ax.imshow(
                matrix,
                cmap="gray",
                norm=Normalize(vmin=-scale, vmax=scale),
                interpolation="none",
                aspect="auto",
            )
            colorbar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
            colorbar.set_ticks([-scale, 0.0, scale])
            colorbar.ax.tick_params(labelsize=7)
            ax.set_title(
                f"{arm}: {name} ({matrix.shape[0]}×{matrix.shape[1]})\n"
                f"±{scale:.3g} = p{scale_percentile:g} |w|, zeros {100 * zero_fraction:.1f} %",
                fontsize=8,
            )
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("output unit", fontsize=8)
            if i == len(arms) - 1:
                ax.set_xlabel("input", fontsize=8)
            records.append(
                {
                    "arm": arm,
                    "layer": name,
                    "shape": tuple(matrix.shape),
                    "scale": scale,
                    "zero_fraction": zero_fraction,
                }
            )
    fig.suptitle("Trained weight matrices (grey 0, white positive, black negative)", fontsize=10)
    save_figure(fig, png, svg)
    return records


# --------------------------------------------------------------------------------------------
# Figure 3: accuracy vs kept parameters


def arm_palette(arms: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per arm, in order (seaborn's colour-blind palette; husl beyond ten arms)."""
    name = "colorblind" if len(arms) <= 10 else "husl"
    return dict(zip(arms, sns.color_palette(name, n_colors=len(arms)), strict=True))


def plot_accuracy_vs_kept(
    summary: pd.DataFrame,
    png: Path | str,
    svg: Path | str,
    criterion: str | Sequence[str] | None = "sensitivity",
    arm_order: Sequence[str] | None = None,
    zoom_min: float = 90.0,
    levels: Sequence[float] = (),
) -> list[str]:
    """SPEC figure 3: test accuracy (%) vs kept weights (log x), from :func:`summarize`.

    One colour per arm; the line is the median over seeds of the test accuracy at each
    pruning percentile, placed at the median kept count, and the shaded band is the min-max
    range over seeds. Left panel: the full 0-100 % range; right panel: a zoom on accuracies
    from ``zoom_min`` (default 90 %) up, where the arms differ, its x range cut to where
    some arm reaches ``zoom_min``. Dotted horizontal lines mark ``levels`` (e.g. those of the
    kept-at-accuracy table) in the zoom. ``criterion``: one criterion, several, or None for
    all of them in the summary; each criterion is a row of the figure (so the magnitude and
    random baselines sit under the sensitivity curves, with the same colours). Points with
    zero kept weights cannot be drawn on a log axis and are left out. Returns the arms
    plotted, in legend order.
    """
    required = {
        "arm",
        "criterion",
        "kept_median",
        "accuracy_median",
        "accuracy_min",
        "accuracy_max",
    }
    missing = sorted(required - set(summary.columns))
    if missing:
        raise ValueError(f"summary lacks column(s) {missing}")
    criteria = select_criteria(summary, criterion, "summary")
    data = summary[summary["criterion"].isin(criteria) & (summary["kept_median"] > 0)]
    if data.empty:
        raise ValueError("nothing to plot: no rows with kept_median > 0 for these criteria")
    arms = order_arms(summary["arm"], arm_order)
    colours = arm_palette(arms)
    seeds = summary.groupby("arm")["n_seeds"].max() if "n_seeds" in summary else None

    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(12, 4.6 * len(criteria) + 0.6), layout="constrained")
        axes = fig.subplots(len(criteria), 2, squeeze=False)
    for row, crit in enumerate(criteria):
        part = data[data["criterion"] == crit]
        full, zoom = axes[row]
        for arm in arms:
            curve = part[part["arm"] == arm].sort_values("kept_median", kind="stable")
            if curve.empty:
                continue
            label = arm if seeds is None else f"{arm} (n={int(seeds[arm])})"
            for ax in (full, zoom):
                ax.fill_between(
                    curve["kept_median"],
                    curve["accuracy_min"],
                    curve["accuracy_max"],
                    color=colours[arm],
                    alpha=0.2,
                    linewidth=0,
                )
                ax.plot(
                    curve["kept_median"],
                    curve["accuracy_median"],
                    color=colours[arm],
                    lw=1.5,
                    label=label,
                )
        for ax in (full, zoom):
            ax.set_xscale("log")
            ax.set_xlabel("weights kept (median over seeds; log scale)")
            ax.set_ylabel("test accuracy (%)")
        full.set_ylim(0, 100)
        full.set_title(f"{crit} pruning: full range", fontsize=10)
        top = float(part["accuracy_max"].max())
        zoom.set_ylim(zoom_min, max(zoom_min + 1.0, min(100.0, top + 0.3)))
        above = part[part["accuracy_max"] >= zoom_min]
        if not above.empty:
            zoom.set_xlim(
                float(above["kept_median"].min()) / 1.3, float(part["kept_median"].max()) * 1.3
            )
        for level in levels:
            if level >= zoom_min:
                zoom.axhline(level, color="0.4", ls=":", lw=0.8)
        zoom.set_title(f"{crit} pruning: accuracy ≥ {zoom_min:g} %", fontsize=10)
        if row == 0:
            full.legend(title="arm (seeds)", loc="lower right", fontsize=8, title_fontsize=8)
    fig.suptitle(
        "Test accuracy vs weights kept after pruning: median over seeds, band = min–max",
        fontsize=11,
    )
    save_figure(fig, png, svg)
    return [arm for arm in arms if (data["arm"] == arm).any()]
