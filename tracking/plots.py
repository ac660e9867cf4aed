"""Figures logged with a search: accuracy against MACs ratio with its front, target and best trial;
a learner's keep-ratio curves. Titles fit, axes say their units, proxy trials are drawn apart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunetune.tracking.names import is_number
from prunetune.tracking.pareto import pareto_front

MACS_LABEL = "MACs ratio (of base)"
ACCURACY_LABELS = {"val_accuracy": "validation accuracy", "test_accuracy": "test accuracy"}
TITLE_CHARACTERS = 64  # what fits on one line of a 6.4-inch figure at 11 points


def fit_title(title: str, width: int = TITLE_CHARACTERS) -> str:
    """``title`` wrapped onto lines that fit the figure (its faults: clipped on both sides)."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) if title else ""


def new_figure(width: float = 6.4, height: float = 4.8):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend; safe without a display),
    laid out so that titles, labels and legends stay inside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure, out_png: Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png")
    return out_png


def plot_pareto(
    points: Sequence[Mapping[str, Any]],
    out_png: Path,
    *,
    base: Mapping[str, Any] | None = None,
    title: str = "",
    x: str = "macs_ratio",
    y: str = "val_accuracy",
    target: float | None = None,
    best_trial_id: str | None = None,
) -> Path:
    """One search: every trial's ``y`` against ``x``, the Pareto front, the target, the best; a PNG.

    A point with ``fidelity: proxy`` (a searcher's short fine-tune, e.g. ARPruning's neighbours) is
    drawn apart, hollow, and left off the front: its score is not comparable with a full trial's.
    ``target`` draws the MACs target as a dashed vertical line; ``best_trial_id`` rings that trial.
    ``base`` (the unpruned model's metrics, e.g. the summary's ``baseline``) is a star at ``x`` =
    its own value, or 1.0. Returns ``out_png``.
    """
    usable = [point for point in points if is_number(point.get(x)) and is_number(point.get(y))]
    full = [point for point in usable if point.get("fidelity", "full") != "proxy"]
    proxy = [point for point in usable if point.get("fidelity", "full") == "proxy"]
    front = pareto_front(full, x=x, y=y)
    figure = new_figure()
    axes = figure.add_subplot()
    if full:
        axes.scatter([p[x] for p in full], [p[y] for p in full], s=18, color="0.55",
                     label=f"trials, full fine-tune ({len(full)})")
    if proxy:
        axes.scatter([p[x] for p in proxy], [p[y] for p in proxy], s=26, marker="^", facecolors="none",
                     edgecolors="tab:orange", label=f"proxy trials, short fine-tune ({len(proxy)})")
    if front:
        axes.step([p[x] for p in front], [p[y] for p in front], where="post", color="tab:red", linewidth=1)
        axes.scatter([p[x] for p in front], [p[y] for p in front], s=30, color="tab:red", zorder=3,
                     label=f"Pareto front of full trials ({len(front)})")
    best = next((p for p in usable if best_trial_id is not None and p.get("trial_id") == best_trial_id), None)
    if best is not None:
        axes.scatter([best[x]], [best[y]], s=160, facecolors="none", edgecolors="black", linewidths=1.5,
                     zorder=5, label=f"best within target: {best_trial_id} ({best[y]:.3f})")
    if target is not None:
        axes.axvline(target, color="tab:green", linestyle="--", linewidth=1, label=f"MACs target {target:g}")
    if base is not None and is_number(base.get(y)):
        base_x = base.get(x) if is_number(base.get(x)) else 1.0
        axes.scatter([base_x], [base[y]], marker="*", s=160, color="tab:blue", label="base model", zorder=4)
    if not usable:
        axes.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel(MACS_LABEL if x == "macs_ratio" else x.replace("_", " "))
    axes.set_ylabel(ACCURACY_LABELS.get(y, y.replace("_", " ")))
    axes.set_title(fit_title(title), fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="x-small")
    return save(figure, out_png)


def plot_search(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], out_png: Path, *,
                title: str = "") -> Path:
    """A search's ``pareto.png`` from its ``trials.jsonl`` records and its ``summary.json``: every
    finished trial (proxies apart), the front, the MACs target, the best trial and the base model."""
    from prunetune.tracking.names import fidelity_of

    points = [{**(r.get("metrics") or {}), "trial_id": r.get("trial_id"),
               "fidelity": fidelity_of(r.get("params") or {})} for r in records if r.get("status") == "finished"]
    best = summary.get("best") or {}
    return plot_pareto(points, out_png, base={"macs_ratio": 1.0, **(summary.get("baseline") or {})},
                       title=title or f"{summary.get('name', '')}: validation accuracy against MACs",
                       target=summary.get("macs_target"), best_trial_id=best.get("trial_id"))


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
    figure = new_figure(10, 4.5)
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
    macs.set_ylabel(MACS_LABEL)
    macs.grid(alpha=0.3)
    macs.legend(loc="upper right", fontsize="small")
    if not steps:
        ratios.text(0.5, 0.5, "no learning steps", ha="center", va="center", transform=ratios.transAxes)
    figure.suptitle(fit_title(title, 110), fontsize=11)
    return save(figure, out_png)
