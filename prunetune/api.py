"""The Python API: the same search as ``prunetune run``, and pruning and loading a model by hand.

- :class:`Search` takes a model (a registry name, a reference such as ``torchvision:resnet18``, or
  your own ``nn.Module`` class, factory function or instance), a dataset (a name, a reference, or a
  factory function), and any config keys; its ``run()`` runs the Ray Tune search of
  ``prunetune run`` and returns a :class:`SearchResult`.
- :func:`prune` prunes a model to a policy (or a uniform keep ratio) with Torch-Pruning, no search.
- :func:`load_pruned` rebuilds a saved pruned model: ``model, info = load_pruned(path)``.

A class or function is passed to the Ray workers by reference (``module:name``, or the file of the
script that defines it), never pickled: the workers import it. A script that defines its model and
runs a :class:`Search` must therefore guard the call with ``if __name__ == "__main__":``.

torch, ray and mlflow are imported inside the functions, so ``import prunetune`` stays cheap.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prunetune.pruning.errors import UserError
from prunetune.pruning.user_models import reference_of


@dataclass(frozen=True)
class SearchResult:
    """What a finished search returns: its run directory, ``summary.json`` and the best policy."""

    run_dir: Path
    summary: dict
    best_policy: Any  # pruning.policy.Policy, or None when no trial met the MACs target

    @property
    def best(self) -> dict | None:
        """The best trial within the MACs target: trial_id, accuracies, MACs, params, ratios."""
        return self.summary.get("best")

    def load_best(self):
        """The best trial's pruned and fine-tuned model (an ``nn.Module``, in eval mode)."""
        return self.load_trial("best")

    def load_trial(self, trial: str):
        """Trial ``trial``'s (an id, or 'best') pruned and fine-tuned model, checked against its record."""
        from prunetune.search.commands.export_cmd import _checkpoint_model, find_trial, load_checked
        from prunetune.search.trial import CHECKPOINT_MODEL

        record = find_trial(self.run_dir, trial)
        with tempfile.TemporaryDirectory(prefix="prunetune-load-") as fetched:
            source = _checkpoint_model(self.run_dir, record, Path(fetched), CHECKPOINT_MODEL)
            model, _ = load_checked(self.run_dir, record, source)
        return model.eval()


def _model_keys(model: Any, weights: str | None, scratch: Path) -> dict:
    """The config keys ``model`` (and ``weights``) stand for; an instance's weights go to a file."""
    from torch import nn

    if isinstance(model, str):
        return {"model": model, "weights": weights}
    if isinstance(model, nn.Module):
        import torch

        if weights is not None:
            raise UserError("pass weights= or a model instance (whose weights are used), not both")
        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / f"{type(model).__name__}-weights.pt"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
        return {"model": reference_of(type(model)), "weights": str(path)}
    if callable(model):
        return {"model": reference_of(model), "weights": weights}
    raise UserError(f"model must be a name, a reference, an nn.Module or a factory, got {type(model).__name__}")


class Search:
    """A pruning-policy search, as ``prunetune run`` runs it: built (and its config validated) here,
    run by :meth:`run`.

    ``model``: a registry name, ``package.module:factory``, ``path/to/file.py:factory``,
    ``torchvision:NAME``, or a module-level ``nn.Module`` class or factory (called with
    ``model_args`` and, where it takes them, ``num_classes`` and ``in_channels``), or an instance
    of such a class (its current weights are the base model's: nothing is pretrained).
    ``dataset``: a dataset name, a reference, or a module-level factory returning
    ``(train, val, test)``. ``weights``: a state_dict file of the trained model. ``keys``: any
    config keys, nested ones with ``__`` or as mappings: ``finetune__epochs=1`` or
    ``finetune={"epochs": 1}``. ``config``: a YAML config the keys override.

    (It is ``prunetune.Search``, not ``prunetune.search``: that name is the ``search`` package.)
    """

    def __init__(self, model: Any, dataset: Any = "digits", *, model_args: Mapping[str, Any] | None = None,
                 weights: str | None = None, config: str | Path | None = None,
                 cache_dir: str | Path | None = None, **keys: Any):
        from dataclasses import replace

        from prunetune.search.config import default_run_name, load_config
        from prunetune.search.prepare import default_cache_dir

        overrides: dict[str, Any] = {}
        for key, value in keys.items():
            _flatten(key.replace("__", "."), value, overrides)
        storage = Path(overrides.get("storage", "runs")).expanduser().resolve()
        overrides["storage"] = str(storage)
        model_keys = _model_keys(model, weights, storage / ".prunetune-api")
        overrides["model"] = model_keys["model"]
        if model_keys["weights"] is not None:
            overrides["weights"] = str(model_keys["weights"])
        overrides["dataset.name"] = dataset if isinstance(dataset, str) else reference_of(dataset, "dataset")
        for name, value in (model_args or {}).items():
            overrides[f"model_args.{name}"] = value
        cfg = load_config(config, overrides=overrides)
        self.config = cfg if cfg.name else replace(cfg, name=default_run_name(cfg, datetime.now()))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.run_dir = storage / self.config.name

    def run(self, log: Callable[[str], None] | None = None) -> SearchResult:
        """Run the search (Ray Tune, MLflow, the run directory: as the CLI) and return its result;
        progress goes to ``log`` (default: stderr)."""
        from prunetune.search.driver import start_search
        from prunetune.search.prepare import log_to_stderr

        status = start_search(self.config, cache_dir=self.cache_dir, log=log or log_to_stderr)
        if status != 0:
            raise RuntimeError(f"the search {self.run_dir} ended with status {status}; see its output above")
        return read_result(self.run_dir)


def _flatten(key: str, value: Any, out: dict) -> None:
    if isinstance(value, Mapping) and key != "model_args":
        for name, inner in value.items():
            _flatten(f"{key}.{name}", inner, out)
    elif isinstance(value, Mapping):
        for name, inner in value.items():
            out[f"model_args.{name}"] = inner
    else:
        out[key] = value


def read_result(run_dir: str | Path) -> SearchResult:
    """The result of the finished search in ``run_dir`` (its ``summary.json``)."""
    import json

    from prunetune.pruning.policy import Policy
    from prunetune.tracking.rundir import SUMMARY_FILE

    run_dir = Path(run_dir).expanduser().resolve()
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} holds no finished search ({SUMMARY_FILE} is missing); resume it first")
    summary = json.loads(path.read_text(encoding="utf-8"))
    best = summary.get("best")
    policy = Policy.from_json(best["policy"]) if best and best.get("policy") else None
    return SearchResult(run_dir, summary, policy)


def prune(model, policy, *, importance: Any = "l1", calib=None, input_shape: tuple[int, ...] | None = None):
    """A physically smaller copy of ``model`` (left untouched) pruned with Torch-Pruning to ``policy``:
    a keep ratio for every group (a float), a ``{group: keep_ratio}`` mapping, a ``Policy``, or a policy
    JSON file. ``importance``: a criterion name (``l1``, ``bn_scale``, ``taylor``, ...) or callable;
    ``calib``: calibration batches ``[(x, y), ...]`` for data-driven criteria. ``input_shape``
    (``(C, H, W)``) is read off ``calib`` when not given. No BatchNorm recalibration, no training.
    """
    from prunetune.pruning.dependency import build_space
    from prunetune.pruning.policy import Policy
    from prunetune.pruning.surgery import prune as prune_model

    if input_shape is None:
        if not calib:
            raise UserError("prune needs input_shape=(C, H, W) or calib batches to trace the model")
        input_shape = tuple(calib[0][0].shape[1:])
    space = build_space(model, type(model).__name__, tuple(input_shape))
    if isinstance(policy, int | float):
        chosen = Policy.uniform(space, float(policy))
    elif isinstance(policy, Policy):
        chosen = Policy(policy.keep_ratios, policy.dropped_blocks, space.space_id)
    elif isinstance(policy, Mapping):
        chosen = Policy(dict(policy), (), space.space_id)
    else:
        loaded = Policy.load(policy)
        chosen = Policy(loaded.keep_ratios, loaded.dropped_blocks, space.space_id)
    chosen.validate(space)
    return prune_model(model, space, chosen, importance=importance, calib=calib)


def load_pruned(path: str | Path, map_location: str = "cpu"):
    """Rebuild a pruned model saved by ``prunetune prune --out`` or ``export``: ``(model, meta)``,
    ``meta`` holding ``arch``, ``space``, ``policy`` and ``extra``. A user's model is rebuilt from
    its recorded reference (a file by absolute path: another machine needs the same file there)."""
    from prunetune.pruning.surgery import load_pruned as load

    return load(path, map_location=map_location)
