"""The GPU data path: epoch time with host-resident against device-resident data, amp, channels_last.

One training epoch (SGD, the loader's crop and flip, then the validation pass, as a trial's epoch)
of each model on each dataset at 32x32, for every combination of

- data: ``host`` (today's CPU path: batches sliced and augmented from CPU tensors, each moved to the
  device) or ``device`` (``Splits.on_device``: the splits moved once, batches indexed, cropped,
  flipped and normalised on the device);
- ``amp``: none or bf16 (``resources.amp``);
- ``channels_last``: off or on (``resources.channels_last``).

Each combination runs ``--warmup`` epochs (cuDNN picks its algorithms in the first) and then
``--epochs`` timed ones; the table gives the median epoch, its images per second, and the speed-up
over host/none/off within the same run. On a CPU, ``device`` data is the host data itself, so only
the ``host`` rows run. ``--dataset noise`` is uniform random uint8 images in Fashion-MNIST's or
CIFAR's shape (the time of an epoch does not depend on what the pixels show), for a machine
without the dataset's files.

    python benchmarks/gpu_data_path.py --smoke                       # CPU, seconds: that it runs
    python benchmarks/gpu_data_path.py --device cuda                 # resnet20, resnet56 on fashion-mnist
    python benchmarks/gpu_data_path.py --device cuda --dataset noise-cifar --models resnet56
    python benchmarks/gpu_data_path.py --device cuda --dataset cifar10 --data-root DIR

Results: Markdown on stdout and ``results.json`` in ``benchmarks/results/gpu_data_path/<date>/``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOISE = {"noise-fashion": (60_000, 1, 10_000), "noise-cifar": (50_000, 3, 10_000)}  # train, channels, test


def load_splits(name: str, *, image_size: int, data_fraction: float, root: str | None, seed: int):
    """The splits of ``name`` (a prunetune dataset, or noise in a dataset's shape) at ``image_size``."""
    import torch

    from prunetune.pruning.data import DatasetInfo, Splits, TensorImages, load_dataset

    if name not in NOISE:
        return load_dataset(name, root=root, seed=seed, image_size=image_size, data_fraction=data_fraction)
    train, channels, test = NOISE[name]
    train = max(2, round(train * data_fraction))
    generator = torch.Generator().manual_seed(seed)

    def part(count: int) -> TensorImages:
        images = torch.randint(0, 256, (count, channels, image_size, image_size), dtype=torch.uint8,
                               generator=generator)
        return TensorImages(images, torch.randint(0, 10, (count,), generator=generator),
                            mean=(0.5,) * channels, std=(0.25,) * channels)

    info = DatasetInfo(name, 10, channels, image_size, (0.5,) * channels, (0.25,) * channels, "crop_flip")
    return Splits(info, part(train), part(max(1, train // 9)), part(max(1, round(test * data_fraction))))


def time_epochs(model_name: str, splits, *, device: str, data: str, amp: str, channels_last: bool,
                batch_size: int, warmup: int, epochs: int, seed: int) -> dict:
    """Median seconds of one training epoch plus validation, for one combination."""
    import torch

    from prunetune.pruning.models import create_model
    from prunetune.pruning.train import Trainer, TrainRecipe

    used = splits.on_device(device) if data == "device" else splits
    resident = used.train.images.device.type if hasattr(used.train, "images") else "cpu"
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=splits.info.num_classes, in_channels=splits.info.in_channels)
    recipe = TrainRecipe(epochs=warmup + epochs, lr=0.05, batch_size=batch_size)
    trainer = Trainer(model, used, recipe, seed=seed, device=device, amp=amp, channels_last=channels_last)
    seconds = []
    for epoch in range(warmup + epochs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        report = trainer.run_epoch(epoch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if epoch >= warmup:
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {"model": model_name, "data": data, "resident_on": resident, "amp": amp,
            "channels_last": channels_last, "epoch_seconds": round(median, 4),
            "epoch_seconds_all": [round(s, 4) for s in seconds],
            "train_images_per_s": round(len(splits.train) / median, 1),
            "train_loss": round(report.train_loss, 4), "val_accuracy": round(report.val_accuracy, 4)}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"GPU data path, {meta['date']}: {meta['device_name']}, {meta['dataset']} at {meta['image_size']}px "
             f"({meta['train_images']} training images, batch {meta['batch_size']}), median of {meta['epochs']} "
             f"epoch(s) after {meta['warmup']} warm-up", "",
             f"    {meta['command']}", "",
             "| model | data | amp | channels_last | epoch s | train img/s | speed-up | val acc |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['data']} | {row['amp']} | {'on' if row['channels_last'] else 'off'} "
                     f"| {row['epoch_seconds']:.3f} | {row['train_images_per_s']:.0f} | {row['speedup']:.2f}x "
                     f"| {row['val_accuracy']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cuda, cpu, or auto (cuda where present)")
    parser.add_argument("--models", default="resnet20,resnet56")
    parser.add_argument("--dataset", default="fashion-mnist",
                        help=f"a prunetune dataset (fashion-mnist, cifar10, ...) or {', '.join(NOISE)}")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--data-fraction", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a 1-CPU trial's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny: resnet20 on 1%% of noise in CIFAR's shape, 1 timed epoch, no warm-up")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results/gpu_data_path/DATE)")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.dataset, args.data_fraction, args.warmup, args.epochs = "resnet20", "noise-cifar", 0.01, 0, 1

    import torch

    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    splits = load_splits(args.dataset, image_size=args.image_size, data_fraction=args.data_fraction,
                         root=args.data_root, seed=args.seed)
    data_modes = ("host", "device") if device != "cpu" else ("host",)
    rows = []
    for model_name in args.models.split(","):
        baseline = None
        for data, amp, channels_last in itertools.product(data_modes, ("none", "bf16"), (False, True)):
            row = time_epochs(model_name, splits, device=device, data=data, amp=amp, channels_last=channels_last,
                              batch_size=args.batch_size, warmup=args.warmup, epochs=args.epochs, seed=args.seed)
            baseline = baseline or row["epoch_seconds"]
            row["speedup"] = round(baseline / row["epoch_seconds"], 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    meta = {"date": date.today().isoformat(), "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": device, "device_name": torch.cuda.get_device_name() if device.startswith("cuda")
            else f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))",
            "torch": torch.__version__, "dataset": args.dataset, "image_size": args.image_size,
            "train_images": len(splits.train), "batch_size": args.batch_size, "warmup": args.warmup,
            "epochs": args.epochs, "command": "python benchmarks/gpu_data_path.py " + " ".join(sys.argv[1:])}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "gpu_data_path" / meta["date"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(markdown(rows, meta))
    print(f"\nresults: {out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
