"""What survived a CDP + DTC trial's learning, per layer, drawn for its MLflow run (``survival.png``).

A CDP + DTC trial record's ``learning`` holds ``survival``: ``{conv: {"filters": f, "stripes": s}}``,
the fraction of the conv's filters with a surviving skeleton entry and of its skeleton entries
(stripes of W) left, and ``dropped_blocks``, the residual blocks whose convolution emptied. The
per-epoch curves are in the trajectory (``filters.<conv>``, ``stripes.<conv>``, logged as
``learn.*`` metrics). Pure Python until the plot, which uses matplotlib's object API with the Agg
canvas (no pyplot, no global backend), as tracking/plots.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SURVIVAL_PNG = "survival.png"


def survival_rows(record: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(conv, live filters fraction, live stripes fraction) in model order; empty without ``survival``."""
    survival = (record.get("learning") or {}).get("survival") or {}
    return [(name, float(v["filters"]), float(v["stripes"])) for name, v in survival.items()
            if isinstance(v, Mapping)]


def dropped_blocks(record: Mapping[str, Any]) -> list[str]:
    return [str(b) for b in (record.get("learning") or {}).get("dropped_blocks") or []]


def plot_survival(rows: Sequence[tuple[str, float, float]], out_png: Path, *, dropped: Sequence[str] = (),
                  title: str = "") -> Path:
    """Two bars per conv (live filters, live stripes), the dropped blocks written under the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = max(len(rows), 1)
    figure = Figure(figsize=(max(6.0, 0.35 * count + 2), 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = list(range(len(rows)))
    axes.bar([p - 0.2 for p in positions], [r[1] for r in rows], width=0.4, label="live filters")
    axes.bar([p + 0.2 for p in positions], [r[2] for r in rows], width=0.4, label="live stripes")
    axes.set_xticks(positions, [r[0] for r in rows], rotation=70, ha="right", fontsize="x-small")
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("fraction surviving")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper right", fontsize="small")
    text = "dropped blocks: " + (", ".join(dropped) if dropped else "none")
    axes.set_title(f"{title}\n{text}" if title else text, fontsize="small")
    if not rows:
        axes.text(0.5, 0.5, "no skeleton layers", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png")
    return out_png
