"""The figures of ``prunetune compare``: fronts, best policies, best-so-far, one colour per search.

- ``fronts.png``: accuracy against MACs ratio; every finished trial a point (proxy trials hollow
  triangles), each search's front of full trials a step line, the MACs budgets and each search's
  target as vertical lines, each search's best trial ringed.
- ``best_policies.png``: the keep ratio per group of each search's best policy, bars side by side;
  the blocks it drops named under the plot.
- ``best_so_far.png``: the best validation accuracy within each search's target against trials run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prunetune.tracking.compare import FULL, PROXY, Search, best_of, best_so_far, front_of, target_budget
from prunetune.tracking.plots import MACS_LABEL, fit_title, new_figure, save

FRONTS_PNG, POLICIES_PNG, BEST_SO_FAR_PNG = "fronts.png", "best_policies.png", "best_so_far.png"


def _colour(index: int) -> str:
    return f"C{index % 10}"


def plot_fronts(searches: Sequence[Search], budgets: Sequence[float], out_png: Path) -> Path:
    """Accuracy against MACs ratio of every search, with fronts, budgets, targets and bests."""
    figure = new_figure(8, 5.5)
    axes = figure.add_subplot()
    for index, search in enumerate(searches):
        colour = _colour(index)
        full = [t for t in search.trials if t.usable and t.fidelity == FULL]
        proxy = [t for t in search.trials if t.usable and t.fidelity == PROXY]
        axes.scatter([t.macs_ratio for t in full], [t.val_accuracy for t in full], s=16, color=colour,
                     alpha=0.6, label=f"{search.name} ({search.method}): {len(full)} full trial{'' if len(full) == 1 else 's'}")
        if proxy:
            axes.scatter([t.macs_ratio for t in proxy], [t.val_accuracy for t in proxy], s=24, marker="^",
                         facecolors="none", edgecolors=colour, alpha=0.8,
                         label=f"{search.name}: {len(proxy)} proxy trials (short fine-tune)")
        front = front_of(search)
        if front:
            axes.step([t.macs_ratio for t in front], [t.val_accuracy for t in front], where="post",
                      color=colour, linewidth=1.2)
        best = best_of(search)
        if best is not None:
            axes.scatter([best.macs_ratio], [best.val_accuracy], s=170, facecolors="none", edgecolors=colour,
                         linewidths=2, zorder=5)
        if target_budget(search) is not None:
            axes.axvline(search.macs_target, color=colour, linestyle=":", linewidth=1)
    for budget in budgets:
        axes.axvline(budget, color="0.5", linestyle="--", linewidth=0.8)
    axes.plot([], [], color="0.5", linestyle="--", linewidth=0.8, label="MACs budgets " +
              ", ".join(f"{b:g}" for b in budgets))
    axes.plot([], [], color="0.2", linestyle=":", linewidth=1, label="a search's MACs target (its colour)")
    axes.scatter([], [], s=120, facecolors="none", edgecolors="0.2", linewidths=2,
                 label="a search's best trial within its target")
    if not any(t.usable for s in searches for t in s.trials):
        axes.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel(MACS_LABEL)
    axes.set_ylabel("validation accuracy")
    axes.set_title(fit_title("Validation accuracy against MACs: every trial, each search's Pareto front", 80),
                   fontsize=11)
    axes.grid(alpha=0.3)
    figure.legend(loc="outside lower center", fontsize="x-small", ncol=2)
    return save(figure, out_png)


def plot_best_policies(searches: Sequence[Search], out_png: Path) -> Path:
    """The keep ratio per group of each search's best policy, side by side; dropped blocks named."""
    bests = [(index, search, best_of(search)) for index, search in enumerate(searches)]
    bests = [(index, search, best) for index, search, best in bests if best is not None and best.keep_ratios]
    groups: list[str] = []
    for _, _, best in bests:
        groups += [group for group in best.keep_ratios if group not in groups]
    figure = new_figure(max(6.4, 1.0 + 0.45 * len(groups) * max(1, len(bests)) ** 0.5), 4.8)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(bests))
    notes = []
    for slot, (index, search, best) in enumerate(bests):
        xs = [position + (slot - (len(bests) - 1) / 2) * width for position in range(len(groups))]
        axes.bar(xs, [best.keep_ratios.get(group, 0.0) for group in groups], width=width, color=_colour(index),
                 label=f"{search.name}: trial {best.trial_id}, MACs ratio {best.macs_ratio:.3f}")
        dropped = ", ".join(best.dropped_blocks) or "none"
        notes.append(f"{search.name} drops blocks: {dropped}")
    axes.set_xticks(range(len(groups)), groups, rotation=45 if len(groups) > 6 else 0, ha="right"
                    if len(groups) > 6 else "center", fontsize="small")
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("layer group")
    axes.set_ylabel("keep ratio (of the group's channels)")
    axes.set_title(fit_title("Keep ratio per group of each search's best policy", 80), fontsize=11)
    axes.grid(alpha=0.3, axis="y")
    if bests:
        axes.legend(loc="lower left", fontsize="x-small")
        import textwrap

        # under the axis label, as part of it, so the layout makes room for it (a figure text overlapped it)
        axes.set_xlabel("layer group\n" + "\n".join(textwrap.wrap("; ".join(notes), 110)), fontsize="small")
    else:
        axes.text(0.5, 0.5, "no search has a best trial within its target", ha="center", va="center",
                  transform=axes.transAxes)
    return save(figure, out_png)


def plot_best_so_far(searches: Sequence[Search], out_png: Path) -> Path:
    """Best validation accuracy within each search's target against the number of trials ended."""
    figure = new_figure()
    axes = figure.add_subplot()
    for index, search in enumerate(searches):
        points = best_so_far(search)
        if points:
            axes.step([n for n, _ in points], [v for _, v in points], where="post", color=_colour(index),
                      marker="o", markersize=3, label=f"{search.name} ({search.method})")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("trials ended (proxy trials included)")
    axes.set_ylabel("best validation accuracy so far, within target")
    axes.set_title(fit_title("Best so far against trials", 70), fontsize=11)
    axes.grid(alpha=0.3)
    if any(best_so_far(s) for s in searches):
        axes.legend(loc="best", fontsize="x-small")
    else:
        axes.text(0.5, 0.5, "no full trial within a target yet", ha="center", va="center",
                  transform=axes.transAxes)
    return save(figure, out_png)


def plot_all(searches: Sequence[Search], budgets: Sequence[float], out_dir: Path) -> list[Path]:
    """The three figures in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    return [plot_fronts(searches, budgets, out_dir / FRONTS_PNG),
            plot_best_policies(searches, out_dir / POLICIES_PNG),
            plot_best_so_far(searches, out_dir / BEST_SO_FAR_PNG)]
