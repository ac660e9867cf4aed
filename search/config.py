"""The search config: a typed, validated schema for ``prunetune run [CONFIG.yaml] [flags]``.

A config is a tree of frozen dataclasses: :class:`SearchConfig` at the root, one section per
concern (``dataset``, ``pretrain``, ``finetune``, ``resources``, ``space``) and one options section
per method that has options (``optuna``, ``random``, ``global``: the :data:`METHOD_SECTIONS`
registry, which later methods extend with one entry each). Every field carries its meaning and
its rule, so one table serves validation, error messages and the documentation
(:func:`describe_config`).

Everything is checked before anything starts: an unknown key is a :class:`UserError` with the
closest valid key (difflib), a value of the wrong type or out of range is a UserError naming the
key and the range, and YAML that does not parse names the file and the line.

Where values come from, lowest precedence first (:func:`load_config`):

1. the schema defaults below (a config file only lists what it changes);
2. the YAML file (or the embedded ``search/configs/default.yaml`` when none is given);
3. ``overrides``: flat dotted keys from the CLI's own flags, e.g. ``{"finetune.epochs": 2}``;
4. ``sets``: ``--set KEY=VALUE`` items, the value parsed as a YAML scalar (``3``, ``0.5``,
   ``1e-3``, ``true``, ``null``, ``"007"``).

No torch, ray or mlflow here: the registries that name models, datasets, criteria and methods are
imported inside :func:`check_names` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from prunetune.pruning.errors import UserError

SCHEDULES = ("cosine", "step")  # pruning.train.SCHEDULES
SCHEDULERS = ("auto", "asha", "none")
OBJECTIVES = ("constrained", "pareto")
SAMPLERS = ("tpe", "cmaes", "gp", "nsga2")
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes", "gp")  # refuse objective: pareto
PARETO_ONLY_SAMPLERS = ("nsga2",)  # need objective: pareto
DEVICES = ("auto", "cpu", "cuda")
ARPRUNING_STARTS = ("global", "uniform")  # methods.arpruning.STARTS
ASHA_MIN_EPOCHS = 3  # scheduler auto picks ASHA from this many fine-tuning epochs on
DEFAULT_CONFIG = "default"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CONFIG_PACKAGE = "prunetune.search"
_CONFIG_FOLDER = "configs"

Scalar = int | float | bool | str | None


# ----------------------------------------------------------------------------------------------
# Field rules: each field's meaning and the values it accepts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
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


_POSITIVE = _Range(0, None, low_open=True)
_NON_NEGATIVE = _Range(0, None)
_AT_LEAST_ONE = _Range(1, None)
_FRACTION = _Range(0, 1, low_open=True)  # (0, 1]
_OPEN_FRACTION = _Range(0, 1, low_open=True, high_open=True)  # (0, 1)
_MOMENTUM = _Range(0, 1, high_open=True)  # [0, 1)


def _key(default: Any, doc: str, *, check: _Range | None = None, choices: tuple[str, ...] = ()) -> Any:
    """A config field: its default, its meaning (``doc``), and its range or choices."""
    return field(default=default, metadata={"doc": doc, "check": check, "choices": choices})


def _section(cls: type, doc: str) -> Any:
    """A nested section field, defaulting to the section's own defaults."""
    return field(default_factory=cls, metadata={"doc": doc, "check": None, "choices": ()})


# ----------------------------------------------------------------------------------------------
# Validation shared by every section
# ----------------------------------------------------------------------------------------------

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _field_type(hint: Any) -> tuple[Any, bool]:
    """``(base type, nullable)`` of a field annotation such as ``int``, ``str | None`` or a section."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the field type ``hint``: sections built from mappings, ints widened to float."""
    base, nullable = _field_type(hint)
    if base is MethodSections:
        return value if isinstance(value, MethodSections) else MethodSections.of(value)
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if value is None:  # a YAML section whose keys are all commented out
            return base()
        if isinstance(value, Mapping):
            return _build(base, value)
        names = ", ".join(f.name for f in fields(base))
        raise UserError(
            f"config key '{key}' is a section of keys ({names}), got {value!r}; "
            f"set its keys instead, e.g. --set {key}.{fields(base)[0].name}=VALUE"
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
        fix = (
            "quote it to make it a string"
            if base is str
            else f"change it in the config file or with --set {key}=VALUE"
        )
        raise UserError(
            f"config key '{key}' must be {_TYPE_WORDS[base]}, got {value!r} ({type(value).__name__}); {fix}"
        )
    if base is float:
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
    return value


def _check_rule(value: Any, metadata: Mapping[str, Any], key: str) -> None:
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


def _validate_fields(section: Any) -> None:
    """Check (and normalise in place: int -> float, mapping -> section) every field of ``section``."""
    hints = typing.get_type_hints(type(section))
    for spec in fields(section):
        key = _join(section.section, spec.name)
        value = _coerce(getattr(section, spec.name), hints[spec.name], key)
        object.__setattr__(section, spec.name, value)
        _check_rule(value, spec.metadata, key)


def _unknown_key(key: Any, valid: Sequence[str], prefix: str) -> UserError:
    """The error for an unknown ``key`` under ``prefix``: the closest valid key, and all of them."""
    name = str(key)
    full = _join(prefix, name)
    where = f"of {prefix}" if prefix else "at the top level"
    listing = f"(valid keys {where}: {', '.join(sorted(valid))})"
    every = [row.key for row in describe_config()]
    if "." in name and _join(prefix, name) in every:
        head, rest = name.split(".", 1)
        return UserError(f"config files nest keys: write '{head}: {{{rest}: ...}}' instead of '{name}: ...'")
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return UserError(f"unknown config key '{full}'; did you mean '{_join(prefix, close[0])}'? {listing}")
    leaves = difflib.get_close_matches(name, sorted({k.rsplit(".", 1)[-1] for k in every}), n=1, cutoff=0.8)
    elsewhere = [k for k in every if leaves and k.rsplit(".", 1)[-1] == leaves[0]][:3]
    if elsewhere:
        options = " or ".join(f"'{k}'" for k in elsewhere)
        return UserError(f"unknown config key '{full}'; did you mean {options}? {listing}")
    return UserError(f"unknown config key '{full}' {listing}")


def _build(cls: type, data: Mapping[Any, Any]) -> Any:
    """Section ``cls`` from a plain mapping; unknown keys are a UserError with a suggestion."""
    valid = [spec.name for spec in fields(cls)]
    for key in data:
        if key not in valid:
            raise _unknown_key(key, valid, cls.section)
    return cls(**data)


@dataclass(frozen=True)
class _Section:
    """Base of every config section: validates its fields on construction, wherever it is built."""

    section: ClassVar[str] = ""  # the dotted path of this section in the config, for messages

    def __post_init__(self) -> None:
        _validate_fields(self)


# ----------------------------------------------------------------------------------------------
# The sections
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSection(_Section):
    """Which data, and how much of it: passed to ``pruning.data.load_dataset``."""

    section: ClassVar[str] = "dataset"
    name: str = _key("digits", "dataset name from pruning.data")
    root: str | None = _key(None, "folder holding the dataset's files; null = the dataset's default place")
    image_size: int | None = _key(
        None, "image side in pixels; null = the dataset's default", check=_AT_LEAST_ONE
    )
    val_fraction: float = _key(
        0.1, "fraction of the training split held out for validation", check=_OPEN_FRACTION
    )
    data_fraction: float = _key(1.0, "fraction of the training split used (quick runs)", check=_FRACTION)
    download: bool = _key(False, "download the dataset if it is missing (where a network allows)")


@dataclass(frozen=True)
class TrainSection(_Section):
    """A training recipe: SGD with a learning-rate schedule (``pruning.train.TrainRecipe``'s fields)."""

    epochs: int = _key(15, "training epochs", check=_AT_LEAST_ONE)
    lr: float = _key(0.05, "initial learning rate", check=_POSITIVE)
    momentum: float = _key(0.9, "SGD momentum", check=_MOMENTUM)
    weight_decay: float = _key(0.0005, "L2 weight decay", check=_NON_NEGATIVE)
    batch_size: int = _key(128, "training batch size", check=_AT_LEAST_ONE)
    schedule: str = _key("cosine", "learning-rate schedule", choices=SCHEDULES)
    nesterov: bool = _key(True, "Nesterov momentum (needs momentum > 0)")
    label_smoothing: float = _key(0.0, "label smoothing of the cross-entropy", check=_MOMENTUM)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nesterov and self.momentum == 0:
            raise UserError(
                f"config key '{self.section}.nesterov' is true but {self.section}.momentum is 0; "
                f"set a momentum > 0 or --set {self.section}.nesterov=false"
            )

    def recipe_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``pruning.train.TrainRecipe`` for this recipe."""
        return {spec.name: getattr(self, spec.name) for spec in fields(TrainSection)}


@dataclass(frozen=True)
class PretrainSection(TrainSection):
    """The base model's recipe: trained once per model, data, recipe and seed, then cached."""

    section: ClassVar[str] = "pretrain"


@dataclass(frozen=True)
class FinetuneSection(TrainSection):
    """Each trial's recovery training after pruning (0 epochs: BatchNorm recalibration only)."""

    section: ClassVar[str] = "finetune"
    epochs: int = _key(3, "fine-tuning epochs of each trial", check=_NON_NEGATIVE)
    lr: float = _key(0.01, "initial learning rate", check=_POSITIVE)
    bn_recalibration_batches: int = _key(
        20,
        "training batches that re-estimate BatchNorm statistics after pruning (0 = none)",
        check=_NON_NEGATIVE,
    )


@dataclass(frozen=True)
class ResourcesSection(_Section):
    """What each trial reserves from Ray, and where it computes."""

    section: ClassVar[str] = "resources"
    cpus_per_trial: float = _key(1.0, "CPUs reserved per trial (fractions allowed)", check=_POSITIVE)
    gpus_per_trial: float = _key(
        0.0, "GPUs reserved per trial (fractions share one GPU)", check=_NON_NEGATIVE
    )
    device: str = _key(
        "auto", "torch device of a trial: auto = cuda where a GPU is reserved", choices=DEVICES
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("cpus_per_trial", "gpus_per_trial"):
            amount = getattr(self, name)
            if amount > 1 and amount != int(amount):
                raise UserError(
                    f"config key 'resources.{name}' is {amount:g}, but Ray reserves fractions below 1 "
                    f"or whole numbers only; use {math.floor(amount)} or {math.ceil(amount)}"
                )
        if self.device == "cuda" and self.gpus_per_trial == 0:
            raise UserError(
                "config key 'resources.device' is cuda but resources.gpus_per_trial is 0, so Ray hides "
                "every GPU from the trials; reserve one with --set resources.gpus_per_trial=1 (or 0.5)"
            )


@dataclass(frozen=True)
class SpaceSection(_Section):
    """How the search space rounds channel counts."""

    section: ClassVar[str] = "space"
    round_to: int = _key(1, "kept channels are rounded to a multiple of this", check=_AT_LEAST_ONE)
    min_channels: int = _key(1, "fewest channels a group keeps", check=_AT_LEAST_ONE)


# ----------------------------------------------------------------------------------------------
# Method options: the METHOD_SECTIONS registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptunaOptions(_Section):
    """Optuna through Ray Tune's OptunaSearch: the sampler and the policy space it samples."""

    section: ClassVar[str] = "optuna"
    sampler: str = _key(
        "tpe", "Optuna sampler; nsga2 needs objective pareto, cmaes/gp need constrained", choices=SAMPLERS
    )
    n_startup_trials: int = _key(
        4, "random trials before the sampler models the results", check=_NON_NEGATIVE
    )
    min_keep_ratio: float = _key(0.1, "lowest keep ratio sampled for a group", check=_FRACTION)


@dataclass(frozen=True)
class RandomOptions(_Section):
    """Random search: keep ratios drawn uniformly, rejected when over the MACs budget."""

    section: ClassVar[str] = "random"
    floor: float = _key(0.1, "lowest keep ratio drawn for a group", check=_FRACTION)


@dataclass(frozen=True)
class GlobalOptions(_Section):
    """Global ranking: one importance threshold across all groups, found for the MACs target."""

    section: ClassVar[str] = "global"
    floor: float = _key(0.1, "lowest keep ratio a group is cut to", check=_FRACTION)


@dataclass(frozen=True)
class ArpruningOptions(_Section):
    """ARPruning's neighbourhood search (methods.arpruning): its start, step, round size and proxy."""

    section: ClassVar[str] = "arpruning"
    start: str = _key(
        "global",
        "start policy: global (an importance threshold over all groups) or uniform",
        choices=ARPRUNING_STARTS,
    )
    floor: float = _key(0.1, "lowest keep ratio of a group, at the start and in every move", check=_FRACTION)
    step: float = _key(
        0.05, "keep ratio a move shifts from one group to another; halved when no neighbour at it improves",
        check=_Range(0, 0.5, low_open=True),
    )
    neighbours: int | None = _key(
        None, "neighbours scored per round, in parallel; null = concurrency", check=_AT_LEAST_ONE
    )
    proxy: str = _key(
        "bn", "how neighbours are scored: bn (BatchNorm recalibration only) or epochs:N (N fine-tuning epochs)"
    )

    def __post_init__(self) -> None:
        from prunetune.methods.proxy import proxy_epochs

        super().__post_init__()
        proxy_epochs(self.proxy, f"config key '{self.section}.proxy'")


@dataclass(frozen=True)
class DcmSection(_Section):
    """DCM, a learner (methods.dcm): how it learns keep ratios, and the ranges Optuna samples."""

    section: ClassVar[str] = "dcm"
    epochs: int = _key(1, "learning epochs of each trial (passes over the training split less its held-out part)",
                       check=_AT_LEAST_ONE)
    rank_every: int = _key(10, "weight steps between re-rankings of every group's channels", check=_AT_LEAST_ONE)
    floor: float = _key(0.1, "lowest keep ratio of a group (r_min)", check=_OPEN_FRACTION)
    start_keep_ratio: float | None = _key(
        None, "keep ratio every group starts at; null = the uniform ratio meeting the loss target",
        check=_OPEN_FRACTION,
    )
    penalty: str = _key("squared", "MACs term: squared gap to the target, or one_sided (only the excess)",
                        choices=("squared", "one_sided"))
    held_out_fraction: float = _key(0.1, "fraction of the training split the ratio steps train on",
                                    check=_OPEN_FRACTION)
    ratio_lr: float = _key(0.2, "learning rate of the ratio steps (SGD on theta)", check=_POSITIVE)
    checkpoint_every: int = _key(20, "weight steps between progress reports with a checkpoint",
                                 check=_AT_LEAST_ONE)
    lambda_min: float = _key(10.0, "searched range of lambda, the MACs term's weight: lowest", check=_NON_NEGATIVE)
    lambda_max: float = _key(1000.0, "searched range of lambda: highest (log scale)", check=_NON_NEGATIVE)
    k_min: int = _key(1, "searched range of k, weight steps per ratio step: lowest", check=_AT_LEAST_ONE)
    k_max: int = _key(4, "searched range of k: highest", check=_AT_LEAST_ONE)
    temperature_start_min: float = _key(0.5, "searched range of the mask temperature at the start: lowest",
                                        check=_POSITIVE)
    temperature_start_max: float = _key(4.0, "searched range of the start temperature: highest (log scale)",
                                        check=_POSITIVE)
    temperature_end_min: float = _key(0.02, "searched range of the mask temperature at the end: lowest",
                                      check=_POSITIVE)
    temperature_end_max: float = _key(0.2, "searched range of the end temperature: highest (log scale)",
                                      check=_POSITIVE)
    target_margin_min: float = _key(0.0, "searched range of the margin below macs_target the loss aims at: lowest",
                                    check=_Range(0, 0.5, high_open=True))
    target_margin_max: float = _key(0.05, "searched range of the target margin: highest",
                                    check=_Range(0, 0.5, high_open=True))

    def __post_init__(self) -> None:
        from prunetune.methods.dcm_options import DcmOptions  # no torch: the cross-key rules live there

        super().__post_init__()
        DcmOptions(**{spec.name: getattr(self, spec.name) for spec in fields(self)})


def _registry(*sections: type) -> dict[str, type]:
    return {cls.section: cls for cls in sections}


# Options section name -> its dataclass. A method with options adds its class here (one entry);
# methods without options (uniform) have no section. Names are top-level keys of the YAML.
METHOD_SECTIONS: dict[str, type] = _registry(OptunaOptions, RandomOptions, GlobalOptions, ArpruningOptions,
                                              DcmSection)


@dataclass(frozen=True)
class MethodSections(Mapping):
    """The options of every method in :data:`METHOD_SECTIONS`, by name: an immutable mapping."""

    entries: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.entries]
        if names != list(METHOD_SECTIONS) or any(
            not isinstance(options, METHOD_SECTIONS[name]) for name, options in self.entries
        ):
            raise ValueError(
                f"MethodSections needs one options object per section {list(METHOD_SECTIONS)}; "
                "build it with MethodSections.of(mapping)"
            )

    @classmethod
    def of(cls, given: Mapping[str, Any] | None = None) -> MethodSections:
        """Every method section from ``given`` (options objects or plain mappings), defaults elsewhere."""
        given = {} if given is None else given
        if not isinstance(given, Mapping):
            raise UserError(f"method options must be a mapping of section names, got {given!r}")
        for name in given:
            if name not in METHOD_SECTIONS:
                raise _unknown_key(name, list(METHOD_SECTIONS), "")
        return cls(
            tuple(
                (name, _coerce(given.get(name), options, name)) for name, options in METHOD_SECTIONS.items()
            )
        )

    def __getitem__(self, name: str) -> Any:
        for key, options in self.entries:
            if key == name:
                return options
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)


# ----------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchConfig(_Section):
    """One search, fully specified: what to prune, how to search, where to run and record it."""

    name: str | None = _key(
        None, "run name, the run directory under storage; null = <method>-<model>-<dataset>-<time>"
    )
    seed: int = _key(
        0, "seed of the data splits, the base model and the searcher", check=_Range(0, 2**32 - 1)
    )
    model: str = _key("small_cnn", "model name from pruning.models")
    dataset: DatasetSection = _section(DatasetSection, "the data")
    pretrain: PretrainSection = _section(PretrainSection, "the base model's training recipe")
    finetune: FinetuneSection = _section(FinetuneSection, "each trial's recovery training")
    method: str = _key("optuna", "pruning method from methods.registry")
    importance: str | None = _key(
        None, "channel importance criterion from pruning.importance; null = the method's own "
        "(attention for arpruning, bn_scale for dcm, l1 for the others)"
    )
    macs_target: float = _key(0.5, "kept fraction of the base model's MACs", check=_FRACTION)
    macs_tolerance: float = _key(
        0.02, "how far over the MACs target a policy may be", check=_Range(0, 0.5, high_open=True)
    )
    objective: str = _key(
        "constrained",
        "constrained: best accuracy within the MACs target; pareto: accuracy against MACs",
        choices=OBJECTIVES,
    )
    trials: int = _key(16, "number of trials", check=_AT_LEAST_ONE)
    concurrency: int = _key(2, "trials running at once", check=_AT_LEAST_ONE)
    scheduler: str = _key(
        "auto", f"trial scheduler; auto = asha when finetune.epochs >= {ASHA_MIN_EPOCHS}", choices=SCHEDULERS
    )
    calibration_batches: int = _key(
        4, "training batches fed to data-driven importance criteria", check=_AT_LEAST_ONE
    )
    resources: ResourcesSection = _section(ResourcesSection, "what each trial reserves")
    storage: str = _key("runs", "folder holding the run directories (local, or a shared file system for a cluster; a URI goes in ray_storage)")
    ray_storage: str | None = _key(
        None, "URI where Ray Tune keeps experiment state and trial checkpoints (s3://bucket/prefix), for "
        "clusters without a shared file system; null = the run directory"
    )
    tracking_uri: str | None = _key(None, "MLflow tracking URI; null = sqlite:///<storage>/mlflow.db")
    experiment: str = _key("prunetune", "MLflow experiment name")
    address: str | None = _key(None, "Ray address to join; null = start a local Ray")
    max_failures: int = _key(2, "retries of a failed trial from its last checkpoint", check=_NON_NEGATIVE)
    space: SpaceSection = _section(SpaceSection, "the search space's channel rounding")
    methods: MethodSections = field(
        default_factory=MethodSections.of, metadata={"doc": "method options", "check": None, "choices": ()}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name is not None and not _SAFE_NAME.fullmatch(self.name):
            raise UserError(
                f"config key 'name' is {self.name!r}, not a safe directory name; use letters, digits, '-', "
                "'_' and '.' (starting with a letter or digit, at most 128 characters), or null for the default"
            )
        for key in ("storage", "experiment", "model", "method", "importance"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise UserError(f"config key '{key}' is empty; give it a value")
        if self.ray_storage is not None and "://" not in self.ray_storage:
            raise UserError(
                f"config key 'ray_storage' is {self.ray_storage!r}, not a URI; give one such as s3://bucket/prefix, "
                "or leave it null and put a shared directory in storage"
            )
        sampler = self.methods["optuna"].sampler
        if sampler in PARETO_ONLY_SAMPLERS and self.objective != "pareto":
            raise UserError(
                f"config key 'optuna.sampler' is {sampler}, a multi-objective sampler, but objective is "
                f"{self.objective}; set --set objective=pareto or --set optuna.sampler=tpe"
            )
        if sampler in SINGLE_OBJECTIVE_SAMPLERS and self.objective == "pareto":
            raise UserError(
                f"config key 'optuna.sampler' is {sampler}, a single-objective sampler, but objective is "
                "pareto; set --set optuna.sampler=tpe (or nsga2), or --set objective=constrained"
            )
        if self.method == "arpruning" and self.methods["arpruning"].proxy == "bn" and \
                self.finetune.bn_recalibration_batches == 0:
            raise UserError(
                "config key 'arpruning.proxy' is bn but finetune.bn_recalibration_batches is 0, so neighbours "
                "would be scored on raw pruned models (near chance); set --set finetune.bn_recalibration_batches=20 "
                "or --set arpruning.proxy=epochs:1"
            )
        if self.scheduler == "asha" and self.finetune.epochs < 2:
            raise UserError(
                f"config key 'scheduler' is asha but finetune.epochs is {self.finetune.epochs}: ASHA stops "
                "trials between epochs; set finetune.epochs >= 2 or --set scheduler=none"
            )

    @property
    def method_options(self) -> Any:
        """The options section of the chosen method, or None for a method without options."""
        return self.methods.get(self.method)


def check_names(cfg: SearchConfig) -> None:
    """Check the model, dataset, importance criterion and method against their registries.

    The registries import torch, so this runs apart from the structural checks; ``load_config``
    and ``config_from_dict`` call it unless told not to.
    """
    from prunetune.methods.registry import method_names
    from prunetune.pruning.data import dataset_names
    from prunetune.pruning.importance import criterion_names
    from prunetune.pruning.models import model_names

    for key, value, valid, what in (
        ("model", cfg.model, model_names(), "model"),
        ("dataset.name", cfg.dataset.name, dataset_names(), "dataset"),
        ("importance", resolved_importance(cfg), criterion_names(), "importance criterion"),
        ("method", cfg.method, method_names(), "method"),
    ):
        if value not in valid:
            guess = difflib.get_close_matches(value, valid, n=1)
            hint = f"did you mean '{guess[0]}'? " if guess else ""
            raise UserError(
                f"unknown {what} '{value}' (config key '{key}'); {hint}choose one of: {', '.join(valid)}"
            )


# ----------------------------------------------------------------------------------------------
# Dicts, files and the command line
# ----------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``cfg`` (or any section) as a nested plain dict; method sections are top-level keys."""
    out: dict[str, Any] = {}
    for spec in fields(cfg):
        value = getattr(cfg, spec.name)
        if isinstance(value, MethodSections):
            out.update({name: config_to_dict(options) for name, options in value.items()})
        elif dataclasses.is_dataclass(value):
            out[spec.name] = config_to_dict(value)
        else:
            out[spec.name] = value
    return out


def config_from_dict(data: Mapping[str, Any], *, names: bool = True) -> SearchConfig:
    """A validated config from a nested mapping (missing keys take their defaults; unknown ones are errors).

    ``names=False`` skips :func:`check_names` (which imports torch).
    """
    if not isinstance(data, Mapping):
        raise UserError(f"a config must be a mapping of keys, got {type(data).__name__} {data!r}")
    core = {key: value for key, value in data.items() if key not in METHOD_SECTIONS}
    valid = [spec.name for spec in fields(SearchConfig) if spec.name != "methods"] + list(METHOD_SECTIONS)
    for key in core:
        if key not in valid:
            raise _unknown_key(key, valid, "")
    methods = MethodSections.of({key: value for key, value in data.items() if key in METHOD_SECTIONS})
    cfg = SearchConfig(**core, methods=methods)
    if names:
        check_names(cfg)
    return cfg


def flatten_config(cfg: SearchConfig) -> dict[str, Scalar]:
    """``{"finetune.epochs": 3, "optuna.sampler": "tpe", ...}``: every leaf under its dotted key."""

    def walk(tree: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Scalar]]:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                yield from walk(value, _join(prefix, key))
            else:
                yield _join(prefix, key), value

    return dict(walk(config_to_dict(cfg), ""))


@dataclass(frozen=True)
class KeyDoc:
    """One row of the config reference: a dotted key, its type, default, allowed values and meaning."""

    key: str
    type: str  # "int", "float", "str | null", or the choices "cosine | step"
    default: Scalar
    rule: str  # "in (0, 1]", ">= 1", or "" when any value of the type goes
    doc: str


def describe_config() -> list[KeyDoc]:
    """Every key of the config, in config order: the reference table, and the keys errors suggest."""
    rows: list[KeyDoc] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for spec in fields(cls):
            base, nullable = _field_type(hints[spec.name])
            if base is MethodSections:
                for name, options in METHOD_SECTIONS.items():
                    walk(options, name)
            elif dataclasses.is_dataclass(base):
                walk(base, _join(prefix, spec.name))
            else:
                kind = " | ".join(spec.metadata["choices"]) or base.__name__
                check = spec.metadata["check"]
                rows.append(
                    KeyDoc(
                        key=_join(prefix, spec.name),
                        type=kind + (" | null" if nullable else ""),
                        default=getattr(defaults, spec.name),
                        rule=check.text() if check is not None else "",
                        doc=spec.metadata["doc"],
                    )
                )

    walk(SearchConfig, "")
    return rows


def resolved_importance(cfg: SearchConfig) -> str:
    """The criterion trials rank channels by: ``importance``, or when null the method's default."""
    if cfg.importance is not None:
        return cfg.importance
    from prunetune.methods.registry import METHODS

    spec = METHODS.get(cfg.method)
    return spec.default_importance if spec is not None else "l1"


def resolved_scheduler(cfg: SearchConfig) -> str:
    """The trial scheduler to use: ``"asha"`` or ``"none"`` (auto: asha from ASHA_MIN_EPOCHS fine-tuning epochs)."""
    if cfg.scheduler == "auto":
        return "asha" if cfg.finetune.epochs >= ASHA_MIN_EPOCHS else "none"
    return cfg.scheduler


def default_run_name(cfg: SearchConfig, now: datetime) -> str:
    """``<method>-<model>-<dataset>-<YYYYmmdd-HHMMSS>``, made safe as a directory name."""
    raw = f"{cfg.method}-{cfg.model}-{cfg.dataset.name}-{now:%Y%m%d-%H%M%S}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", raw)


def run_name(cfg: SearchConfig, now: datetime) -> str:
    """The configured ``name``, or :func:`default_run_name` when it is null."""
    return cfg.name if cfg.name is not None else default_run_name(cfg, now)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that reads ``1e-3`` as a float (YAML 1.2) and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (remove one of them)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    """YAML ``text`` parsed; a syntax error is a UserError naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = " ".join(str(error.problem or error.context or "invalid YAML").split())
        raise UserError(f"{where}: {problem}; fix the YAML there") from None
    except yaml.YAMLError as error:
        raise UserError(f"{source}: {' '.join(str(error).split())}; fix the YAML there") from None


def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package (``search/configs/NAME.yaml``)."""
    folder = resources.files(_CONFIG_PACKAGE).joinpath(_CONFIG_FOLDER)
    return sorted(
        entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml")
    )


def _read_config_text(path: str | Path | None) -> tuple[str, str]:
    """``(text, label)`` of a config file: a path, the name of a shipped config, or the default."""
    if path is not None and Path(path).expanduser().exists():
        file = Path(path).expanduser()
        if not file.is_file():
            raise UserError(f"config {str(file)!r} is not a file; give a YAML file")
        try:
            return file.read_text(encoding="utf-8"), str(file)
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(
                f"cannot read config file {str(file)!r} ({error}); give a readable UTF-8 YAML file"
            ) from None
    name = DEFAULT_CONFIG if path is None else str(path).removesuffix(".yaml")
    if name in shipped_configs():
        shipped = resources.files(_CONFIG_PACKAGE).joinpath(_CONFIG_FOLDER, f"{name}.yaml")
        return shipped.read_text(encoding="utf-8"), f"search/configs/{name}.yaml (shipped)"
    raise UserError(
        f"config file {str(path)!r} does not exist; give a YAML file or a shipped config: {', '.join(shipped_configs())}"
    )


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    """Set ``tree[a][b][c] = value`` for ``key`` ``"a.b.c"``, creating sections on the way."""
    parts = key.split(".") if isinstance(key, str) else [""]
    if not all(parts):
        raise UserError(f"{source} key {key!r} is malformed; write dotted keys such as finetune.epochs")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise UserError(
                f"{source} {key!r}: config key '{'.'.join(parts[: depth + 1])}' is a value, not a section; "
                "set it directly"
            )
        node = child
    node[parts[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` from ``--set`` as ``(key, value)``, the value parsed as a YAML scalar."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set expects KEY=VALUE, got {item!r}; e.g. --set finetune.epochs=5")
    value = _parse_yaml(text, f"--set {item!r}")
    if isinstance(value, list | dict):
        raise UserError(f"--set {key} takes a single value, got {text!r}; set one key at a time")
    return key, value


def _plain(tree: Any) -> Any:
    """A deep copy of parsed YAML whose mappings are plain dicts (so dotted keys can be set in it)."""
    if isinstance(tree, Mapping):
        return {key: _plain(value) for key, value in tree.items()}
    return tree


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    sets: Sequence[str] = (),
    names: bool = True,
) -> SearchConfig:
    """Load, merge and validate a config. Precedence, lowest first: schema defaults < the file <
    ``overrides`` (the CLI's flags, as dotted keys; every key given is applied, so leave out flags
    the user did not pass) < ``sets`` (``--set KEY=VALUE``).

    ``path`` is a YAML file, the name of a shipped config (``cifar10``), or None for the shipped
    default (``search/configs/default.yaml``). ``names=False`` skips :func:`check_names`.
    """
    text, label = _read_config_text(path)
    data = _parse_yaml(text, label)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(
            f"{label} must hold a mapping of config keys at the top level, got {type(data).__name__}; "
            "write it as 'key: value' lines"
        )
    tree = _plain(data)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value, "flag")
    for item in sets:
        _set_dotted(tree, *parse_set(item), "--set")
    return config_from_dict(tree, names=names)


def dump_config(cfg: SearchConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal config."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    Path(path).write_text("# prunetune search config (resolved)\n" + text, encoding="utf-8")
