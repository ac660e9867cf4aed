"""The search config: a typed, validated schema for ``prunetune run [CONFIG.yaml] [flags]``.

A config is a tree of frozen sections (``prunetune.pruning.schema.Section``): :class:`SearchConfig`
at the root, one section per concern (``dataset``, ``pretrain``, ``finetune``, ``resources``,
``space``) and one options section per method that has options. Those are declared once, beside
each method, and named in the method registry (``prunetune.methods.registry``); this module only
collects them (:class:`MethodSections`). Every field carries its meaning and its rule, so one
table serves validation, error messages and the documentation (:func:`describe_config`).

Everything is checked before anything starts: an unknown key is a :class:`UserError` with the
closest valid key (difflib), a value of the wrong type or out of range is a UserError naming the
key and the range, and YAML that does not parse names the file and the line.

Where values come from, lowest precedence first (:func:`load_config`):

1. the schema defaults below (a config file only lists what it changes);
2. the YAML file (or the embedded ``search/configs/default.yaml`` when none is given);
3. ``overrides``: flat dotted keys from the CLI's own flags, e.g. ``{"finetune.epochs": 2}``;
4. ``sets``: ``--set KEY=VALUE`` items, the value parsed as a YAML scalar (``3``, ``0.5``,
   ``1e-3``, ``true``, ``null``, ``"007"``).

No torch, ray or mlflow here (the method registry imports none): the registries that name
models, datasets and criteria import torch and are read inside :func:`check_names` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from prunetune.methods.parameterisation import PARAMETERISATIONS
from prunetune.methods.registry import METHODS, method_sections
from prunetune.pruning.errors import UserError
from prunetune.pruning.recipe import (
    AMP_MODES,
    BN_RECALIBRATION_BATCHES,
    FINETUNE_LR,
    PRETRAIN_EPOCHS,
    TrainRecipe,
)
from prunetune.pruning.schema import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    TOLERANCE,
    KeyDoc,
    Range,
    Scalar,
    Section,
    UnknownKey,
    coerce,
    describe_section,
    join_key,
    option,
    section_dict,
    section_field,
)

SCHEDULERS = ("auto", "asha", "none")
OBJECTIVES = ("constrained", "pareto")
TEST_EVALS = ("reportable", "all")  # which trials score the test split (search.trial, search.test_eval)
DEVICES = ("auto", "cpu", "cuda")
MAX_IMAGE_SIZE = 1024  # dataset.image_size: 4x ImageNet's 224; one batch of 128 such images is 1.6 GB
ASHA_MIN_EPOCHS = 3  # scheduler auto picks ASHA from this many fine-tuning epochs on
DEFAULT_CONFIG = "default"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CONFIG_PACKAGE = "prunetune.search"
_CONFIG_FOLDER = "configs"

# Config section name -> the options class declared beside the method (registry order).
METHOD_SECTIONS: dict[str, type] = method_sections()


def _own_criteria() -> str:
    """``"attention for arpruning, bn_scale for dcm and dcpa, l1 for the others"``, from the registry."""
    by_criterion: dict[str, list[str]] = {}
    for name, spec in METHODS.items():
        by_criterion.setdefault(spec.default_importance, []).append(name)
    common = max(by_criterion, key=lambda criterion: len(by_criterion[criterion]))
    named = [f"{criterion} for {' and '.join(names)}" for criterion, names in by_criterion.items()
             if criterion != common]
    return ", ".join([*named, f"{common} for the others"])


_OWN_CRITERIA = _own_criteria()


# Keys an earlier version wrote into every run's resolved config.yaml, with what replaced them: a
# saved config drops them (so older runs still resume, fine-tune and export); a user's config that
# sets one is told what to write instead.
RETIRED_KEYS = {
    "cdp_dtc.epochs": "cdp_dtc.steps (learning steps, not passes over the training split)",
}


def _drop_retired(tree: dict[str, Any]) -> None:
    for key in RETIRED_KEYS:
        section, _, leaf = key.rpartition(".")
        if isinstance(tree.get(section), dict):
            tree[section].pop(leaf, None)


def _unknown_key(key: Any, valid: Sequence[str], prefix: str) -> UserError:
    """The error for an unknown ``key`` under ``prefix``: the closest valid key, and all of them."""
    name = str(key)
    full = join_key(prefix, name)
    if full in RETIRED_KEYS:
        return UserError(f"config key '{full}' is no longer used: it was replaced by {RETIRED_KEYS[full]}; "
                         f"remove '{full}' from the config")
    where = f"of {prefix}" if prefix else "at the top level"
    listing = f"(valid keys {where}: {', '.join(sorted(valid))})"
    every = [row.key for row in describe_config()]
    if "." in name and join_key(prefix, name) in every:
        head, rest = name.split(".", 1)
        return UserError(f"config files nest keys: write '{head}: {{{rest}: ...}}' instead of '{name}: ...'")
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return UserError(f"unknown config key '{full}'; did you mean '{join_key(prefix, close[0])}'? {listing}")
    leaves = difflib.get_close_matches(name, sorted({k.rsplit(".", 1)[-1] for k in every}), n=1, cutoff=0.8)
    elsewhere = [k for k in every if leaves and k.rsplit(".", 1)[-1] == leaves[0]][:3]
    if elsewhere:
        options = " or ".join(f"'{k}'" for k in elsewhere)
        return UserError(f"unknown config key '{full}'; did you mean {options}? {listing}")
    return UserError(f"unknown config key '{full}' {listing}")


# ----------------------------------------------------------------------------------------------
# The sections
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSection(Section):
    """Which data, and how much of it: passed to ``pruning.data.load_dataset``."""

    section: ClassVar[str] = "dataset"
    name: str = option("digits", "dataset name from pruning.data, or your own factory: package.module:factory or "
                       "path/to/file.py:factory returning (train, val, test) datasets of (image, label)")
    root: str | None = option(None, "folder holding the dataset's files; null = the dataset's default place")
    image_size: int | None = option(
        None, "image side in pixels; null = the dataset's default", check=Range(1, MAX_IMAGE_SIZE)
    )
    val_fraction: float = option(
        0.1, "fraction of the training split held out for validation", check=OPEN_FRACTION
    )
    data_fraction: float = option(1.0, "fraction of the training split used (quick runs)", check=FRACTION)
    download: bool = option(False, "download the dataset if it is missing (where a network allows)")


@dataclass(frozen=True)
class PretrainSection(TrainRecipe):
    """The base model's recipe: trained once per model, data, recipe and seed, then cached."""

    section: ClassVar[str] = "pretrain"
    epochs: int = option(PRETRAIN_EPOCHS, "training epochs", check=AT_LEAST_ONE)


@dataclass(frozen=True)
class FinetuneSection(TrainRecipe):
    """Each trial's recovery training after pruning (0 epochs: BatchNorm recalibration only)."""

    section: ClassVar[str] = "finetune"
    epochs: int = option(3, "fine-tuning epochs of each trial", check=NON_NEGATIVE)
    lr: float = option(FINETUNE_LR, "initial learning rate", check=POSITIVE)
    bn_recalibration_batches: int = option(
        BN_RECALIBRATION_BATCHES,
        "training batches that re-estimate BatchNorm statistics after pruning (0 = none)",
        check=NON_NEGATIVE,
    )


@dataclass(frozen=True)
class ResourcesSection(Section):
    """What each trial reserves from Ray, and where it computes."""

    section: ClassVar[str] = "resources"
    cpus_per_trial: float = option(1.0, "CPUs reserved per trial (fractions allowed)", check=POSITIVE)
    gpus_per_trial: float = option(
        0.0, "GPUs reserved per trial (fractions share one GPU)", check=NON_NEGATIVE
    )
    device: str = option(
        "auto", "torch device of a trial: auto = cuda where a GPU is reserved", choices=DEVICES
    )
    amp: str = option(
        "none", "autocast of a trial's forward passes: bf16 = bfloat16 (faster on a GPU; on a CPU only with "
        "bfloat16 instructions, AMX or AVX512-BF16, else slower), none = float32", choices=AMP_MODES
    )
    channels_last: bool = option(
        False, "a trial's model and inputs in channels_last (NHWC) memory format: faster convolutions on a GPU"
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
class FinalSection(Section):
    """The final fine-tune of the chosen policy (``prunetune finetune``; at the end of ``run`` when
    ``epochs`` > 0): pruned from the base model again, trained longer, optionally distilled from it.
    With ``candidates`` > 1 or ``heuristics``, several policies get it and the best by final
    validation accuracy is chosen (``search.final.run_finals``): the last rung of multi-fidelity."""

    section: ClassVar[str] = "final"
    epochs: int = option(0, "epochs of the final fine-tune of the best policy at the end of run; 0 = none",
                         check=NON_NEGATIVE)
    lr: float = option(0.01, "initial learning rate of the final fine-tune", check=POSITIVE)
    distill: bool = option(False, "train against the unpruned base model's softened logits (Hinton et al.)")
    distill_weight: float = option(0.5, "weight w of the distillation term: (1 - w) CE + w T^2 KL",
                                   check=Range(0, 1))
    temperature: float = option(4.0, "distillation temperature T", check=POSITIVE)
    candidates: int = option(1, "the best distinct trials within the MACs target (by trial validation accuracy) "
                             "that each get the final fine-tune; the best final validation accuracy is kept",
                             check=AT_LEAST_ONE)
    heuristics: bool = option(False, "also give the final to every warm-start heuristic's trial within the "
                              "MACs target")


@dataclass(frozen=True)
class FidelitySection(Section):
    """Two-stage (multi-fidelity) search, ``search.two_stage``: ``trials`` policies scored cheaply
    (``proxy_epochs`` on ``proxy_data_fraction`` of the training split, validation only), then the
    ``promote`` best of them within the MACs target, and the warm start's heuristics, at full fidelity."""

    section: ClassVar[str] = "fidelity"
    promote: int = option(0, "proxies promoted to the full fine-tune (the searched policies' best by proxy "
                          "validation accuracy within the MACs target; the heuristics too); 0 = one stage",
                          check=NON_NEGATIVE)
    proxy_epochs: int = option(1, "fine-tuning epochs of a stage-1 (proxy) trial; 0 = BatchNorm recalibration "
                               "only", check=NON_NEGATIVE)
    proxy_data_fraction: float = option(0.25, "fraction of the training split a proxy trial fine-tunes on",
                                        check=FRACTION)

    def check_search(self, cfg: Any) -> None:
        if not self.promote:
            return
        spec = METHODS.get(cfg.method)
        if spec is not None and (spec.kind == "learner" or cfg.method in TWO_STAGE_REFUSED):
            why = ("learns its policy rather than proposing policies to rank" if spec.kind == "learner"
                   else TWO_STAGE_REFUSED[cfg.method])
            raise UserError(f"config key 'fidelity.promote' is {self.promote}, but {cfg.method} {why}; "
                            "use --method optuna or random for a two-stage search, or set fidelity.promote=0")
        if self.promote > cfg.trials:
            raise UserError(f"config key 'fidelity.promote' is {self.promote}, more than the {cfg.trials} proxy "
                            f"trials of 'trials'; promote at most {cfg.trials}, or raise --trials")
        if cfg.scheduler == "asha":
            raise UserError("config key 'scheduler' is asha, but a two-stage search (fidelity.promote > 0) runs its "
                            "promoted trials to the end; set --set scheduler=auto (or none)")
        if self.proxy_epochs > cfg.finetune.epochs or (self.proxy_epochs == cfg.finetune.epochs
                                                       and self.proxy_data_fraction == 1.0):
            raise UserError(f"config key 'fidelity.proxy_epochs' is {self.proxy_epochs} on "
                            f"{self.proxy_data_fraction:g} of the data, no cheaper than the full fine-tune "
                            f"(finetune.epochs {cfg.finetune.epochs}); lower fidelity.proxy_epochs or "
                            "fidelity.proxy_data_fraction")


# Methods a two-stage search refuses, and why (learners are refused by kind).
TWO_STAGE_REFUSED = {
    "uniform": "proposes one policy, so there is nothing to rank",
    "global": "proposes one policy, so there is nothing to rank",
    "arpruning": "scores its neighbours with its own proxy (arpruning.proxy)",
}


@dataclass(frozen=True)
class SpaceSection(Section):
    """How the search space rounds channel counts, whether depth is searched, and the coordinates a
    policy is sampled in (``methods.parameterisation``)."""

    section: ClassVar[str] = "space"
    round_to: int = option(1, "kept channels are rounded to a multiple of this", check=AT_LEAST_ONE)
    min_channels: int = option(1, "fewest channels a group keeps", check=AT_LEAST_ONE)
    search_depth: bool = option(False, "optuna and random also propose dropping residual blocks")
    parameterisation: str = option("groups", "the coordinates optuna and random sample a policy in: groups "
                                   "(a keep ratio per group), stages (per residual stage, in and out of "
                                   "its blocks), affine (LeGR: per-group scale and shift of the global "
                                   "ranking)", choices=PARAMETERISATIONS)

    def check_search(self, cfg: Any) -> None:
        """Only the methods that sample a policy space (optuna, random) take a parameterisation."""
        spec = METHODS.get(cfg.method)
        if self.parameterisation != "groups" and spec is not None and not spec.parameterised:
            raise UserError(f"config key 'space.parameterisation' is {self.parameterisation}, but method "
                            f"{cfg.method} samples no policy space (optuna and random do); set "
                            "--set space.parameterisation=groups, or --method optuna")


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
                raise UnknownKey(name, list(METHOD_SECTIONS), "")
        return cls(
            tuple(
                (name, coerce(given.get(name), options, name)) for name, options in METHOD_SECTIONS.items()
            )
        )

    @classmethod
    def coerce_section(cls, value: Any) -> MethodSections:
        """``value`` as the config's method sections (for the schema's field coercion)."""
        return value if isinstance(value, MethodSections) else cls.of(value)

    @classmethod
    def describe_sections(cls) -> list[KeyDoc]:
        """The reference rows of every method section, each under its section name."""
        return [row for name, options in METHOD_SECTIONS.items() for row in describe_section(options, name)]

    def __getitem__(self, name: str) -> Any:
        for key, options in self.entries:
            if key == name:
                return options
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a YAML value (lists as tuples, mappings as sorted item tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((key, _frozen(inner)) for key, inner in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(inner) for inner in value)
    return value


class ModelArgs(Mapping):
    """The keyword arguments of the user's model factory (``model_args.KEY``): any keys, YAML values.

    Read by ``pruning.models.create_model`` for a model reference (``package.module:factory``); a
    registry model takes none.
    """

    def __init__(self, entries: Mapping[str, Any] | None = None):
        self._entries = dict(entries or {})

    @classmethod
    def coerce_section(cls, value: Any) -> ModelArgs:
        """``value`` (a mapping or null) as the factory's arguments, for the schema's field coercion."""
        if isinstance(value, ModelArgs):
            return value
        if value is None:
            return cls()
        if not isinstance(value, Mapping) or not all(isinstance(key, str) and key for key in value):
            raise UserError(f"config key 'model_args' must map argument names to values, got {value!r}; "
                            "set them with --set model_args.KEY=VALUE")
        return cls(value)

    @classmethod
    def describe_sections(cls) -> list[KeyDoc]:
        return [KeyDoc(key="model_args.KEY", type="any", default=None, rule="",
                       doc="keyword argument KEY of the model factory (a model reference only)")]

    def __getitem__(self, key: str) -> Any:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __hash__(self) -> int:
        return hash(tuple(sorted((key, _frozen(value)) for key, value in self._entries.items())))

    def __repr__(self) -> str:
        return f"ModelArgs({self._entries!r})"


# ----------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchConfig(Section):
    """One search, fully specified: what to prune, how to search, where to run and record it."""

    name: str | None = option(
        None, "run name, the run directory under storage; null = <method>-<model>-<dataset>-<time>"
    )
    seed: int = option(
        0, "seed of the data splits, the base model and the searcher", check=Range(0, 2**32 - 1)
    )
    model: str = option(
        "small_cnn", "model name from pruning.models, or your own: package.module:factory, "
        "path/to/file.py:factory (recorded by absolute path) or torchvision:NAME"
    )
    model_args: ModelArgs = field(
        default_factory=ModelArgs,
        metadata={"doc": "model factory arguments", "check": None, "choices": (), "from_config": None},
    )
    weights: str | None = option(
        None, "state_dict file of the model's trained weights (loaded with weights_only=True); set, the base "
        "model is not pretrained; null = pretrain it"
    )
    dataset: DatasetSection = section_field(DatasetSection, "the data")
    pretrain: PretrainSection = section_field(PretrainSection, "the base model's training recipe")
    finetune: FinetuneSection = section_field(FinetuneSection, "each trial's recovery training")
    method: str = option("optuna", "pruning method from methods.registry")
    importance: str | None = option(
        None, "channel importance criterion from pruning.importance; null = the method's own "
        f"({_OWN_CRITERIA})"
    )
    macs_target: float = option(0.5, "kept fraction of the base model's MACs", check=FRACTION)
    macs_tolerance: float = option(
        0.02, "how far over the MACs target a policy may be", check=TOLERANCE
    )
    objective: str = option(
        "constrained",
        "constrained: best accuracy within the MACs target; pareto: accuracy against MACs",
        choices=OBJECTIVES,
    )
    trials: int = option(16, "number of trials", check=AT_LEAST_ONE)
    concurrency: int = option(2, "trials running at once", check=AT_LEAST_ONE)
    scheduler: str = option(
        "auto", f"trial scheduler; auto = asha when finetune.epochs >= {ASHA_MIN_EPOCHS}", choices=SCHEDULERS
    )
    warm_start: bool = option(True, "optuna and random first evaluate the heuristics (uniform, global with "
                              "the criterion, global LAMP), so the search's best is never below them")
    calibration_batches: int = option(
        4, "training batches fed to data-driven importance criteria", check=AT_LEAST_ONE
    )
    resources: ResourcesSection = section_field(ResourcesSection, "what each trial reserves")
    storage: str = option("runs", "folder holding the run directories (local, or a shared file system for a cluster; a URI goes in ray_storage)")
    ray_storage: str | None = option(
        None, "URI where Ray Tune keeps experiment state and trial checkpoints (s3://bucket/prefix), for "
        "clusters without a shared file system; null = the run directory"
    )
    tracking_uri: str | None = option(None, "MLflow tracking URI; null = sqlite:///<storage>/mlflow.db")
    experiment: str = option("prunetune", "MLflow experiment name")
    address: str | None = option(None, "Ray address to join; null = start a local Ray")
    max_failures: int = option(2, "retries of a failed trial from its last checkpoint", check=NON_NEGATIVE)
    checkpoint_min_s: float = option(
        30.0, "seconds of a trial's work since its last checkpoint (or its start) before an intermediate epoch "
        "is checkpointed; shorter work is redone on a retry; 0 = every epoch; the last epoch always is",
        check=NON_NEGATIVE
    )
    val_subset: float = option(
        1.0, "fraction of the validation split a trial's intermediate epochs score on (fixed by the seed); "
        "its last report is always on the whole split", check=FRACTION
    )
    test_eval: str = option(
        "reportable", "reportable: the test split is scored at the search's end for the Pareto front and the "
        "best trial only; all: every full trial scores it as it ends", choices=TEST_EVALS
    )
    space: SpaceSection = section_field(SpaceSection, "the search space's channel rounding")
    final: FinalSection = section_field(FinalSection, "the final fine-tune of the best policy")
    fidelity: FidelitySection = section_field(FidelitySection, "two-stage search: cheap proxies, the best "
                                              "promoted to the full fine-tune")
    methods: MethodSections = field(
        default_factory=MethodSections.of,
        metadata={"doc": "method options", "check": None, "choices": (), "from_config": None},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name is not None and not _SAFE_NAME.fullmatch(self.name):
            raise UserError(
                f"config key 'name' is {self.name!r}, not a safe directory name; use letters, digits, '-', "
                "'_' and '.' (starting with a letter or digit, at most 128 characters), or null for the default"
            )
        for key in ("storage", "experiment", "model", "method", "importance", "weights"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise UserError(f"config key '{key}' is empty; give it a value")
        from prunetune.pruning.user_models import canonical_reference

        object.__setattr__(self, "model", canonical_reference(self.model))
        if canonical_reference(self.dataset.name) != self.dataset.name:
            object.__setattr__(self, "dataset", replace(self.dataset, name=canonical_reference(self.dataset.name)))
        if self.weights is not None:
            object.__setattr__(self, "weights", str(Path(self.weights).expanduser().resolve()))
        if self.ray_storage is not None and "://" not in self.ray_storage:
            raise UserError(
                f"config key 'ray_storage' is {self.ray_storage!r}, not a URI; give one such as s3://bucket/prefix, "
                "or leave it null and put a shared directory in storage"
            )
        for options in self.methods.values():
            options.check_search(self)
        self.fidelity.check_search(self)
        self.space.check_search(self)
        if self.scheduler == "asha" and self.finetune.epochs < 2:
            raise UserError(
                f"config key 'scheduler' is asha but finetune.epochs is {self.finetune.epochs}: ASHA stops "
                "trials between epochs; set finetune.epochs >= 2 or --set scheduler=none"
            )

    @property
    def method_options(self) -> Any:
        """The chosen method's options, ready for its factory: its section (defaults for a method
        without one), with the fields the search fills (``from_config``) set from this config."""
        spec = METHODS.get(self.method)
        if spec is None:
            return None
        options = self.methods[spec.section] if spec.section is not None else spec.options()
        filled = {}
        for spec_field in fields(options):
            source = spec_field.metadata.get("from_config")
            if source == "importance":
                filled[spec_field.name] = resolved_importance(self)
            elif source is not None:  # a key, or a dotted path into a section (space.search_depth)
                filled[spec_field.name] = functools.reduce(getattr, source.split("."), self)
        changed = {name: value for name, value in filled.items() if getattr(options, name) != value}
        return replace(options, **changed) if changed else options


def check_names(cfg: SearchConfig) -> None:
    """Check the model, dataset, importance criterion and method against their registries.

    The registries import torch, so this runs apart from the structural checks; ``load_config``
    and ``config_from_dict`` call it unless told not to.
    """
    from prunetune.methods.registry import method_names
    from prunetune.pruning.data import dataset_names
    from prunetune.pruning.importance import criterion_names
    from prunetune.pruning.models import model_names
    from prunetune.pruning.user_models import is_reference

    for key, value, valid, what in (
        ("model", cfg.model, [cfg.model] if is_reference(cfg.model) else model_names(), "model"),
        ("dataset.name", cfg.dataset.name,
         [cfg.dataset.name] if is_reference(cfg.dataset.name) else dataset_names(), "dataset"),
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
            out.update({name: section_dict(options) for name, options in value.items()})
        elif isinstance(value, ModelArgs):
            out[spec.name] = dict(value)
        elif spec.metadata.get("from_config"):
            continue
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
    try:
        for key in core:
            if key not in valid:
                raise UnknownKey(key, valid, "")
        methods = MethodSections.of({key: value for key, value in data.items() if key in METHOD_SECTIONS})
        cfg = SearchConfig(**core, methods=methods)
    except UnknownKey as unknown:  # the schema knows one section; this adds hints from the whole config
        raise _unknown_key(unknown.key, unknown.valid, unknown.prefix) from None
    if names:
        check_names(cfg)
    return cfg


def flatten_config(cfg: SearchConfig) -> dict[str, Scalar]:
    """``{"finetune.epochs": 3, "optuna.sampler": "tpe", ...}``: every leaf under its dotted key."""

    def walk(tree: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Scalar]]:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                yield from walk(value, join_key(prefix, key))
            else:
                yield join_key(prefix, key), value

    return dict(walk(config_to_dict(cfg), ""))


def describe_config() -> list[KeyDoc]:
    """Every key of the config, in config order: the reference table, and the keys errors suggest."""
    return describe_section(SearchConfig, "")


def declared_rule(key: str) -> tuple[Range, str]:
    """The range and the meaning config key ``key`` declares (``seed``, ``pretrain.epochs``): what a
    command's flag for the same value checks (``search.commands.common.declared_int``)."""
    cls: Any = SearchConfig
    *sections, leaf = key.split(".")
    for name in sections:
        cls = {spec.name: spec for spec in fields(cls)}[name].default_factory
    spec = {spec.name: spec for spec in fields(cls)}[leaf]
    return spec.metadata["check"], spec.metadata["doc"]


def resolved_importance(cfg: SearchConfig) -> str:
    """The criterion trials rank channels by: ``importance``, or when null the method's default."""
    if cfg.importance is not None:
        return cfg.importance
    spec = METHODS.get(cfg.method)
    return spec.default_importance if spec is not None else "l1"


def resolved_scheduler(cfg: SearchConfig) -> str:
    """The trial scheduler to use: ``"asha"`` or ``"none"`` (auto: asha from ASHA_MIN_EPOCHS fine-tuning
    epochs, none in a two-stage search: its promoted trials were chosen to run to the end)."""
    if cfg.scheduler == "auto":
        return "asha" if cfg.finetune.epochs >= ASHA_MIN_EPOCHS and not cfg.fidelity.promote else "none"
    return cfg.scheduler


def default_run_name(cfg: SearchConfig, now: datetime) -> str:
    """``<method>-<model>-<dataset>-<YYYYmmdd-HHMMSS>``, made safe as a directory name."""
    from prunetune.pruning.user_models import short_name

    raw = f"{cfg.method}-{short_name(cfg.model)[:40]}-{short_name(cfg.dataset.name)[:40]}-{now:%Y%m%d-%H%M%S}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", raw)


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
    saved: bool = False,
) -> SearchConfig:
    """Load, merge and validate a config. Precedence, lowest first: schema defaults < the file <
    ``overrides`` (the CLI's flags, as dotted keys; every key given is applied, so leave out flags
    the user did not pass) < ``sets`` (``--set KEY=VALUE``).

    ``path`` is a YAML file, the name of a shipped config (``cifar10``), or None for the shipped
    default (``search/configs/default.yaml``). ``names=False`` skips :func:`check_names`.
    ``saved=True`` reads a run's own resolved ``config.yaml``, which may hold a retired key
    (``RETIRED_KEYS``) that an earlier version wrote: it is dropped, not refused.
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
    if saved:
        _drop_retired(tree)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value, "flag")
    for item in sets:
        _set_dotted(tree, *parse_set(item), "--set")
    return config_from_dict(tree, names=names)


def dump_config(cfg: SearchConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML that :func:`load_config` reads back to an equal config."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    Path(path).write_text("# prunetune search config (resolved)\n" + text, encoding="utf-8")
