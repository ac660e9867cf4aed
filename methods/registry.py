"""The method registry: every pruning method by name, its kind, its options and how to build it.

Three kinds (DESIGN.md, concept 5): a ``searcher`` proposes whole policies (``make_searcher``
builds it); ``optuna`` proposals come from Ray Tune's ``OptunaSearch`` in ``search/``; a
``learner`` learns a policy by training (``make_learner``). Each entry names the method's options
class (declared beside the method: ``methods/options.py`` says how), from which the search config
builds the method's section, ``describe_config`` and README document it, and ``--help`` lists
the methods. Adding a method is its module, its options class, one entry here and its tests (the
contract suite, ``tests/test_method_contract.py``, runs over every entry).

This module imports no torch: factories are named ``"module:function"`` and imported when a
method is built, so the config can read the registry before anything heavy is imported.

A method whose searcher starts from a policy computed on the trained model (``global``,
``arpruning``) has a ``start`` function; ``start_policy_for`` calls it, and ``make_searcher``
refuses to build that method without the policy it returns.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from prunetune.methods.arpruning import ArpruningOptions
from prunetune.methods.cdp_dtc_options import CdpDtcOptions
from prunetune.methods.dcm_options import DcmOptions
from prunetune.methods.dcpa_options import DcpaOptions
from prunetune.methods.global_threshold import GlobalOptions
from prunetune.methods.limiters import ConcurrencyLimiter, TrialBudget
from prunetune.methods.options import SearcherOptions, check_fraction, parse_options
from prunetune.methods.optuna_options import OptunaOptions
from prunetune.methods.random_search import RandomOptions
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.schema import user_keys
from prunetune.pruning.space import SearchSpace

if TYPE_CHECKING:
    from prunetune.methods.learner import Learner
    from prunetune.methods.searcher import Searcher

NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})
_PACKAGE = "prunetune.methods"


def _load(ref: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` reference names (the module under prunetune.methods)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), name)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its kind, a one-line summary, its factory and options type, its start.

    ``factory`` and ``start`` are ``"module:function"`` references within prunetune.methods.
    """

    kind: Literal["searcher", "optuna", "learner"]
    summary: str
    factory: str | None = None
    options: type = SearcherOptions
    start: str | None = None
    default_importance: str = "l1"  # the criterion when the config's ``importance`` is null
    context: tuple[str, ...] = ()  # search settings its factory takes too: "budget", "concurrency", "parameterisation"
    warm_start: bool = False  # first evaluates the heuristics (methods.heuristics), unless it has a start
    # it drops residual blocks by itself (CDP+DTC: a block whose convolution empties), so its MACs
    # floor has every droppable block dropped whatever ``space.search_depth`` says
    drops_blocks: bool = False

    @property
    def needs_start_policy(self) -> bool:
        return self.start is not None

    @property
    def parameterised(self) -> bool:
        """Whether it samples policies in the config's ``space.parameterisation`` (methods.parameterisation)."""
        return self.kind == "optuna" or "parameterisation" in self.context

    @property
    def section(self) -> str | None:
        """The method's config section (its options' keys), or None when it has no keys to set."""
        return self.options.section if user_keys(self.options) else None

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """Call the method's factory (imported now)."""
        return _load(self.factory)(*args, **kwargs)


METHODS: dict[str, MethodSpec] = {
    "uniform": MethodSpec("searcher", "every group keeps the same ratio, the largest meeting the target",
                          "uniform:make_uniform_searcher"),
    "global": MethodSpec("searcher", "one importance threshold over all channels, with a floor per group",
                         "global_threshold:make_global_searcher", GlobalOptions,
                         "global_threshold:global_start_policy"),
    "random": MethodSpec("searcher", "distinct random policies rescaled into the MACs band",
                         "random_search:make_random_searcher", RandomOptions, context=("parameterisation",),
                         warm_start=True),
    "arpruning": MethodSpec("searcher", "ARPruning: a neighbourhood search from the global attention policy",
                            "arpruning:make_arpruning_searcher", ArpruningOptions,
                            "arpruning:arpruning_start_policy", default_importance="attention",
                            context=("budget", "concurrency")),
    "optuna": MethodSpec("optuna", "Ray Tune's OptunaSearch over one keep ratio per group (search/)",
                         options=OptunaOptions, warm_start=True),
    "dcm": MethodSpec("learner", "DCM: learns every group's keep ratio with dynamic channel masks",
                      "dcm:make_dcm_learner", DcmOptions, default_importance="bn_scale"),
    "cdp-dtc": MethodSpec("learner", "CDP + DTC: filter skeletons under a texture penalty, pruned by dynamic "
                          "thresholds (width and depth)", "cdp_dtc:make_cdp_dtc_learner", CdpDtcOptions,
                          default_importance="texture", drops_blocks=True),
    "dcpa": MethodSpec("learner", "DCP-A: learns widths and depths by Gumbel-softmax over attention-given logits",
                       "dcpa:make_dcpa_learner", DcpaOptions, default_importance="bn_scale"),
}


def method_sections() -> dict[str, type]:
    """Config section name -> options class, for every method with keys to set (registry order)."""
    return {spec.section: spec.options for spec in METHODS.values() if spec.section is not None}


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``; an unknown name is a UserError listing the valid ones."""
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(method_names())}")
    return METHODS[name]


def searcher_spec(name: str) -> MethodSpec:
    """``get_method(name)``, refusing methods that are not searchers."""
    spec = get_method(name)
    if spec.kind != "searcher":
        searchers = [n for n in method_names() if METHODS[n].kind == "searcher"]
        raise UserError(f"method '{name}' is a {spec.kind}, not a searcher; searchers are: "
                        f"{', '.join(searchers)}")
    return spec


def start_policy_for(name: str, model, space: SearchSpace, *, macs_target: float, calib=None,
                     options: Mapping[str, Any] = NO_OPTIONS) -> Policy | None:
    """The start policy searcher ``name`` needs, computed on the trained ``model``; None if it needs none."""
    spec = searcher_spec(name)
    if spec.start is None:
        return None
    return _load(spec.start)(model, space, calib, macs_target=check_fraction(macs_target, "macs_target"),
                             options=parse_options(spec.options, options, name))


def make_searcher(name: str, space: SearchSpace, *, macs_target: float, seed: int, budget: int,
                  concurrency: int, options: Mapping[str, Any] = NO_OPTIONS,
                  start_policy: Policy | None = None, heuristics: Mapping[str, Policy] = NO_OPTIONS,
                  parameterisation=None) -> Searcher:
    """Build searcher ``name`` on ``space``, within ``budget`` proposals and ``concurrency`` in flight.

    ``options`` are the method's own (see its options dataclass; ``tolerance`` for all). The result
    is ``ConcurrencyLimiter(TrialBudget(searcher, budget), concurrency)``; with ``heuristics``
    (``methods.heuristics.heuristic_policies``) the searcher is warm-started: ``WarmStart`` proposes
    them first, within the same budget. ``parameterisation`` (``methods.parameterisation``; None:
    one keep ratio per group) goes to a searcher that samples in one (``MethodSpec.parameterised``).
    """
    spec = searcher_spec(name)
    parsed = parse_options(spec.options, options, name)
    target = check_fraction(macs_target, "macs_target")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a whole number of at least 0, got {seed!r}")
    if spec.needs_start_policy and start_policy is None:
        raise UserError(f"method '{name}' needs a start policy; compute it with start_policy_for('{name}', ...)")
    if not spec.needs_start_policy and start_policy is not None:
        raise UserError(f"method '{name}' takes no start policy; leave it out")
    if parameterisation is not None and parameterisation.kind != "groups" and not spec.parameterised:
        raise UserError(f"method '{name}' samples no policy space, so it takes no {parameterisation.kind} "
                        f"parameterisation; leave it out (optuna and random take one)")
    settings = {"budget": budget, "concurrency": concurrency, "parameterisation": parameterisation}
    searcher = spec.build(space, macs_target=target, seed=seed, options=parsed, start_policy=start_policy,
                          **{key: settings[key] for key in spec.context})
    if heuristics:
        from prunetune.methods.heuristics import WarmStart

        searcher = WarmStart(searcher, space, heuristics, macs_target=target, tolerance=parsed.tolerance)
    return ConcurrencyLimiter(TrialBudget(searcher, budget), concurrency)


def make_learner(name: str, options: Mapping[str, Any] = NO_OPTIONS) -> Learner:
    """Build learner ``name`` with its ``options`` (its options dataclass's fields, checked)."""
    spec = get_method(name)
    if spec.kind != "learner":
        learners = [n for n in method_names() if METHODS[n].kind == "learner"]
        raise UserError(f"method '{name}' is a {spec.kind}, not a learner; learners are: {', '.join(learners)}")
    return spec.build(parse_options(spec.options, options, name))
