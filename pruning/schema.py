"""Declared options: a frozen dataclass whose every field carries its default, meaning and rule.

One declaration serves validation, error messages and documentation. The search config's
sections (``prunetune.search.config``), every method's options (declared beside the method, in
``prunetune.methods``) and the training recipe (``prunetune.pruning.recipe``) are all
:class:`Section` subclasses whose fields are made with :func:`option`::

    @dataclass(frozen=True)
    class RandomOptions(SearcherOptions):
        section: ClassVar[str] = "random"
        floor: float = option(0.1, "lowest keep ratio drawn for a group", check=FRACTION)

A Section checks (and normalises: int -> float, mapping -> nested section) its fields when it is
built, wherever it is built: from YAML, from ``--set``, or in Python. A wrong type, a value out of
range or outside the choices is a one-line :class:`UserError` naming the config key, the rule and
the fix. Fields the search sets from other config keys (the MACs tolerance, the importance
criterion) are declared with ``from_config``: they are no keys of the section and are not
documented as such.

No torch here: the config is checked before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from prunetune.pruning.errors import UserError

Scalar = int | float | bool | str | None


@dataclass(frozen=True)
class Range:
    """A numeric interval; ``None`` leaves that side open to infinity."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __call__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def text(self) -> str:
        """The rule in words: ``> 0``, ``>= 1``, ``in (0, 1]``."""
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value: float | None) -> str:
    """``value`` printed exactly: whole numbers without a decimal point."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


POSITIVE = Range(0, None, low_open=True)
NON_NEGATIVE = Range(0, None)
AT_LEAST_ONE = Range(1, None)
FRACTION = Range(0, 1, low_open=True)  # (0, 1]
OPEN_FRACTION = Range(0, 1, low_open=True, high_open=True)  # (0, 1)
MOMENTUM = Range(0, 1, high_open=True)  # [0, 1)
TOLERANCE = Range(0, 0.5, high_open=True)  # [0, 0.5)


def option(default: Any, doc: str, *, check: Range | None = None, choices: tuple[str, ...] = (),
           from_config: str | None = None) -> Any:
    """A declared field: its default, its meaning (``doc``), and its range or choices.

    ``from_config`` names the config key the search fills this field from (``macs_tolerance``):
    such a field is not a key of its section.
    """
    return field(default=default, metadata={"doc": doc, "check": check, "choices": choices,
                                            "from_config": from_config})


def section_field(cls: type, doc: str) -> Any:
    """A nested section field, defaulting to the section's own defaults."""
    return field(default_factory=cls, metadata={"doc": doc, "check": None, "choices": (), "from_config": None})


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class UnknownKey(UserError):
    """A key that is not a field of its section (``prefix``); ``valid`` lists the keys that are."""

    def __init__(self, key: Any, valid: Sequence[str], prefix: str):
        self.key, self.valid, self.prefix = str(key), list(valid), prefix
        where = f"of {prefix}" if prefix else "at the top level"
        close = difflib.get_close_matches(self.key, self.valid, n=1, cutoff=0.6)
        hint = f"; did you mean '{join_key(prefix, close[0])}'?" if close else ""
        super().__init__(f"unknown config key '{join_key(prefix, self.key)}'{hint} "
                         f"(valid keys {where}: {', '.join(sorted(self.valid))})")


def user_keys(cls: type) -> list[str]:
    """The keys of section ``cls`` a config may set (fields the search fills are left out)."""
    return [spec.name for spec in fields(cls) if not spec.metadata.get("from_config")]


def build_section(cls: type, data: Mapping[Any, Any]) -> Any:
    """Section ``cls`` from a plain mapping; an unknown key is an :class:`UnknownKey` error."""
    valid = user_keys(cls)
    for key in data:
        if key not in valid:
            filled = {spec.name: spec.metadata.get("from_config") for spec in fields(cls)}
            if filled.get(key):
                raise UserError(f"config key '{join_key(cls.section, str(key))}' is set by the search from "
                                f"'{filled[key]}'; set {filled[key]} instead")
            raise UnknownKey(key, valid, cls.section)
    return cls(**data)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def field_type(hint: Any) -> tuple[Any, bool]:
    """``(base type, nullable)`` of a field annotation such as ``int``, ``str | None`` or a section."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the field type ``hint``: sections built from mappings, ints widened to float."""
    base, nullable = field_type(hint)
    if hasattr(base, "coerce_section"):  # a container of sections (the config's method sections)
        return base.coerce_section(value)
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if value is None:  # a YAML section whose keys are all commented out
            return base()
        if isinstance(value, Mapping):
            return build_section(base, value)
        names = ", ".join(user_keys(base))
        raise UserError(
            f"config key '{key}' is a section of keys ({names}), got {value!r}; "
            f"set its keys instead, e.g. --set {key}.{user_keys(base)[0]}=VALUE"
        )
    if value is None:
        if nullable:
            return None
        raise UserError(f"config key '{key}' must not be null; give it {_TYPE_WORDS[base]}")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[base]
    if not ok:
        fix = "quote it to make it a string" if base is str else f"change it in the config file or with --set {key}=VALUE"
        raise UserError(
            f"config key '{key}' must be {_TYPE_WORDS[base]}, got {value!r} ({type(value).__name__}); {fix}"
        )
    if base is float:
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
    return value


def check_rule(value: Any, metadata: Mapping[str, Any], key: str) -> None:
    """A UserError when ``value`` is outside the field's range or choices (null passes: it means 'default')."""
    if value is None:
        return
    choices = metadata.get("choices", ())
    if choices and value not in choices:
        guess = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else ""
        raise UserError(f"config key '{key}' must be one of: {', '.join(choices)}; got {value!r}{hint}")
    check = metadata.get("check")
    if check is not None and not check(value):
        raise UserError(
            f"config key '{key}' must be {check.text()} ({metadata['doc']}), got {value!r}; "
            f"change it in the config file or with --set {key}=VALUE"
        )


@dataclass(frozen=True)
class Section:
    """Base of every declared section: validates its fields on construction, wherever it is built.

    ``check_search(cfg)`` is a hook for rules that involve other sections of the whole search
    config (a sampler that needs a given objective); it does nothing unless a section overrides it.
    """

    section: ClassVar[str] = ""  # the dotted path of this section in the config, for messages

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for spec in fields(self):
            key = join_key(self.section, spec.name)
            value = coerce(getattr(self, spec.name), hints[spec.name], key)
            object.__setattr__(self, spec.name, value)
            check_rule(value, spec.metadata, key)

    def check_search(self, cfg: Any) -> None:
        """Raise UserError if this section's values do not fit the rest of the search config ``cfg``."""


@dataclass(frozen=True)
class KeyDoc:
    """One row of the config reference: a dotted key, its type, default, allowed values and meaning."""

    key: str
    type: str  # "int", "float", "str | null", or the choices "cosine | step"
    default: Scalar
    rule: str  # "in (0, 1]", ">= 1", or "" when any value of the type goes
    doc: str


def describe_section(cls: type, prefix: str) -> list[KeyDoc]:
    """The reference rows of section ``cls`` (nested sections walked), its keys under ``prefix``."""
    rows: list[KeyDoc] = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for spec in fields(cls):
        if spec.metadata.get("from_config"):
            continue
        base, nullable = field_type(hints[spec.name])
        if hasattr(base, "describe_sections"):
            rows.extend(base.describe_sections())
        elif dataclasses.is_dataclass(base):
            rows.extend(describe_section(base, join_key(prefix, spec.name)))
        else:
            kind = " | ".join(spec.metadata["choices"]) or base.__name__
            check = spec.metadata["check"]
            rows.append(KeyDoc(key=join_key(prefix, spec.name), type=kind + (" | null" if nullable else ""),
                               default=getattr(defaults, spec.name),
                               rule=check.text() if check is not None else "", doc=spec.metadata["doc"]))
    return rows


def section_dict(section: Any) -> dict[str, Any]:
    """The user keys of ``section`` as a nested plain dict (nested sections as dicts)."""
    out: dict[str, Any] = {}
    for name in user_keys(type(section)):
        value = getattr(section, name)
        out[name] = section_dict(value) if dataclasses.is_dataclass(value) else value
    return out
