"""Data that cannot be loaded is a one-line UserError naming what to fix, never a library's traceback:
in-memory images that would not fit once resized, and image folders torchvision refuses or cannot read."""

from __future__ import annotations

import pytest
import torch

from prunetune.pruning.data import _resize
from prunetune.pruning.errors import UserError


def test_resizing_beyond_the_machines_memory_is_refused_before_allocating():
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8).expand(1_000_000, 3, 8, 8)  # a view: 192 bytes
    with pytest.raises(UserError, match=r"1000000 images resized to 1024 x 1024 pixels need 2930 GiB.*--image-size"):
        _resize(images, 1024)
    assert _resize(images[:2], 16).shape == (2, 3, 16, 16)  # what fits is resized
