"""`prunetune run [CONFIG.yaml] [flags]`: a new search.

With no config the embedded default runs (search/configs/default.yaml). Flags override the file,
and ``--set key=value`` overrides both, for any config key (README, "Configuration").
"""

from __future__ import annotations

import argparse

from prunetune.search.commands.common import add_download_argument, declared_int, positive_float, positive_int

NAME = "run"

# flag -> (config key, type, help)
FLAGS = {
    "--name": ("name", str, "run name: the run directory under --storage"),
    "--model": ("model", str, "model name (see `prunetune space --help`), or your own: package.module:factory, "
                "path/to/file.py:factory, torchvision:NAME (its arguments: --set model_args.KEY=VALUE)"),
    "--weights": ("weights", str, "a state_dict of your trained model; the base model is then not pretrained"),
    "--dataset": ("dataset.name", str, "dataset name"),
    "--data-root": ("dataset.root", str, "folder holding the dataset's files"),
    "--image-size": ("dataset.image_size", declared_int("dataset.image_size"), "image side in pixels"),
    "--method": ("method", str, "pruning method (the list above)"),
    "--importance": ("importance", str, "channel importance criterion"),
    "--macs-target": ("macs_target", positive_float, "kept fraction of the base model's MACs, in (0, 1]"),
    "--objective": ("objective", str, "constrained or pareto"),
    "--trials": ("trials", positive_int, "number of trials"),
    "--concurrency": ("concurrency", positive_int, "trials running at once"),
    "--finetune-epochs": ("finetune.epochs", int, "fine-tuning epochs per trial"),
    "--pretrain-epochs": ("pretrain.epochs", declared_int("pretrain.epochs"), "base model training epochs"),
    "--data-fraction": ("dataset.data_fraction", positive_float, "fraction of the training split used"),
    "--scheduler": ("scheduler", str, "asha, none or auto"),
    "--cpus-per-trial": ("resources.cpus_per_trial", positive_float, "CPUs per trial"),
    "--gpus-per-trial": ("resources.gpus_per_trial", float, "GPUs per trial (fractions share a GPU)"),
    "--storage": ("storage", str, "folder holding run directories"),
    "--tracking-uri": ("tracking_uri", str, "MLflow tracking URI (default: sqlite in --storage)"),
    "--ray-storage": ("ray_storage", str, "URI for Ray's experiment state and checkpoints (s3://bucket/prefix)"),
    "--experiment": ("experiment", str, "MLflow experiment name"),
    "--address": ("address", str, "Ray cluster address to join (default: start a local Ray)"),
    "--seed": ("seed", declared_int("seed"), "seed of data splits, base model and searcher"),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from prunetune.methods.registry import METHODS  # no torch: listing the methods stays quick

    methods = "; ".join(f"{name} ({spec.kind}): {spec.summary}" for name, spec in METHODS.items())
    parser = subparsers.add_parser(
        NAME, help="search pruning policies (the main job)",
        description="Run a pruning-policy search on Ray Tune, logged to MLflow. With no CONFIG, the "
                    f"embedded default runs: digits, small_cnn, Optuna TPE, 16 trials. Each flag sets the config "
                    f"key in [brackets]; a key no flag sets keeps the config's value (README, 'Config reference': "
                    f"the defaults, and where the embedded default differs). Methods: {methods}.")
    parser.add_argument("config", nargs="?", help="a YAML config (default: the embedded default)")
    for flag, (key, kind, text) in FLAGS.items():
        parser.add_argument(flag, dest=key, type=kind, default=None, help=f"{text} [{key}]")
    add_download_argument(parser, dest="dataset.download")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config key, e.g. --set optuna.sampler=nsga2 (repeatable)")
    parser.add_argument("--cache-dir", default=None, help="base model cache (default $PRUNETUNE_CACHE "
                        "or ~/.cache/prunetune)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from prunetune.search.config import load_config, parse_set
    from prunetune.search.driver import start_search

    overrides = {key: getattr(args, key) for key, *_ in FLAGS.values() if getattr(args, key) is not None}
    if getattr(args, "dataset.download"):
        overrides["dataset.download"] = True
    cfg = load_config(args.config, overrides=overrides, sets=args.sets)
    from prunetune.pruning.user_models import check_weights_alone

    asked = [value for key, value in map(parse_set, args.sets) if key == "pretrain.epochs"]
    check_weights_alone(cfg.weights, overrides.get("pretrain.epochs", asked[-1] if asked else None))
    return start_search(cfg, cache_dir=cache_dir(args.cache_dir))


def cache_dir(path: str | None):
    from pathlib import Path

    from prunetune.search.prepare import default_cache_dir

    return Path(path).expanduser() if path else default_cache_dir()
