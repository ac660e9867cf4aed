"""An endless, seeded stream of training batches with a position, so learning resumes mid-epoch.

Epoch e of the stream is the seeded loader's epoch e (``pruning.loader.make_loader``: its order
and augmentation follow ``(seed, e)``), so ``seek(n)`` followed by ``next()`` gives exactly the
batch an uninterrupted stream gives as its n-th.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from prunetune.pruning.loader import make_loader


class BatchStream:
    """Batches of ``dataset``, epoch after epoch; ``position`` counts the batches handed out."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, augment: str = "none",
                 device: str = "cpu"):
        drop_last = len(dataset) > batch_size  # a last batch of one breaks BatchNorm in train mode
        self.loader = make_loader(dataset, batch_size, shuffle=True, seed=seed, augment=augment,
                                  drop_last=drop_last)
        self.per_epoch = len(self.loader)
        self.device = device
        self.position = 0
        self._batches = None

    def seek(self, position: int) -> None:
        """Make the next batch the ``position``-th of the stream (0-based)."""
        self.position = int(position)
        self._batches = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = divmod(self.position, self.per_epoch)
        if self._batches is None:
            self.loader.set_epoch(epoch)
            self._batches = iter(self.loader)
            for _ in range(index):
                next(self._batches)
        x, y = next(self._batches)
        self.position += 1
        if self.position % self.per_epoch == 0:
            self._batches = None
        return x.to(self.device), y.to(self.device)
