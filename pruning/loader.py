"""Seeded batch loaders: each iteration is one epoch, drawn from ``(seed, epoch)`` alone.

:class:`TensorBatches` slices in-memory :class:`TensorImages` where they are (CPU or device) and
augments whole batches (``pruning.augment``); :class:`SampleBatches` runs a ``DataLoader`` over
any other dataset (folder images), its transforms drawing from the epoch's own stream. Neither
touches global RNG state, so two runs with the same seed see the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from prunetune.pruning.augment import crop_at, crop_offsets, crop_padding, flip_draws, flip_where
from prunetune.pruning.data import AUGMENTS, TensorImages
from prunetune.pruning.errors import UserError
from prunetune.pruning.image_folder import FolderImages


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    augment: str = "none",
    drop_last: bool = False,
    num_workers: int = 0,
) -> Iterable[tuple[Tensor, Tensor]]:
    """Batches ``(x, y)`` of ``dataset``: x float32 normalised NCHW, y int64.

    Each iteration is one epoch; with ``shuffle`` epoch ``e`` has the order (and augmentation)
    drawn for ``(seed, e)``, so a run repeats exactly. ``augment`` is one of ``AUGMENTS``:
    in-memory data is cropped (zero padding of 4 pixels, 2 for images of 16 pixels or fewer) and
    flipped per sample, on whole batches. ``num_workers`` applies to folder data only.
    """
    if augment not in AUGMENTS:
        raise UserError(f"unknown augment {augment!r}; choose one of: {', '.join(AUGMENTS)}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(dataset, TensorImages):
        return TensorBatches(
            dataset, batch_size, shuffle=shuffle, seed=seed, augment=augment, drop_last=drop_last
        )
    if isinstance(dataset, FolderImages):
        dataset = dataset.with_augment(augment)
    elif augment != "none":
        raise ValueError(
            f"augment={augment!r} needs TensorImages or FolderImages, got {type(dataset).__name__}"
        )
    return SampleBatches(
        dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, num_workers=num_workers
    )


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The torch generator for one epoch of a seeded loader, independent across (seed, epoch) pairs."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


class _Epochs:
    """Counts epochs: each ``iter()`` is the next one; ``set_epoch`` jumps, e.g. on resume."""

    def __init__(self, size: int, batch_size: int, *, seed: int, drop_last: bool):
        self.size, self.batch_size, self.seed, self.drop_last = size, batch_size, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def _next_generator(self) -> torch.Generator:
        generator = _epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        return generator


class TensorBatches(_Epochs):
    """Batches of :class:`TensorImages` made by slicing: shuffle, crop, flip and normalise per batch.

    One code path for every device: the epoch's random draws (the order, then per batch the crop
    offsets and the flips, in that order) come from the epoch's CPU generator, are moved to the
    images' device once per epoch, and the batches are indexed, cropped, flipped and normalised
    where the images are. CPU data thus gives exactly the batches it always has, and device data
    the same batches without a host transfer per batch.
    """

    def __init__(
        self,
        dataset: TensorImages,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        augment: str,
        drop_last: bool,
    ):
        super().__init__(len(dataset), batch_size, seed=seed, drop_last=drop_last)
        self.dataset, self.shuffle, self.augment = dataset, shuffle, augment

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = self._next_generator()
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        return self._batches(order, generator)

    def _batch_sizes(self) -> list[int]:
        return [min(self.batch_size, self.size - number * self.batch_size) for number in range(len(self))]

    def _draws(self, generator: torch.Generator) -> dict[str, Tensor]:
        """The epoch's augmentation draws for every batch, drawn batch by batch as the batches use them."""
        if self.augment == "none" or self.size == 0:
            return {}
        pad = crop_padding(*self.dataset.images.shape[-2:])
        tops, lefts, flips = [], [], []
        for count in self._batch_sizes():
            top, left = crop_offsets(count, pad, generator)
            tops.append(top)
            lefts.append(left)
            if self.augment == "crop_flip":
                flips.append(flip_draws(count, generator))
        draws = {"top": torch.cat(tops), "left": torch.cat(lefts)}
        if flips:
            draws["flip"] = torch.cat(flips)
        return draws

    def _batches(self, order: Tensor, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        data = self.dataset
        device = data.images.device
        draws = {key: value.to(device) for key, value in self._draws(generator).items()}
        order = order.to(device)
        mean, std = data.stats(device)
        pad = crop_padding(*data.images.shape[-2:])
        for number in range(len(self)):
            window = slice(number * self.batch_size, (number + 1) * self.batch_size)
            indices = order[window]
            images = data.to_unit_float(data.images[indices])
            if "top" in draws:
                images = crop_at(images, draws["top"][window], draws["left"][window], pad)
            if "flip" in draws:
                images = flip_where(images, draws["flip"][window])
            yield (images - mean) / std, data.labels[indices]


class SampleBatches(_Epochs):
    """Batches of any dataset through a ``DataLoader``, seeded per epoch (order, workers, transforms)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        num_workers: int,
    ):
        super().__init__(len(dataset), batch_size, seed=seed, drop_last=drop_last)
        self.dataset, self.shuffle, self.num_workers = dataset, shuffle, num_workers

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = self._next_generator()
        return self._batches(generator)

    def _batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
            num_workers=self.num_workers, generator=generator,
        )  # fmt: skip
        # Transforms run in this process draw from torch's global RNG: give them this epoch's own
        # stream while a batch is made, and the caller its untouched global state in between.
        transform_rng = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        batches = iter(loader)
        while True:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(transform_rng.get_state())
                batch = next(batches, None)
                transform_rng.set_state(torch.get_rng_state())
            if batch is None:
                return
            images, labels = batch
            yield images.float(), labels.to(torch.int64)
