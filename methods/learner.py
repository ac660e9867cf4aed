"""The learner protocol: a method that learns a policy by training, given hyperparameters.

DESIGN.md, concept 5: ``learn(model, data, target, hparams, report) -> policy``. A learner trains
a copy of the trained base model (whatever it learns in the weights is thrown away) and returns
the policy it learned; the trial then prunes the base model with that policy and fine-tunes it
like any other policy. Ray Tune searches the hyperparameters with Optuna within the ranges the
learner declares (``hparam_ranges``).

Learning is long, so it is resumable: ``report(progress, state)`` hands the caller the
learner's whole state now and then (plain data and tensors, loadable with
``torch.load(weights_only=True)``), and ``learn(..., state=that)`` continues from it as if never
stopped. DCM (methods/dcm.py) is the first learner; DCP-A and CDP+DTC follow the same protocol.

The result is a ``Learned`` value, the policy with the trajectory of the learning (DESIGN.md's
signature returns the policy alone; the trajectory is what a trial logs of the learning).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.schema import Section
from prunetune.pruning.space import SearchSpace

if TYPE_CHECKING:  # this module imports no torch, so config validation can use HParamRange
    from torch import nn
    from torch.utils.data import Dataset

    from prunetune.pruning.train import TrainRecipe


@dataclass(frozen=True)
class HParamRange:
    """One hyperparameter the search proposes: a name and its range (``low == high`` fixes it)."""

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise UserError(f"hyperparameter '{self.name}' has the range [{self.low:g}, {self.high:g}]; "
                            f"give a lower bound at most the upper bound")
        if self.log and self.low <= 0:
            raise UserError(f"hyperparameter '{self.name}' is searched on a log scale, so its range must be "
                            f"above 0, got [{self.low:g}, {self.high:g}]")

    def contains(self, value: float) -> bool:
        return self.low - 1e-12 <= value <= self.high + 1e-12


@dataclass(frozen=True)
class LearnerOptions(Section):
    """A learner's options: each hyperparameter the search proposes is declared as a pair of
    fields ``<name>_min`` / ``<name>_max`` (equal bounds fix it), named in ``searched``; this
    checks every pair once. ``hparam_ranges()`` turns them into the search's ranges."""

    searched: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.searched:
            low, high = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if low > high:
                raise UserError(f"config key '{self.section}.{name}_min' ({low:g}) is above "
                                f"'{self.section}.{name}_max' ({high:g}); give a range with min <= max "
                                f"(equal values fix {name})")

    def hparam_ranges(self) -> tuple[HParamRange, ...]:
        """The searched hyperparameters' ranges (each learner's options say which are log or integer)."""
        raise NotImplementedError(f"{type(self).__name__} must declare its hparam_ranges")


@dataclass(frozen=True)
class LearnData:
    """What a learner trains on: the training split (it holds part of it out itself), the
    validation split (for progress reports only, never for decisions), and the weight recipe."""

    space: SearchSpace
    train: Dataset
    val: Dataset
    augment: str
    recipe: TrainRecipe  # SGD settings of the weight steps (the search's fine-tuning recipe)
    seed: int
    device: str = "cpu"


@dataclass(frozen=True)
class LearnProgress:
    """A report during learning: steps done of the total, and metrics (``val_accuracy`` among them)."""

    step: int
    total_steps: int
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))

    def __reduce__(self):  # MappingProxyType does not pickle
        return (LearnProgress, (self.step, self.total_steps, dict(self.metrics)))


@dataclass(frozen=True)
class Learned:
    """A learner's result: the policy (meeting the target) and the trajectory that led to it.

    ``trajectory`` holds one row per recorded step: ``{"step": s, "keep.<group>": ratio, ...}``.
    """

    policy: Policy
    trajectory: tuple[Mapping[str, float], ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"policy": self.policy.to_json(), "trajectory": [dict(row) for row in self.trajectory],
                "info": dict(self.info)}

    @classmethod
    def from_json(cls, data: Mapping) -> Learned:
        return cls(Policy.from_json(data["policy"]), tuple(data.get("trajectory") or ()), data.get("info") or {})


# report(progress, state or None): the state, when given, is what ``learn(state=...)`` resumes from.
LearnReport = Callable[[LearnProgress, dict | None], None]


class Learner(ABC):
    """Learns a policy by training (see the module doc).

    :meth:`learn` does what every learner shares, once: the hyperparameters checked against their
    ranges, the target against the space (:meth:`check`), a state to resume from checked to be
    this learner's on this space with these hyperparameters, and every reported state stamped
    with that header (``format``, ``method``, ``space_id``, ``hparams``). A learner implements
    :meth:`run`, which sees checked hyperparameters and reports its own state only.
    """

    name: str = "learner"
    state_format: int = 1  # raise it when a learner's state changes shape
    # Whether the learned policy meets the MACs target by construction. A learner whose MACs follow
    # from its hyperparameters instead (CDP+DTC: from delta) sets False; the search then keeps the
    # best trial within the target (the contract suite checks the promise where it is made).
    meets_target: bool = True

    def __init__(self, options: LearnerOptions):
        self.options = options

    def hparam_ranges(self) -> tuple[HParamRange, ...]:
        """The hyperparameters the search proposes and their ranges (declared by the options)."""
        return self.options.hparam_ranges()

    @abstractmethod
    def check(self, space: SearchSpace, target: float) -> None:
        """Raise UserError if this learner cannot meet ``target`` on ``space`` (before any trial)."""

    def learn(self, model: nn.Module, data: LearnData, target: float, hparams: Mapping[str, float],
              report: LearnReport, *, state: Mapping | None = None) -> Learned:
        """Train ``model`` (a copy; changed in place) and return a policy whose MACs ratio is at most
        ``target``. ``state`` is one a ``report`` handed out: learning continues from there."""
        hp = check_hparams(self.hparam_ranges(), hparams, self.name)
        self.check(data.space, target)
        header = {"format": self.state_format, "method": self.name, "space_id": data.space.space_id,
                  "hparams": dict(hp)}
        if state is not None:
            self._check_state_header(state, header)

        def stamped(progress: LearnProgress, body: dict | None) -> None:
            report(progress, None if body is None else {**body, **header})

        return self.run(model, data, target, hp, stamped, state=state)

    @abstractmethod
    def run(self, model: nn.Module, data: LearnData, target: float, hparams: dict, report: LearnReport, *,
            state: Mapping | None = None) -> Learned:
        """:meth:`learn` after its checks: ``hparams`` are checked, ``state`` (when given) is this
        learner's on this space with these hyperparameters; ``report`` stamps the states it is given."""

    def _check_state_header(self, state: Mapping, header: Mapping) -> None:
        if state.get("method") != header["method"] or state.get("space_id") != header["space_id"]:
            raise UserError(f"the learning checkpoint is not {self.name}'s on this model; resume with the same "
                            "method and model")
        if state.get("format") != header["format"]:
            raise UserError(f"the learning checkpoint has format {state.get('format')!r}, this {self.name} writes "
                            f"{header['format']}; start the trial afresh")
        if dict(state.get("hparams") or {}) != header["hparams"]:
            raise UserError("the learning checkpoint was taken with other hyperparameters or options; "
                            "resume with the ones it started with")


def check_hparams(ranges: tuple[HParamRange, ...], hparams: Mapping[str, float], learner: str) -> dict:
    """``hparams`` checked against ``ranges``: every name given, inside its range (ints as ints)."""
    names = {r.name for r in ranges}
    missing, unknown = sorted(names - set(hparams)), sorted(set(hparams) - names)
    if missing or unknown:
        raise UserError(f"learner '{learner}' takes hyperparameters {sorted(names)}; missing {missing}, "
                        f"unknown {unknown}")
    checked = {}
    for r in ranges:
        value = hparams[r.name]
        if not r.contains(float(value)):
            raise UserError(f"hyperparameter '{r.name}' of '{learner}' is {value!r}, outside its range "
                            f"[{r.low:g}, {r.high:g}]")
        checked[r.name] = int(round(value)) if r.integer else float(value)
    return checked
