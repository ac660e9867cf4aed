"""A user's own data: ``--dataset package.module:factory`` (or ``path/to/file.py:factory``).

The factory is called with no arguments (``root=`` too when it takes it and ``--data-root`` is
given) and returns ``(train, val, test)``, or ``(train, test)`` to have the validation split carved
from train with the run's seed. Each is a dataset of ``(image, label)`` pairs: a float ``(C, H, W)``
tensor, already normalised as the model expects, and an integer class. The images are read once
into memory (:class:`pruning.data.TensorImages`), so Ray workers get plain tensors and never import
the factory's module; the class count is the largest label + 1 and the input shape that of the
first image (square, the same for every image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunetune.pruning.errors import UserError


def _tensors(ref: str, split: str, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of one split, checked: (C, H, W) float tensors of one square shape."""
    try:
        count = len(data)
    except TypeError:
        raise UserError(f"dataset factory '{ref}' returned a {type(data).__name__} as its {split} split, not "
                        f"a dataset; return datasets of (image tensor, label) pairs") from None
    if count == 0:
        raise UserError(f"dataset factory '{ref}' returned an empty {split} split; give it some images")
    images, labels, shape = [], [], None
    for index in range(count):
        item = data[index]
        if not isinstance(item, Sequence) or len(item) != 2 or not isinstance(item[0], torch.Tensor):
            raise UserError(f"dataset factory '{ref}': {split} item {index} is not an (image tensor, label) pair; "
                            f"return (C, H, W) tensors with integer labels")
        image, label = item
        if image.dim() != 3 or image.shape[1] != image.shape[2]:
            raise UserError(f"dataset factory '{ref}': {split} image {index} has shape {tuple(image.shape)}, "
                            f"not (C, H, W) with H == W; return square images with a channel axis")
        if shape is None:
            shape = tuple(image.shape)
        elif tuple(image.shape) != shape:
            raise UserError(f"dataset factory '{ref}': {split} image {index} has shape {tuple(image.shape)}, "
                            f"the first {shape}; give every image one shape")
        images.append(image.float())
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels)


def factory_splits(ref: str, *, root: str | None, seed: int, val_fraction: float, data_fraction: float,
                   image_size: int | None):
    """The :class:`pruning.data.Splits` of the user's dataset factory ``ref``."""
    from prunetune.pruning.data import DatasetInfo, Splits, TensorImages, _carve, _resize
    from prunetune.pruning.user_models import _accepts, resolve_factory

    factory = resolve_factory(ref)
    kwargs = {"root": root} if root is not None and _accepts(factory, "root") else {}
    try:
        returned = factory(**kwargs)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"dataset factory '{ref}' failed ({type(error).__name__}: {error}); fix it") from None
    if not isinstance(returned, tuple | list) or len(returned) not in (2, 3):
        raise UserError(f"dataset factory '{ref}' returned a {type(returned).__name__}, not (train, val, test) "
                        f"or (train, test); return a tuple of datasets")
    names = ("train", "val", "test") if len(returned) == 3 else ("train", "test")
    parts = dict(zip(names, (_tensors(ref, name, data) for name, data in zip(names, returned, strict=True)),
                     strict=True))
    shapes = {name: tuple(images.shape[1:]) for name, (images, _) in parts.items()}
    if len(set(shapes.values())) > 1:
        raise UserError(f"dataset factory '{ref}': the splits' images differ in shape {shapes}; give one shape")
    channels, size = shapes["train"][0], image_size or shapes["train"][1]
    classes = 1 + max(int(labels.max()) for _, labels in parts.values())
    if min(int(labels.min()) for _, labels in parts.values()) < 0 or classes < 2:
        raise UserError(f"dataset factory '{ref}': labels must be classes 0..N-1 with N >= 2; relabel the data")
    info = DatasetInfo(ref, classes, channels, size, (0.0,) * channels, (1.0,) * channels, "none")
    data = {name: TensorImages(_resize(images, size), labels) for name, (images, labels) in parts.items()}
    train = data["train"]
    if "val" in data:
        val = data["val"]
    else:
        rest, carved = _carve(len(train), val_fraction, seed=seed, stream=1)
        train, val = train.subset(rest), train.subset(carved)
    if data_fraction < 1.0:
        kept, _ = _carve(len(train), 1.0 - data_fraction, seed=seed, stream=2)
        train = train.subset(kept)
    return Splits(info=info, train=train, val=val, test=data["test"])
