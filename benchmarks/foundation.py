"""Foundation benchmark (issue 2): base models, the MACs estimate, latency against MACs.

Three measurements on Fashion-MNIST (1x28x28), printed as Markdown for BENCHMARKS.md:

1. base accuracy and seconds per training epoch of resnet20 and vgg11 (``--threads`` torch
   threads, default 2), trained from scratch with the default recipe on ``--data-fraction`` of the
   training split;
2. the space's MACs estimate against the MACs counted on the physically pruned model, over random
   policies on resnet20, resnet56, vgg16 and mobilenetv2;
3. latency against MACs for uniform keep ratios 0.25 to 1.0 (resnet20 and vgg11): does latency
   follow MACs on this CPU?

    python benchmarks/foundation.py                        # the figures in BENCHMARKS.md
    python benchmarks/foundation.py --data-fraction 1.0    # full training split (slow on a CPU)
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunetune.pruning.data import load_dataset  # noqa: E402
from prunetune.pruning.dependency import build_space  # noqa: E402
from prunetune.pruning.measure import count_macs, measure_latency  # noqa: E402
from prunetune.pruning.models import create_model  # noqa: E402
from prunetune.pruning.policy import Policy  # noqa: E402
from prunetune.pruning.surgery import prune  # noqa: E402
from prunetune.pruning.train import TrainRecipe, pretrain  # noqa: E402

SHAPE = (1, 28, 28)


def base_models(models: list[str], *, data_fraction: float, epochs: int, seed: int) -> list[str]:
    """Train each model from scratch (a fresh cache); report accuracy and seconds per epoch."""
    splits = load_dataset("fashion-mnist", seed=seed, data_fraction=data_fraction)
    rows = ["| model | train images | epochs | val accuracy | test accuracy | s / epoch (median) | "
            "ms / training image |", "|---|---|---|---|---|---|---|"]
    recipe = TrainRecipe(epochs=epochs)
    for name in models:
        seconds: list[float] = []
        with tempfile.TemporaryDirectory() as cache:
            _, metrics = pretrain(name, splits, recipe, seed=seed, cache_dir=cache, dataset_key="bench",
                                  on_epoch=lambda report, s=seconds: s.append(report.seconds))
        per_epoch = statistics.median(seconds)
        rows.append(f"| {name} | {len(splits.train)} | {epochs} | {metrics['val_accuracy']:.4f} | "
                    f"{metrics['test_accuracy']:.4f} | {per_epoch:.1f} | {1000 * per_epoch / len(splits.train):.2f} |")
        print(f"  trained {name}: {metrics}", file=sys.stderr, flush=True)
    return rows


def random_policy(space, rng: random.Random) -> Policy:
    return Policy({g.name: rng.uniform(0.1, 1.0) for g in space.groups}, (), space.space_id)


def macs_estimate(models: list[str], *, policies: int, seed: int) -> list[str]:
    """Relative error of the space's MACs estimate against MACs counted on the pruned model."""
    rows = ["| model | policies | mean abs. error | max abs. error | estimate / measured (min .. max) |",
            "|---|---|---|---|---|"]
    rng = random.Random(seed)
    for name in models:
        model = create_model(name, num_classes=10, in_channels=1)
        space = build_space(model, name, SHAPE)
        ratios = []
        for _ in range(policies):
            policy = random_policy(space, rng)
            pruned = prune(model, space, policy, "l1", [])
            ratios.append(space.estimate_macs(policy) / count_macs(pruned, SHAPE))
        errors = [abs(r - 1) for r in ratios]
        rows.append(f"| {name} | {policies} | {100 * statistics.mean(errors):.3f}% | {100 * max(errors):.3f}% | "
                    f"{min(ratios):.4f} .. {max(ratios):.4f} |")
    return rows


def latency_against_macs(models: list[str], *, ratios: list[float], batch: int, repeats: int,
                         device: str = "cpu") -> list[str]:
    """Median latency at batch 1 and ``batch`` for uniform keep ratios, beside the MACs ratio."""
    rows = [f"| model | keep ratio | MACs ratio | latency ms (batch 1) | ratio | latency ms (batch {batch}) | ratio |",
            "|---|---|---|---|---|---|---|"]
    for name in models:
        model = create_model(name, num_classes=10, in_channels=1).eval()
        space = build_space(model, name, SHAPE)
        base = None
        for keep in ratios:
            pruned = model if keep == 1.0 else prune(model, space, space.uniform_policy(keep), "l1", [])
            macs = count_macs(pruned, SHAPE)
            one = measure_latency(pruned, SHAPE, batch_size=1, repeats=repeats, device=device)
            many = measure_latency(pruned, SHAPE, batch_size=batch, repeats=max(5, repeats // 4), device=device)
            if base is None:
                base = (macs, one, many)
            rows.append(f"| {name} | {keep:.3f} | {macs / base[0]:.3f} | {one:.3f} | {one / base[1]:.3f} | "
                        f"{many:.2f} | {many / base[2]:.3f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-models", default="resnet20,vgg11")
    parser.add_argument("--macs-models", default="resnet20,resnet56,vgg16,mobilenetv2")
    parser.add_argument("--latency-models", default="resnet20,vgg11")
    parser.add_argument("--policies", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where latency is timed: cpu or cuda (training stays on the CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25]
    started = time.perf_counter()
    print(f"# foundation benchmark, {date.today()}, {platform.machine()} {platform.processor() or ''}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}\n")
    print("## MACs estimate against measured MACs (Fashion-MNIST input)\n")
    print("\n".join(macs_estimate(args.macs_models.split(","), policies=args.policies, seed=args.seed)))
    print("\n## Latency against MACs, uniform keep ratios (untrained weights; latency does not depend on them)\n")
    print("\n".join(latency_against_macs(args.latency_models.split(","), ratios=ratios, batch=64,
                                        repeats=args.repeats, device=args.device)))
    if not args.skip_training:
        print(f"\n## Base models on Fashion-MNIST (data fraction {args.data_fraction:g}, seed {args.seed})\n")
        print("\n".join(base_models(args.train_models.split(","), data_fraction=args.data_fraction,
                                    epochs=args.epochs, seed=args.seed)))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
