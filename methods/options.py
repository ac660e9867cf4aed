"""Method options: one frozen dataclass per method, filled from a plain mapping with checked names.

``parse_options(RandomOptions, {"floor": 0.2}, "random")`` returns ``RandomOptions(floor=0.2)``; an
unknown name or a bad value is a UserError naming the valid options, never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from prunetune.methods.searcher import DEFAULT_TOLERANCE
from prunetune.pruning.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class SearcherOptions:
    """Options every searcher takes: ``tolerance``, how far over the MACs target a proposal may be."""

    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        check_fraction(self.tolerance, "tolerance", low=0.0, high=1.0, include_low=True)


def check_fraction(value: Any, what: str, *, low: float = 0.0, high: float = 1.0,
                   include_low: bool = False) -> float:
    """``value`` as a float in (low, high] (or [low, high] with ``include_low``), else a UserError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} {value!r} is not a number; give a value in ({low:g}, {high:g}]") from None
    inside = (low <= number if include_low else low < number) and number <= high
    if not (math.isfinite(number) and inside):
        bracket = "[" if include_low else "("
        raise UserError(f"{what} {number:g} is outside {bracket}{low:g}, {high:g}]; give a value inside it")
    return number


def parse_options(options_type: type[T], options: Mapping[str, Any], method: str) -> T:
    """Build ``options_type`` from ``options``; unknown names are a UserError listing the valid ones."""
    valid = sorted(f.name for f in fields(options_type))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"method '{method}' has no option(s) {unknown}; its options are: "
                        f"{', '.join(valid) or 'none'}")
    return options_type(**options)
