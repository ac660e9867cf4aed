"""Before any trial: the data, the trained base model (cached), its space and measurements.

Shared by ``prunetune run``, ``resume`` and ``prune``. The base model is trained once per model,
data, recipe and seed and cached on disk (``pruning.train.pretrain``); trials load it, never
retrain it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prunetune.pruning.errors import UserError

Log = Callable[[str], None]


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """Where base models are cached: $PRUNETUNE_CACHE, else ~/.cache/prunetune."""
    return Path(os.environ.get("PRUNETUNE_CACHE") or Path.home() / ".cache" / "prunetune").expanduser()


def resolve_device(name: str, *, gpus: float = 1.0) -> str:
    """'cpu' or 'cuda': 'auto' picks the GPU where one is present and reserved."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but no CUDA device is available; use device cpu or auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() and gpus > 0 else "cpu"
    return name


def trial_device(name: str, *, gpus: float) -> str:
    """The torch device of every trial: 'cuda' when a trial reserves GPUs (unless 'cpu' is asked), else 'cpu'.

    Decided without looking at this machine's GPUs: on a cluster the trials run on nodes that have
    them and the driver's may have none. Ray shows a trial only the GPUs it was given (through
    CUDA_VISIBLE_DEVICES), so 'cuda' is the trial's own GPU, shared when the reservation is a fraction.
    """
    return "cuda" if gpus > 0 and name != "cpu" else "cpu"


@dataclass(frozen=True)
class BaseModel:
    """The trained base model with its data, space and baseline measurements."""

    model: object  # torch.nn.Module
    splits: object  # pruning.data.Splits
    space: object  # pruning.space.SearchSpace
    metrics: dict  # val_accuracy, test_accuracy, macs, params, latency_ms
    arch: dict  # {"name", "num_classes", "in_channels"[, "model_args"]}: pruning.models.create_from_arch


def model_space(model_name: str, info, *, round_to: int = 1, min_channels: int = 1, model_args=None,
                weights: str | None = None, importance: str | None = None):
    """The search space of a freshly built ``model_name`` for the dataset's classes, channels and size;
    ``weights`` (the user's state_dict file) are checked against that model here, before Ray starts,
    and so is the ``importance`` criterion (bn_scale needs BatchNorm: ``check_criterion_fits``)."""
    from prunetune.pruning.dependency import build_space
    from prunetune.pruning.importance import check_criterion_fits
    from prunetune.pruning.models import create_model
    from prunetune.pruning.user_models import load_weights

    model = create_model(model_name, num_classes=info.num_classes, in_channels=info.in_channels,
                         model_args=dict(model_args or {}))
    if weights is not None:
        load_weights(model, weights, model_name=model_name)
    shape = (info.in_channels, info.image_size, info.image_size)
    space = build_space(model, model_name, shape, round_to=round_to, min_channels=min_channels)
    if importance is not None:
        check_criterion_fits(importance, model, space, model_name=model_name)
    return space


def prepare_base_model(model_name: str, splits, recipe, *, seed: int, cache_dir: Path, data_key: str,
                       device: str, space=None, log: Log = log_to_stderr, latency_threads: int = 1,
                       model_args=None, weights: str | None = None) -> BaseModel:
    """Train (or load from the cache) the base model and measure it: MACs, params, latency (on
    ``latency_threads`` torch threads on a CPU: the trials' own count, so their latency ratios hold).

    With ``weights`` (the user's state_dict file) nothing is trained: the model is built, given
    those weights and evaluated on the data as given.
    """
    from prunetune.pruning.train import pretrain, pretrain_path

    model_args = dict(model_args or {})
    if weights is not None:
        model, metrics = given_weights_model(model_name, splits, weights, device=device, model_args=model_args)
        log(f"base model: {model_name} with the weights of {weights} (not pretrained)")
        return _measured_base(model, metrics, model_name, splits, space, device, log, latency_threads,
                              model_args, cached=False)
    path = pretrain_path(model_name, data_key, recipe, seed, cache_dir, model_args)
    cached = path.exists()
    if not cached:
        from prunetune.search.commands.common import check_before_pretraining

        check_before_pretraining(cache_dir, splits)
        log(f"base model: training {model_name} on {splits.info.name} ({len(splits.train)} images) for "
            f"{recipe.epochs} epochs on {device}; it is cached as {path}")

    def on_epoch(report) -> None:
        log(f"  pretrain epoch {report.epoch + 1}/{recipe.epochs}: loss {report.train_loss:.4f}, "
            f"val accuracy {report.val_accuracy:.4f} ({report.seconds:.1f} s)")

    model, metrics = pretrain(model_name, splits, recipe, seed=seed, cache_dir=cache_dir, dataset_key=data_key,
                              device=device, on_epoch=on_epoch, model_args=model_args)
    return _measured_base(model, metrics, model_name, splits, space, device, log, latency_threads, model_args,
                          cached=cached)


def given_weights_model(model_name: str, splits, weights: str, *, device: str, model_args=None):
    """The model built for the data with the user's ``weights``, and its val and test accuracy."""
    from prunetune.pruning.models import create_model
    from prunetune.pruning.train import evaluate
    from prunetune.pruning.user_models import load_weights

    info = splits.info
    model = create_model(model_name, num_classes=info.num_classes, in_channels=info.in_channels,
                         model_args=dict(model_args or {}))
    load_weights(model, weights, model_name=model_name)
    model = model.to(device).eval()
    val_accuracy, val_loss = evaluate(model, splits.val, device=device)
    test_accuracy, _ = evaluate(model, splits.test, device=device)
    return model, {"val_accuracy": val_accuracy, "test_accuracy": test_accuracy, "val_loss": val_loss}


def _measured_base(model, metrics, model_name, splits, space, device, log, latency_threads, model_args, *,
                   cached: bool) -> BaseModel:
    """The base model measured (MACs, params, latency), with its space and its ``arch`` for rebuilding."""
    from prunetune.pruning.dependency import build_space
    from prunetune.pruning.measure import measure

    info = splits.info
    shape = (info.in_channels, info.image_size, info.image_size)
    if space is None:
        space = build_space(model, model_name, shape)
    measured = measure(model, shape, batch_size=64, device=device, repeats=10, threads=latency_threads)
    metrics = {"val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"],
               "macs": measured.macs, "params": measured.params, **measured.latency.to_json()}
    from prunetune.search.summary import human_count

    log(f"base model{' (cached)' if cached else ''}: val accuracy {metrics['val_accuracy']:.4f}, "
        f"test accuracy {metrics['test_accuracy']:.4f}, {human_count(measured.macs)} MACs, "
        f"{human_count(measured.params)} params")
    from prunetune.pruning.user_models import portable_name

    # a model registered at run time is rebuilt in Ray workers, and by load_pruned, from its builder's module
    arch = {"name": portable_name(model_name), "num_classes": info.num_classes, "in_channels": info.in_channels}
    if model_args:
        arch["model_args"] = dict(model_args)
    return BaseModel(model, splits, space, metrics, arch)
