"""Figures logged with a search: accuracy against MACs ratio, the Pareto front highlighted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunetune.tracking.names import is_number
from prunetune.tracking.pareto import pareto_front


def plot_pareto(
    points: Sequence[Mapping[str, Any]],
    out_png: Path,
    *,
    base: Mapping[str, Any] | None = None,
    title: str = "",
    x: str = "macs_ratio",
    y: str = "val_accuracy",
) -> Path:
    """Scatter every trial's ``y`` against ``x``, draw the Pareto front as a step line, save a PNG.

    ``base`` (the unpruned model's metrics, e.g. the summary's ``baseline``) is drawn as a star at
    ``x`` = its own value, or 1.0 (the base's MACs ratio). Uses matplotlib's object API with the Agg
    canvas: no pyplot, no global backend, safe in threads and without a display. Returns ``out_png``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    usable = [point for point in points if is_number(point.get(x)) and is_number(point.get(y))]
    front = pareto_front(usable, x=x, y=y)
    figure = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter(
        [p[x] for p in usable], [p[y] for p in usable], s=18, color="0.6", label=f"trials ({len(usable)})"
    )
    if front:
        axes.step([p[x] for p in front], [p[y] for p in front], where="post", color="tab:red", linewidth=1)
        axes.scatter(
            [p[x] for p in front],
            [p[y] for p in front],
            s=30,
            color="tab:red",
            label=f"Pareto front ({len(front)})",
            zorder=3,
        )
    if base is not None and is_number(base.get(y)):
        base_x = base.get(x) if is_number(base.get(x)) else 1.0
        axes.scatter([base_x], [base[y]], marker="*", s=160, color="tab:blue", label="base model", zorder=4)
    if not usable:
        axes.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel(x.replace("_", " "))
    axes.set_ylabel(y.replace("_", " "))
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png")
    return out_png


def plot_keep_ratio_curves(
    steps: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    out_png: Path,
    *,
    macs_ratio: Sequence[float] | None = None,
    target: float | None = None,
    title: str = "",
) -> Path:
    """A learner's trajectory: every group's keep ratio against the learning step (one line each),
    and beside it the MACs ratio with the target it was pulled towards. Object API, Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    ratios, macs = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for group, values in curves.items():
        ratios.plot(steps, values, linewidth=1, label=group)
    ratios.set_xlabel("learning step")
    ratios.set_ylabel("keep ratio")
    ratios.set_ylim(0, 1.02)
    ratios.grid(alpha=0.3)
    if 0 < len(curves) <= 12:
        ratios.legend(loc="lower left", fontsize="x-small", ncol=2)
    if macs_ratio:
        macs.plot(steps, macs_ratio, color="tab:red", label="MACs ratio of the keep ratios")
    if target is not None:
        macs.axhline(target, color="0.4", linestyle="--", linewidth=1, label=f"loss target {target:.3f}")
    macs.set_xlabel("learning step")
    macs.set_ylabel("MACs ratio")
    macs.grid(alpha=0.3)
    macs.legend(loc="upper right", fontsize="small")
    if not steps:
        ratios.text(0.5, 0.5, "no learning steps", ha="center", va="center", transform=ratios.transAxes)
    figure.suptitle(title)
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png")
    return out_png
