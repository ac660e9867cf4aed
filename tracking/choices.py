"""A learner's final distribution over its choices (DCP-A's widths per group and depths per stage),
drawn as a heat map for its trial's MLflow run (``choices.png``).

A DCP-A trial record's ``learning`` holds ``distribution``: ``widths`` and ``depths`` (the
probability of each choice, per group and per stage) with ``width_choices`` and ``depth_choices``
(the channels kept and the blocks run at each choice). Pure Python until the plot, which uses
matplotlib's object API with the Agg canvas (no pyplot, no global backend), as tracking/plots.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

CHOICES_PNG = "choices.png"


def choice_rows(record: Mapping[str, Any]) -> list[tuple[str, list[float], list[int]]]:
    """(label, probabilities, choice values) per group (``width <group>``) then per stage
    (``depth <stage>``); empty for a record without a distribution."""
    distribution = (record.get("learning") or {}).get("distribution") or {}
    rows = []
    for kind, values in (("width", "width_choices"), ("depth", "depth_choices")):
        probabilities = distribution.get(f"{kind}s") or {}
        for name, p in probabilities.items():
            rows.append((f"{kind} {name}", [float(x) for x in p], [int(v) for v in distribution[values][name]]))
    return rows


def plot_choice_heatmap(rows: list[tuple[str, list[float], list[int]]], out_png: Path, *, title: str = "") -> Path:
    """One row per group or stage, one column per choice (smallest first); the colour is the
    probability, the text the channels kept (widths) or blocks run (depths). Returns ``out_png``."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max((len(p) for _, p, _ in rows), default=1)
    grid = np.full((max(len(rows), 1), columns), np.nan)
    for i, (_, p, _) in enumerate(rows):
        grid[i, :len(p)] = p
    figure = Figure(figsize=(1.0 + 0.6 * columns + 2.5, 1.2 + 0.32 * len(rows)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, (_, p, values) in enumerate(rows):
        best = max(range(len(p)), key=p.__getitem__) if p else -1
        for k, value in enumerate(values):
            colour = "black" if p[k] > 0.6 else "white"
            axes.text(k, i, str(value), ha="center", va="center", fontsize=7, color=colour,
                      fontweight="bold" if k == best else "normal")
    axes.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=7)
    axes.set_xticks(range(columns), [str(k) for k in range(columns)], fontsize=7)
    axes.set_xlabel("choice (smallest first; text: channels kept, or blocks run; bold: the argmax)")
    if not rows:
        axes.text(0, 0, "no choices", ha="center", va="center")
    figure.colorbar(image, ax=axes, label="probability")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png")
    return out_png
