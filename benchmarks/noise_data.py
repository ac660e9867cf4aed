"""Noise in CIFAR-10's shape for ``prunetune run --dataset benchmarks/noise_data.py:noise_cifar``.

50,000 training and 10,000 test images of 3 x 32 x 32 uniform noise, ten classes: the time of an
epoch does not depend on what the pixels show, so a machine without CIFAR-10's files (a GPU machine
that reaches no network) can still time resnet56 at 32x32 (``benchmarks/throughput.py --lengths gpu``).
Seeded, so every call gives the same images.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

TRAIN, TEST, CLASSES, SIZE = 50_000, 10_000, 10, 32


def noise_cifar() -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of normalised float noise; the validation split is carved from train."""
    generator = torch.Generator().manual_seed(0)

    def part(count: int) -> TensorDataset:
        images = torch.rand(count, 3, SIZE, SIZE, generator=generator).sub_(0.5).div_(0.25)
        return TensorDataset(images, torch.randint(0, CLASSES, (count,), generator=generator))

    return part(TRAIN), part(TEST)
