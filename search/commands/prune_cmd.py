"""`prunetune prune`: prune the trained base model to one policy and compare the two.

The base model is trained once and cached (see ``common.pretrained_base``). It is pruned to a
policy (a file, or one keep ratio for every group), its BatchNorm statistics are recalibrated
(always: a pruned model scores near chance until then), it is optionally fine-tuned, and both
models are scored on the validation and test splits and measured: MACs, parameters and batch-1
latency. Every input is checked before anything is trained or written.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from prunetune.pruning.errors import UserError
from prunetune.pruning.recipe import BN_RECALIBRATION_BATCHES, FINETUNE_LR
from prunetune.search.commands import common

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from prunetune.pruning.data import Splits
    from prunetune.pruning.measure import Latency
    from prunetune.pruning.policy import Policy
    from prunetune.pruning.space import SearchSpace

NAME = "prune"
DEFAULT_IMPORTANCE = "l1"


@dataclass(frozen=True)
class Scores:
    """One model's accuracy on the validation and test splits and its cost."""

    val_accuracy: float
    test_accuracy: float
    macs: int
    params: int
    latency_ms: float


@dataclass(frozen=True)
class PruneResult:
    """The base and pruned models' scores, the policy that made one from the other, and how."""

    base: Scores
    pruned: Scores
    policy: Policy
    importance: str
    finetune_epochs: int
    latency: tuple = ()  # (base, pruned) pruning.measure.Latency: the timings behind latency_ms

    @property
    def latency_warning(self) -> str | None:
        from prunetune.pruning.measure import latency_warning

        return latency_warning(*self.latency) if self.latency else None

    @property
    def macs_ratio(self) -> float:
        return self.pruned.macs / self.base.macs

    @property
    def params_ratio(self) -> float:
        return self.pruned.params / self.base.params

    def to_json(self) -> dict:
        return {"base": asdict(self.base), "pruned": asdict(self.pruned), "macs_ratio": self.macs_ratio,
                "params_ratio": self.params_ratio, "policy": self.policy.to_json(),
                "importance": self.importance, "finetune_epochs": self.finetune_epochs,
                "latency": {**dict(zip(("base", "pruned"), (lat.to_json() for lat in self.latency), strict=False)),
                            "warning": self.latency_warning}}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `prune` and its arguments."""
    parser = subparsers.add_parser(
        NAME, help="prune the trained base model to one policy and compare",
        description="Train (or load from the cache) the base model, prune it to a policy, recalibrate "
                    "BatchNorm, optionally fine-tune, and compare accuracy, MACs, params and latency.")
    common.add_model_data_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--policy", metavar="FILE", help="policy JSON file (keep ratio per group)")
    source.add_argument("--uniform", type=float, metavar="R", help="keep the fraction R in (0, 1] of every group")
    parser.add_argument("--importance", default=DEFAULT_IMPORTANCE, metavar="NAME",
                        help=f"channel importance criterion, e.g. l1, taylor, attention (default: {DEFAULT_IMPORTANCE})")
    parser.add_argument("--finetune-epochs", type=common.non_negative_int, default=0, metavar="N",
                        help="fine-tune the pruned model for N epochs (default: 0)")
    parser.add_argument("--finetune-lr", type=common.positive_float, default=FINETUNE_LR, metavar="LR",
                        help=f"initial fine-tuning learning rate, cosine schedule (default: {FINETUNE_LR})")
    parser.add_argument("--calibration-batches", type=common.positive_int, default=BN_RECALIBRATION_BATCHES,
                        metavar="N", help="training batches for BatchNorm recalibration and for criteria "
                                          f"that need activations (default: {BN_RECALIBRATION_BATCHES})")
    parser.add_argument("--out", metavar="FILE", help="save the pruned model here (load with: model, info = prunetune.load_pruned(FILE))")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout only")
    common.add_base_model_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Check every input, then pretrain (or load), prune, recover, score, save and print."""
    from prunetune.pruning.importance import get_criterion
    from prunetune.pruning.policy import Policy, check_keep_ratio

    out = common.check_output_file(args.out)
    args.model = common.check_model_name(args.model)
    criterion = get_criterion(args.importance)
    requested = Policy.load(args.policy) if args.policy is not None else None
    if args.uniform is not None:
        check_keep_ratio(args.uniform, "--uniform")
    common.check_cache_dir(args.cache_dir)
    device = common.resolve_device(args.device)

    splits = common.load_splits(args)
    space = common.build_model_space(args.model, splits.info, common.model_args(args), importance=args.importance)
    policy = _policy_for(space, requested, args.uniform)
    base_model, base_metrics = common.pretrained_base(args, splits, device)
    base, base_latency = _measure(base_model, space, base_metrics["val_accuracy"], base_metrics["test_accuracy"],
                                  device)

    pruned_model = _prune_and_recover(base_model, splits, space, policy, criterion, args, device)
    pruned, pruned_latency = _score(pruned_model, splits, space, device)
    if out is not None:
        _save(out, pruned_model, args, splits, space, policy, base, pruned)
    result = PruneResult(base, pruned, policy, args.importance, args.finetune_epochs,
                         (base_latency, pruned_latency))
    if result.latency_warning:
        common.progress(f"prunetune: warning: {result.latency_warning}")
    print(json.dumps(result.to_json()) if args.json else format_result(result, args))
    return 0


def _policy_for(space: SearchSpace, requested: Policy | None, uniform: float | None) -> Policy:
    """The policy to apply, validated against ``space`` and stamped with its id."""
    from prunetune.pruning.policy import Policy

    if requested is None:
        return Policy.uniform(space, uniform)
    requested.validate(space)
    return Policy(requested.keep_ratios, requested.dropped_blocks, space.space_id)


def _prune_and_recover(base_model: nn.Module, splits: Splits, space: SearchSpace, policy: Policy, criterion,
                       args: argparse.Namespace, device: str) -> nn.Module:
    """Prune to ``policy``, recalibrate BatchNorm, then fine-tune for --finetune-epochs."""
    from itertools import islice

    from prunetune.pruning.loader import make_loader
    from prunetune.pruning.surgery import prune
    from prunetune.pruning.train import TrainRecipe, evaluate, recalibrate_bn, train

    batch_size = common.pretrain_recipe(args).batch_size
    calib = None
    if criterion.needs_calibration:
        loader = make_loader(splits.train, batch_size, shuffle=True, seed=args.seed)
        calib = list(islice(loader, args.calibration_batches))
    common.progress(f"pruning: {policy.describe()}, importance {args.importance}")
    pruned = prune(base_model, space, policy, importance=criterion, calib=calib)
    recalibrate_bn(pruned, splits.train, batches=args.calibration_batches, batch_size=batch_size,
                   seed=args.seed, device=device)
    accuracy, _ = evaluate(pruned, splits.val, device=device)
    common.progress(f"pruned model: val accuracy {accuracy:.4f} after BatchNorm recalibration")
    if args.finetune_epochs > 0:
        recipe = TrainRecipe(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=batch_size)
        train(pruned, splits, recipe, seed=args.seed, device=device,
              on_epoch=common.epoch_printer("fine-tune", recipe.epochs))
    return pruned.eval()


def _score(model: nn.Module, splits: Splits, space: SearchSpace, device: str) -> tuple[Scores, Latency]:
    """Evaluate ``model`` on the validation and test splits, then measure it."""
    from prunetune.pruning.train import evaluate

    val_accuracy, _ = evaluate(model, splits.val, device=device)
    test_accuracy, _ = evaluate(model, splits.test, device=device)
    return _measure(model, space, val_accuracy, test_accuracy, device)


def _measure(model: nn.Module, space: SearchSpace, val_accuracy: float, test_accuracy: float,
             device: str) -> tuple[Scores, Latency]:
    """Scores from known accuracies plus measured MACs, parameters and batch-1 latency (with its spread)."""
    from prunetune.pruning.measure import count_macs, count_params, time_latency

    latency = time_latency(model, space.input_shape, batch_size=1, device=device)
    return Scores(val_accuracy=val_accuracy, test_accuracy=test_accuracy,
                  macs=count_macs(model, space.input_shape), params=count_params(model),
                  latency_ms=latency.ms), latency


def _save(out: Path, model: nn.Module, args: argparse.Namespace, splits: Splits, space: SearchSpace,
          policy: Policy, base: Scores, pruned: Scores) -> None:
    """Write the pruned model with ``save_pruned`` (atomically), its scores in ``extra``."""
    from prunetune.pruning.surgery import save_pruned

    arch = {"name": args.model, "num_classes": splits.info.num_classes, "in_channels": splits.info.in_channels}
    if common.model_args(args):
        arch["model_args"] = common.model_args(args)
    extra = {"dataset": splits.info.name, "image_size": splits.info.image_size, "importance": args.importance,
             "finetune_epochs": args.finetune_epochs, "base": asdict(base), "pruned": asdict(pruned)}
    try:
        save_pruned(out, model, arch=arch, space=space, policy=policy, extra=extra)
    except OSError as error:
        raise UserError(f"cannot write --out {out} ({error.strerror}); choose a writable path") from None
    common.progress(f"saved the pruned model to {out}")


def _spread_rows(latency: tuple) -> list[tuple[str, str, str, str]]:
    """The spread behind the latency figures: IQR over the timings, and the load when measured."""
    if not latency:
        return []
    base, pruned = latency
    load = "-" if base.load_avg is None else f"{max(base.load_avg, pruned.load_avg or 0):.1f} on {base.cpus} CPUs"
    return [(f"  spread (IQR, {base.repeats} runs)", f"{base.iqr_ms:.3f}", f"{pruned.iqr_ms:.3f}", ""),
            ("  load average", "", "", load)]


def format_result(result: PruneResult, args: argparse.Namespace) -> str:
    """The comparison as a small text table."""
    base, pruned = result.base, result.pruned

    from prunetune.search.summary import human_count

    def count(value: int) -> str:
        return f"{human_count(value)} ({value:,})"

    rows = [("val accuracy", f"{base.val_accuracy:.4f}", f"{pruned.val_accuracy:.4f}", ""),
            ("test accuracy", f"{base.test_accuracy:.4f}", f"{pruned.test_accuracy:.4f}", ""),
            ("MACs", count(base.macs), count(pruned.macs), f"{result.macs_ratio:.3f}"),
            ("params", count(base.params), count(pruned.params), f"{result.params_ratio:.3f}"),
            ("latency (ms, batch 1)", f"{base.latency_ms:.3f}", f"{pruned.latency_ms:.3f}",
             f"{pruned.latency_ms / base.latency_ms:.3f}" + (" (unreliable)" if result.latency_warning else "")),
            *_spread_rows(result.latency)]
    header = ("", "base", "pruned", "pruned/base")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    tuning = (f"fine-tuned for {result.finetune_epochs} epoch{'s' if result.finetune_epochs > 1 else ''}"
              if result.finetune_epochs else "not fine-tuned")
    lines = [f"{args.model} on {args.dataset}, {result.policy.describe()}",
             f"importance {result.importance}, BatchNorm recalibrated, {tuning}", ""]
    for row in [header, *rows]:
        lines.append("  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]))
    return "\n".join(lines)
