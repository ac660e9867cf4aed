"""A pruning policy: the keep ratio of every prunable group, plus the residual blocks to drop.

The groups inside a dropped block vanish with it, so a policy may leave their keep ratios out
(``SearchSpace.canonical`` does, so that policies that prune alike share one ``key()``).

A ``Policy`` is a frozen value. The code speaks only of *keep* ratios: 1.0 keeps every channel of a
group, 0.25 keeps a quarter. It is made for one search space (``space_id``), validates against it,
turns into channel counts through it, has a stable ``key()`` for de-duplication, and round-trips
through JSON. A pruned model is always rebuilt as base architecture + policy + state_dict.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from prunetune.pruning.errors import UserError

if TYPE_CHECKING:
    from prunetune.pruning.space import SearchSpace

KEY_DECIMALS = 6


def check_keep_ratio(ratio: float, what: str = "keep ratio") -> float:
    """Return ``ratio`` as a float if it lies in (0, 1], else raise a one-line UserError."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise UserError(f"{what} {ratio!r} is not a number; give a keep ratio in (0, 1]") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise UserError(f"{what} {value:g} is outside (0, 1]; a keep ratio of 1 keeps every channel")
    return value


@dataclass(frozen=True)
class Policy:
    """Keep ratio per group name, the dropped residual blocks, and the space it was made for."""

    keep_ratios: Mapping[str, float]
    dropped_blocks: tuple[str, ...] = ()
    space_id: str | None = None

    def __post_init__(self) -> None:
        ratios = {str(name): check_keep_ratio(r, f"keep ratio of group '{name}'")
                  for name, r in self.keep_ratios.items()}
        frozen = MappingProxyType(dict(sorted(ratios.items())))
        object.__setattr__(self, "keep_ratios", frozen)
        object.__setattr__(self, "dropped_blocks", tuple(sorted(set(self.dropped_blocks))))

    def __reduce__(self):  # MappingProxyType does not pickle; Ray pickles searchers holding policies
        return (Policy, (dict(self.keep_ratios), self.dropped_blocks, self.space_id))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return (dict(self.keep_ratios) == dict(other.keep_ratios)
                and self.dropped_blocks == other.dropped_blocks and self.space_id == other.space_id)

    def __hash__(self) -> int:
        return hash(self.key())

    @classmethod
    def uniform(cls, space: SearchSpace, keep_ratio: float,
                dropped_blocks: Iterable[str] = ()) -> Policy:
        """The policy that keeps the same fraction ``keep_ratio`` of every group of ``space`` (but
        those inside ``dropped_blocks``, which it leaves out)."""
        ratio = check_keep_ratio(keep_ratio)
        dropped = tuple(dropped_blocks)
        gone = space.omittable_groups(dropped) if dropped else set()
        return cls({g.name: ratio for g in space.groups if g.name not in gone}, dropped, space.space_id)

    def key(self) -> str:
        """A short stable hash: equal policies (to 1e-6 in every ratio) share a key."""
        canonical = json.dumps({
            "r": {k: round(v, KEY_DECIMALS) for k, v in self.keep_ratios.items()},
            "d": list(self.dropped_blocks), "s": self.space_id,
        }, sort_keys=True)
        return hashlib.sha1(canonical.encode()).hexdigest()[:16]

    def with_ratios(self, updates: Mapping[str, float]) -> Policy:
        """A copy with some groups' keep ratios replaced."""
        return Policy({**self.keep_ratios, **updates}, self.dropped_blocks, self.space_id)

    def validate(self, space: SearchSpace) -> None:
        """Raise UserError unless this policy names the groups and blocks of ``space``: a keep ratio
        for every group, except that groups inside a dropped block (``Block.groups``) may be left out."""
        if self.space_id is not None and self.space_id != space.space_id:
            raise UserError(f"the policy was made for space '{self.space_id}', not '{space.space_id}' "
                            f"of this model; make one with `prunetune space --json` for this model")
        names = set(space.group_names())
        unknown = sorted(set(self.keep_ratios) - names)
        if unknown:
            raise UserError(f"the policy names unknown groups {unknown[:5]}; valid groups are listed "
                            f"by `prunetune space` for this model")
        bad_blocks = sorted(set(self.dropped_blocks) - set(space.droppable_blocks))
        if bad_blocks:
            reasons = {b.name: b.why_not for b in space.blocks if b.name in bad_blocks}
            why = "; ".join(f"{name}: {reasons.get(name) or 'not a residual block'}" for name in bad_blocks)
            raise UserError(f"the policy drops blocks {bad_blocks} that cannot be dropped ({why}); "
                            f"droppable blocks are {list(space.droppable_blocks)}")
        missing = sorted(names - set(self.keep_ratios) - space.omittable_groups(self.dropped_blocks))
        if missing:
            raise UserError(f"the policy misses groups {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                            f"give a keep ratio for every group listed by `prunetune space` (only the "
                            f"groups inside a dropped block may be left out)")

    def to_json(self) -> dict:
        return {"space_id": self.space_id, "keep_ratios": dict(self.keep_ratios),
                "dropped_blocks": list(self.dropped_blocks)}

    @classmethod
    def from_json(cls, data: Mapping) -> Policy:
        if not isinstance(data, Mapping) or not isinstance(data.get("keep_ratios"), Mapping):
            raise UserError("a policy must be a JSON object with a 'keep_ratios' object "
                            "mapping group names to keep ratios")
        return cls(data["keep_ratios"], tuple(data.get("dropped_blocks") or ()), data.get("space_id"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy JSON file; an unreadable or malformed file is a UserError naming it."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise UserError(f"cannot read policy file {path}: {exc.strerror}; check the path") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"policy file {path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                            f"write it as printed by `prunetune space --json`") from None
        return cls.from_json(data)

    def describe(self) -> str:
        """One line: the mean keep ratio, its range, and the dropped blocks."""
        values = list(self.keep_ratios.values()) or [1.0]
        text = (f"keep ratio mean {sum(values) / len(values):.3f} "
                f"(min {min(values):.3f}, max {max(values):.3f}) over {len(values)} groups")
        if self.dropped_blocks:
            text += f", dropping {len(self.dropped_blocks)} blocks"
        return text
