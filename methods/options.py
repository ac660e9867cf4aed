"""Method options: declared once, beside the method that reads them.

Each method's options are a frozen :class:`prunetune.pruning.schema.Section` whose fields are made
with :func:`~prunetune.pruning.schema.option` (default, meaning, rule) and whose ``section`` is the
method's config section (``random``, ``arpruning``, ``cdp_dtc``). The registry
(``methods/registry.py``) names that class in the method's entry, and from there the search config
builds the section, ``describe_config`` documents its keys and README's config reference lists
them (a test checks it). So a new method is its module, its options class, one registry entry
and its tests::

    @dataclass(frozen=True)
    class MyOptions(SearcherOptions):
        section: ClassVar[str] = "mine"
        floor: float = option(0.1, "lowest keep ratio of a group", check=FRACTION)

A field the search fills from another config key (``tolerance`` from ``macs_tolerance``,
``criterion`` from ``importance``) is declared with ``from_config``; it is no key of the section.
Rules across fields go in ``__post_init__`` (after ``super().__post_init__()``), rules against the
rest of the config in ``check_search(cfg)``. Options modules import no torch: the config is
checked before anything heavy is imported.

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
from prunetune.pruning.schema import Range, Section, option

T = TypeVar("T")


@dataclass(frozen=True)
class SearcherOptions(Section):
    """Options every searcher takes: ``tolerance``, how far over the MACs target a proposal may be."""

    tolerance: float = option(DEFAULT_TOLERANCE, "how far over the MACs target a proposal may be",
                              check=Range(0, 1), from_config="macs_tolerance")


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


def parse_options(options_type: type[T], options: Mapping[str, Any] | T, method: str) -> T:
    """``options`` as an ``options_type``: an instance as it is, a mapping built (every field allowed,
    those the search fills too); unknown names are a UserError listing the valid ones."""
    if isinstance(options, options_type):
        return options
    valid = sorted(f.name for f in fields(options_type))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"method '{method}' has no option(s) {unknown}; its options are: "
                        f"{', '.join(valid) or 'none'}")
    return options_type(**options)
