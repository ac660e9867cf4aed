"""Batch augmentation of in-memory images: random crops within zero padding and horizontal flips.

Whole batches at once, each image at its own draw; the draws come from the generator passed in
(a loader's epoch generator), so a seed repeats them exactly on every device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def crop_padding(height: int, width: int) -> int:
    """The zero padding a random crop shifts within: 4 pixels, 2 for images of 16 pixels or fewer."""
    return 2 if max(height, width) <= 16 else 4


def crop_offsets(count: int, pad: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` random (top, left) offsets in 0..2*pad, each shaped (count, 1, 1), on the generator's device."""
    top = torch.randint(0, 2 * pad + 1, (count, 1, 1), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (count, 1, 1), generator=generator)
    return top, left


def flip_draws(count: int, generator: torch.Generator) -> Tensor:
    """``count`` coin tosses: which images to mirror."""
    return torch.rand(count, generator=generator) < 0.5


def crop_at(images: Tensor, top: Tensor, left: Tensor, pad: int) -> Tensor:
    """Each image's window at its own (top, left) offset in the image zero-padded by ``pad``.

    One ``gather`` over the flattened padded batch crops every image at its own offset.
    """
    count, channels, height, width = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)).reshape(count, channels, -1)
    rows = top + torch.arange(height, device=images.device).view(1, -1, 1)
    cols = left + torch.arange(width, device=images.device).view(1, 1, -1)
    flat_index = (rows * (width + 2 * pad) + cols).reshape(count, 1, -1).expand(-1, channels, -1)
    return padded.gather(2, flat_index).reshape(count, channels, height, width)


def flip_where(images: Tensor, flip: Tensor) -> Tensor:
    """The images mirrored left to right where ``flip`` (one boolean per image) is true."""
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_crop(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image shifted at random within zero padding of 4 pixels (2 for images of 16 pixels or fewer)."""
    pad = crop_padding(*images.shape[-2:])
    top, left = crop_offsets(len(images), pad, generator)
    return crop_at(images, top.to(images.device), left.to(images.device), pad)


def random_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Each image mirrored left to right with probability one half."""
    return flip_where(images, flip_draws(len(images), generator).to(images.device))
