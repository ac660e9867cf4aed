"""The Pareto front of trials: cheaper (lower x) and more accurate (higher y) is better.

Pure Python, no MLflow or NumPy: the search driver uses it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prunetune.tracking.names import is_number


def pareto_front(
    points: Iterable[Mapping[str, Any]], *, x: str = "macs", y: str = "val_accuracy"
) -> list[Any]:
    """The non-dominated points, sorted by ``x`` ascending (so by ``y`` ascending too).

    A point is dominated when another has ``x`` no higher and ``y`` no lower, one of them strictly.
    Points lacking a number (or with NaN) for ``x`` or ``y`` are left out; exact duplicates on the
    front are all kept. The points themselves are returned, not copies.
    """
    usable = [point for point in points if is_number(point.get(x)) and is_number(point.get(y))]
    usable.sort(key=lambda point: (point[x], -point[y]))
    front: list[Any] = []
    for point in usable:
        best = front[-1] if front else None
        duplicate_of_best = best is not None and (point[x], point[y]) == (best[x], best[y])
        if best is None or point[y] > best[y] or duplicate_of_best:
            front.append(point)
    return front
