"""``imagefolder`` data: an ImageNet-style folder of image files, decoded per sample when read.

``root/train/CLASS/*`` and ``root/val/CLASS/*``, as torchvision's ``ImageFolder`` reads them; every
problem with the folder (a missing or empty class folder, classes that differ between the two, a
file that is no image) is a one-line :class:`UserError` naming it and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from prunetune.pruning.data import DatasetInfo, Splits, _Request
from prunetune.pruning.errors import UserError


class FolderImages(Dataset):
    """Some of the images of a torchvision ``ImageFolder``, decoded from disk when read.

    The same files serve training (random resized crop and flip) and evaluation (resize and centre
    crop); ``with_augment`` picks which, so the loader's ``augment`` argument decides for folders
    as it does for tensors.

    It keeps the folder's ``(path, label)`` samples, not torchvision objects, and pickles without
    its transform, which is rebuilt through ``import_torchvision`` when unpickled: a Ray worker
    that unpickles it has not imported torchvision yet, and a plain ``import torchvision`` fails
    there on CPU torch (``pruning.torchvision_compat``).
    """

    def __init__(self, folder, indices: Sequence[int], *, info: DatasetInfo, augment: str = "none"):
        self.samples = [(str(path), int(label)) for path, label in getattr(folder, "samples", folder)]
        self.indices = [int(i) for i in indices]
        self.info = info
        self.augment = augment
        self.transform = _folder_transform(info, augment)

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "transform"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.transform = _folder_transform(self.info, self.augment)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[self.indices[index]]
        try:
            with Image.open(path) as image:  # as torchvision's default loader: decoded as RGB
                return self.transform(image.convert("RGB")), label
        except (OSError, Image.DecompressionBombError) as error:  # unidentified, truncated, vanished, a bomb
            raise _unreadable(path, error) from None

    def check_files(self) -> None:
        """Refuse (UserError, as a read would) the first file of this subset that is not an image:
        PIL reads its header only, about 0.1 ms a file, so a file that cannot be read is named before
        an hour of training rather than at the first evaluation. A file damaged past its header is
        still found only when it is decoded."""
        from PIL import Image

        for position in self.indices:
            path = self.samples[position][0]
            try:
                with Image.open(path):
                    pass
            except (OSError, Image.DecompressionBombError) as error:  # the bomb check is no OSError
                raise _unreadable(path, error) from None

    def subset(self, indices: Tensor) -> FolderImages:
        """The images at positions ``indices`` of this subset."""
        return FolderImages(
            self.samples, [self.indices[int(i)] for i in indices], info=self.info, augment=self.augment
        )

    def with_augment(self, augment: str) -> FolderImages:
        """The same images, read with the training (``augment != "none"``) or evaluation transform."""
        return FolderImages(self.samples, self.indices, info=self.info, augment=augment)


def _unreadable(path: str, error: Exception) -> UserError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"image file {path} cannot be read ({reason}); replace it or remove it from the dataset folder")


def check_image_files(splits: Splits, log=None) -> None:
    """Every split's files open as images (:meth:`FolderImages.check_files`); in-memory splits pass.
    ``log`` (a callable) gets one line first where there are files to read."""
    parts = [part for part in (splits.train, splits.val, splits.test) if isinstance(part, FolderImages)]
    if parts and log is not None:
        log(f"checking that the {sum(len(part) for part in parts):,} image files open, before any training")
    for part in parts:
        part.check_files()


def _folder_transform(info: DatasetInfo, augment: str):
    """torchvision transforms for a folder: random resized crop (and flip) to train, centre crop to eval."""
    from prunetune.pruning.torchvision_compat import import_torchvision

    T = import_torchvision().transforms
    size = info.image_size
    if augment == "none":
        steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    else:
        steps = [T.RandomResizedCrop(size)] + ([T.RandomHorizontalFlip()] if augment == "crop_flip" else [])
    return T.Compose([*steps, T.ToTensor(), T.Normalize(info.mean, info.std)])


# ----------------------------------------------------------------------------------------------
# The registry and the splits
# ----------------------------------------------------------------------------------------------


def build_imagefolder(request: _Request) -> tuple[DatasetInfo, Dataset, Dataset]:
    """An ImageNet-style folder: ``root/train/CLASS/*`` and ``root/val/CLASS/*`` (val serves as test)."""
    from prunetune.pruning.torchvision_compat import import_torchvision

    if request.root is None:
        raise UserError(
            "imagefolder needs its images: pass --data-root DIR holding train/ and val/ class folders"
        )
    root = Path(request.root).expanduser().resolve()  # absolute: Ray's workers run in other folders
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise UserError(
                f"{root / part} is not a folder; --data-root must hold train/ and val/ class folders"
            )
    classes = {part: _class_folders(root / part) for part in ("train", "val")}
    if classes["train"] != classes["val"]:
        only = [f"only in {part}/: {', '.join(sorted(set(classes[part]) - set(classes[other])))}"
                for part, other in (("train", "val"), ("val", "train")) if set(classes[part]) - set(classes[other])]
        raise UserError(
            f"{root}/train and {root}/val have different class folders ({'; '.join(only)}); give both the same classes"
        )
    ImageFolder = import_torchvision().datasets.ImageFolder
    train, val = (_image_folder(ImageFolder, root / part) for part in ("train", "val"))
    info = DatasetInfo(
        "imagefolder", len(train.classes), 3, request.image_size or 224,
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "crop_flip",
    )  # fmt: skip
    return (
        info,
        FolderImages(train, range(len(train)), info=info),
        FolderImages(val, range(len(val)), info=info),
    )


def _class_folders(folder: Path) -> list[str]:
    """The class names of an image folder, as torchvision's ``ImageFolder`` finds them: its sub-folders."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _image_folder(image_folder: type, folder: Path):
    """torchvision's ``ImageFolder`` of ``folder``; a folder it refuses (no class folder, a class folder
    without images) is a UserError saying so."""
    try:
        return image_folder(str(folder))
    except FileNotFoundError as error:
        reason = " ".join(str(error).split()).rstrip(".")
        raise UserError(f"{folder}: {reason}; --data-root must hold train/ and val/ with one folder of images "
                        f"per class, none of them empty") from None
