"""What several commands share: the model and data arguments, the device, the cache, the base model.

Arguments are registered by small ``add_*`` functions, so every command spells an option the same
way. The helpers turn parsed arguments into the pruning core's values: the dataset splits, the
search space of a fresh model, and the trained base model, pretrained once and then loaded from
the cache (keyed by model, data, recipe and seed). Progress goes to stderr, so stdout carries only
a command's result. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from prunetune.pruning.errors import UserError
from prunetune.pruning.recipe import PRETRAIN_EPOCHS

if TYPE_CHECKING:
    from torch import nn

    from prunetune.pruning.data import DatasetInfo, Splits
    from prunetune.pruning.space import SearchSpace
    from prunetune.pruning.train import EpochReport, TrainRecipe

CACHE_ENV = "PRUNETUNE_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/prunetune"
DEVICES = ("auto", "cpu", "cuda")


# ----------------------------------------------------------------------------------------------
# Argument types and arguments
# ----------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def declared_int(key: str):
    """An argparse type: an integer within the range config key ``key`` declares (``search.config``),
    so a flag refuses what the config refuses, for every command that takes it. The config is read
    when the flag is parsed, not when the parser is built: ``--help`` stays quick."""

    def parse(text: str) -> int:
        from prunetune.search.config import declared_rule

        value = _integer(text)
        rule, doc = declared_rule(key)
        if not rule(value):
            raise argparse.ArgumentTypeError(f"must be {rule.text()} ({doc.split(';')[0]}), got {value}")
        return value

    parse.__name__ = key  # argparse names a type by it in some messages
    return parse


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def default_cache_dir() -> str:
    """$PRUNETUNE_CACHE if set, else ~/.cache/prunetune."""
    return os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR


def add_model_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --dataset, --data-root, --image-size and --download: what a model is built for."""
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="model name (e.g. resnet20, small_cnn, tiny_resnet), or your own: "
                             "package.module:factory, path/to/file.py:factory, torchvision:NAME")
    parser.add_argument("--set", dest="model_sets", action="append", default=[], metavar="model_args.KEY=VALUE",
                        help="an argument of your model's factory (repeatable)")
    parser.add_argument("--dataset", required=True, metavar="NAME",
                        help="dataset name (digits, fashion-mnist, cifar10, cifar100, synthetic; imagefolder with "
                             "--data-root), or your own: package.module:factory, path/to/file.py:factory")
    parser.add_argument("--data-root", metavar="DIR", help="folder holding the dataset's files")
    parser.add_argument("--image-size", type=declared_int("dataset.image_size"), metavar="N",
                        help="resize images to N x N pixels (default: the dataset's own size)")
    add_download_argument(parser)


def add_download_argument(parser: argparse.ArgumentParser, **kwargs) -> None:
    """--download: fetch a missing dataset (where a network allows); the same flag on every command."""
    parser.add_argument("--download", action="store_true", default=False,
                        help="download the dataset if its files are missing (where a network allows)", **kwargs)


def add_base_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-fraction, --seed, --device, --cache-dir, --pretrain-epochs: how the base model is trained."""
    parser.add_argument("--data-fraction", type=float, default=1.0, metavar="F",
                        help="train on this fraction of the training split (default: 1.0)")
    parser.add_argument("--seed", type=declared_int("seed"), default=0, metavar="N",
                        help="seed of the splits and training (default: 0)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where to train and measure (default: auto, a GPU where present)")
    parser.add_argument("--cache-dir", default=default_cache_dir(), metavar="DIR",
                        help=f"cache of trained base models (default: ${CACHE_ENV} or {DEFAULT_CACHE_DIR})")
    parser.add_argument("--pretrain-epochs", type=declared_int("pretrain.epochs"), default=None,  # None: not given
                        metavar="N", help=f"epochs to train the base model (default: {PRETRAIN_EPOCHS})")
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="a state_dict of your trained model (torch.save(model.state_dict(), FILE)); "
                             "the base model is then not pretrained")


# ----------------------------------------------------------------------------------------------
# Checks that run before any data is loaded or anything is trained
# ----------------------------------------------------------------------------------------------


def check_model_name(name: str) -> str:
    """``name`` (a file reference made absolute); UserError listing the registered models unless it
    is one of them or a reference to the user's own model."""
    from prunetune.pruning.models import model_names
    from prunetune.pruning.user_models import canonical_reference, is_reference

    if is_reference(name):
        return canonical_reference(name)
    if name not in model_names():
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(model_names())}, or name your own: "
                        f"package.module:factory, path/to/file.py:factory or torchvision:NAME")
    return name


def model_args(args: argparse.Namespace) -> dict:
    """The model factory's arguments from ``--set model_args.KEY=VALUE``."""
    from prunetune.search.config import parse_set

    result = {}
    for item in getattr(args, "model_sets", []):
        key, value = parse_set(item)
        name = key.removeprefix("model_args.")
        if name == key or not name or "." in name:
            raise UserError(f"--set {key}: this command sets model_args.KEY only; e.g. --set model_args.width=16")
        result[name] = value
    return result


def check_cache_dir(path: str | Path) -> Path:
    """The cache folder, expanded; UserError if it exists as something other than a folder."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--cache-dir {path} is not a folder; pass a folder path (it is created if missing)")
    return folder


def check_before_pretraining(cache_dir: Path, splits: Splits) -> None:
    """What would fail after the base model's training, found before it: a cache that cannot take the
    model, an image file that cannot be read."""
    from prunetune.pruning.image_folder import check_image_files

    check_cache_writable(cache_dir)
    check_image_files(splits, log=progress)


def check_cache_writable(folder: Path) -> None:
    """Before a base model is trained into the cache (it is not there yet): UserError unless a folder can
    be made in ``folder``, or in its nearest existing parent when it is missing, so that this is said before
    the training, not after it. The probe is removed at once; a read-only cache that already holds the
    model is never probed."""
    existing = Path(folder).expanduser().absolute()
    try:
        while not existing.exists():
            existing = existing.parent
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".prunetune-probe-"))
    except OSError as error:
        verb = "written" if existing == Path(folder).expanduser().absolute() else "created"
        raise UserError(f"the base-model cache {folder} cannot be {verb} ({error.strerror or error}); pass a "
                        f"writable folder with --cache-dir DIR or ${CACHE_ENV}") from None


def check_output_file(path: str | None) -> Path | None:
    """The file to write, if any; UserError if its folder is missing or it names a folder."""
    if path is None:
        return None
    out = Path(path).expanduser()
    if out.is_dir():
        raise UserError(f"--out {path} is a folder; give a file path such as {out / 'pruned.pt'}")
    if not out.parent.is_dir():
        raise UserError(f"--out {path}: folder {out.parent} does not exist; create it first or write elsewhere")
    return out


def resolve_device(name: str) -> str:
    """'cpu' or 'cuda' for --device; 'auto' picks a GPU where one is present."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available; use --device cpu or auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ----------------------------------------------------------------------------------------------
# Data, space and the base model
# ----------------------------------------------------------------------------------------------


def load_splits(args: argparse.Namespace) -> Splits:
    """The dataset's train/val/test splits for --dataset, --data-root, --image-size (and, where the
    command has them, --seed and --data-fraction)."""
    from prunetune.pruning.data import load_dataset

    return load_dataset(args.dataset, root=args.data_root, seed=getattr(args, "seed", 0),
                        val_fraction=default_val_fraction(), data_fraction=getattr(args, "data_fraction", 1.0),
                        image_size=args.image_size, download=getattr(args, "download", False))


def input_shape(info: DatasetInfo) -> tuple[int, int, int]:
    """(channels, height, width) of one image of the dataset."""
    return (info.in_channels, info.image_size, info.image_size)


def build_model_space(model_name: str, info: DatasetInfo, model_args: dict | None = None, *,
                      importance: str | None = None) -> SearchSpace:
    """The search space of a freshly built ``model_name`` for the dataset's classes, channels and size;
    the ``importance`` criterion is checked against the model here, before any training."""
    from prunetune.search.prepare import model_space

    return model_space(model_name, info, model_args=model_args, importance=importance)


def default_val_fraction() -> float:
    """The validation fraction `prunetune run` uses by default: prune and space split the data alike."""
    from prunetune.search.config import DatasetSection

    return DatasetSection().val_fraction


def dataset_key(args: argparse.Namespace, info: DatasetInfo) -> str:
    """Names the training data in a cache file, as `prunetune run` names it (``pruning.train.dataset_cache_key``)."""
    from prunetune.pruning.train import dataset_cache_key

    return dataset_cache_key(info.name, info.image_size, args.data_fraction, default_val_fraction(),
                             args.data_root)


def pretrain_recipe(args: argparse.Namespace) -> TrainRecipe:
    """The base model's recipe: --pretrain-epochs of SGD with the default cosine schedule."""
    from prunetune.pruning.train import TrainRecipe

    return TrainRecipe(epochs=PRETRAIN_EPOCHS if args.pretrain_epochs is None else args.pretrain_epochs)


def pretrained_base(args: argparse.Namespace, splits: Splits, device: str) -> tuple[nn.Module, dict]:
    """The trained base model and its {val_accuracy, test_accuracy, val_loss}: from the cache, or
    trained now (progress on stderr) and cached. A corrupt cache file is a UserError naming it."""
    from prunetune.pruning.train import pretrain, pretrain_path
    from prunetune.pruning.user_models import check_weights_alone

    check_weights_alone(getattr(args, "weights", None), args.pretrain_epochs)
    if getattr(args, "weights", None):
        from prunetune.search.prepare import given_weights_model

        model, metrics = given_weights_model(args.model, splits, args.weights, device=device,
                                             model_args=model_args(args))
        progress(f"base model: {args.model} with the weights of {args.weights} (not pretrained): val accuracy "
                 f"{metrics['val_accuracy']:.4f}, test accuracy {metrics['test_accuracy']:.4f}")
        return model, metrics
    recipe = pretrain_recipe(args)
    key = dataset_key(args, splits.info)
    cache_dir = check_cache_dir(args.cache_dir)
    path = pretrain_path(args.model, key, recipe, args.seed, cache_dir, model_args(args))
    cached = path.exists()
    if not cached:
        check_before_pretraining(cache_dir, splits)
        progress(f"base model: training {args.model} on {splits.info.name} for {recipe.epochs} epochs "
                 f"({len(splits.train)} images) on {device}; caching it as {path}")
    model, metrics = pretrain(args.model, splits, recipe, seed=args.seed, cache_dir=cache_dir,
                              dataset_key=key, device=device, on_epoch=epoch_printer("pretrain", recipe.epochs),
                              model_args=model_args(args))
    progress(f"base model{f' (loaded from {path})' if cached else ''}: val accuracy {metrics['val_accuracy']:.4f}, "
             f"test accuracy {metrics['test_accuracy']:.4f}")
    return model, metrics


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def progress(message: str) -> None:
    """One progress line on stderr (stdout is kept for the command's result)."""
    print(message, file=sys.stderr, flush=True)


def epoch_printer(stage: str, epochs: int):
    """An ``on_epoch`` callback that prints one progress line per epoch."""

    def report(epoch: EpochReport) -> None:
        progress(f"{stage} epoch {epoch.epoch + 1}/{epochs}: loss {epoch.train_loss:.4f}, "
                 f"train accuracy {epoch.train_accuracy:.4f}, val accuracy {epoch.val_accuracy:.4f} "
                 f"({epoch.seconds:.1f} s)")

    return report
