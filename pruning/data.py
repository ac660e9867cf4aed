"""Datasets by name, split into train / validation / test, and fast batch loaders.

``load_dataset(name, ...)`` returns :class:`Splits`: the validation split is carved from the
training data with the run's seed, so a search scores policies on validation data and the test
split is touched only by final reports. Small datasets live in memory as :class:`TensorImages` and
``make_loader`` batches them by slicing tensors (shuffle, crop, flip and normalise a whole batch at
once), which is several times faster on CPU than a per-sample ``DataLoader``. ``imagefolder`` data
is decoded from disk per sample, through a ``DataLoader``.

On a GPU, :meth:`Splits.on_device` moves such in-memory splits to the device once (where they fit
beside the model), and the same batching then runs there: index tensors, crop, flip and
normalisation on the device, so a step waits on no CPU batching or host copy. The random draws stay on
the CPU, drawn in the same order as on CPU data, so a seed gives the same batches on every device.

Every random choice comes from the seed passed in (and, in a loader, the epoch), never from
global RNG state, so two runs with the same seed see the same splits and the same batches.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from prunetune.pruning.errors import UserError

AUGMENTS = ("crop_flip", "crop", "none")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DOWNLOAD_ROOT = "~/.cache/prunetune/datasets"
_DIGITS_TEST_SEED = 0  # the same digits test split for every run seed
_DIGITS_TEST_FRACTION = 0.2
_SYNTHETIC_DATA_SEED = 0  # synthetic data is one fixed dataset; the run seed only splits it
_SYNTHETIC_SIZES = (512, 128)  # train, test
# Stripes of amplitude 0.3 under noise of std 0.3: a 2-layer CNN reaches about 90% in 20 epochs, so
# a pruned model can lose accuracy measurably instead of every policy scoring 100%.
_SYNTHETIC_AMPLITUDE, _SYNTHETIC_NOISE = 0.3, 0.3
_RESIZE_CHUNK = 8192  # images resized per step, to bound the float copy's memory
# In-memory splits move to a GPU only if they take at most this share of its free memory: the
# rest is left for the model, its activations and other trials sharing the GPU.
DEVICE_DATA_SHARE = 0.25


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a trainer need to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # the training augmentation: one of AUGMENTS


@dataclass(frozen=True)
class Splits:
    """A dataset's three disjoint splits: fit on train, score on val, report on test."""

    info: DatasetInfo
    train: Dataset
    val: Dataset
    test: Dataset

    def on_device(self, device: str | torch.device, *, free_bytes: int | None = None) -> Splits:
        """These splits with their in-memory images on ``device``, where all three fit; else ``self``.

        They fit when their bytes are at most ``DEVICE_DATA_SHARE`` of the device's free memory
        (``free_bytes``; None: asked of the device). Each :class:`TensorImages` keeps its copy
        (:meth:`TensorImages.to_device`), so a second call, by the next epoch or the next trial
        holding the same splits, moves nothing. CPU splits on a CPU device are returned as they are.
        """
        device = canonical_device(device)
        parts = (self.train, self.val, self.test)
        if not all(isinstance(part, TensorImages) for part in parts):
            return self  # folder data is decoded per sample by a DataLoader
        missing = [part for part in parts if part.images.device != device and not part.has_copy_on(device)]
        if missing and device.type != "cpu":
            free = device_free_bytes(device) if free_bytes is None else free_bytes
            if not fits_on_device(sum(part.nbytes for part in missing), free):
                return self
        return self._with_parts([part.to_device(device) for part in parts])

    def _with_parts(self, parts: list[Dataset]) -> Splits:
        if all(new is old for new, old in zip(parts, (self.train, self.val, self.test), strict=True)):
            return self
        return Splits(info=self.info, train=parts[0], val=parts[1], test=parts[2])


def fits_on_device(nbytes: int, free_bytes: int, share: float = DEVICE_DATA_SHARE) -> bool:
    """Whether ``nbytes`` of data may live on a device with ``free_bytes`` free: at most ``share`` of them."""
    return nbytes <= share * free_bytes


def canonical_device(device: str | torch.device) -> torch.device:
    """``device`` with its index: ``cuda`` is the current CUDA device (``cuda:0``), as tensors name it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def device_free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device in bytes (0 for other accelerators: their data stays on the CPU)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class TensorImages(Dataset):
    """Images held in memory as one NCHW tensor (uint8 in 0..255, or float in 0..1) with labels.

    ``mean`` and ``std`` (per channel, of the images scaled to 0..1) normalise what the dataset
    yields: ``self[i]`` and ``make_loader`` give the same normalised float32 images.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
            raise ValueError(
                f"TensorImages needs NCHW images and N labels, got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        channels = images.shape[1]
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = tuple(mean) if mean is not None else (0.0,) * channels
        self.std = tuple(std) if std is not None else (1.0,) * channels
        self._copies: dict[torch.device, TensorImages] = {}  # by device: see to_device

    def __getstate__(self) -> dict:  # device copies stay in their process: a pickle holds the CPU data
        return {key: value for key, value in self.__dict__.items() if key != "_copies"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._copies = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the images and labels."""
        return self.images.nbytes + self.labels.nbytes

    def has_copy_on(self, device: torch.device) -> bool:
        return canonical_device(device) in self._copies

    def to_device(self, device: str | torch.device) -> TensorImages:
        """This dataset with its tensors on ``device``: ``self`` where they are already, else a copy
        made once and kept here, so repeated calls (every epoch, every trial of a reused worker
        holding this object) transfer nothing. The images keep their dtype (uint8 stays 4x smaller
        than float)."""
        device = canonical_device(device)
        if self.images.device == device:
            return self
        if device not in self._copies:
            self._copies[device] = TensorImages(self.images.to(device), self.labels.to(device),
                                                mean=self.mean, std=self.std)
        return self._copies[device]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.normalise(self.to_unit_float(self.images[index].unsqueeze(0)))[0], int(self.labels[index])

    def subset(self, indices: Tensor) -> TensorImages:
        """The images at ``indices``, with the same normalisation."""
        return TensorImages(self.images[indices], self.labels[indices], mean=self.mean, std=self.std)

    def to_unit_float(self, images: Tensor) -> Tensor:
        """Images of this dataset as float32 in 0..1."""
        return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()

    def normalise(self, images: Tensor) -> Tensor:
        """Float images in 0..1, standardised per channel."""
        mean, std = self.stats(images.device)
        return (images - mean) / std

    def stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The per-channel mean and std as 1xCx1x1 tensors on ``device``."""
        return (torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                torch.tensor(self.std, device=device).view(1, -1, 1, 1))


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
        except OSError as error:  # PIL.UnidentifiedImageError, a truncated file, one that vanished
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
            except OSError as error:
                raise _unreadable(path, error) from None

    def subset(self, indices: Tensor) -> FolderImages:
        """The images at positions ``indices`` of this subset."""
        return FolderImages(
            self.samples, [self.indices[int(i)] for i in indices], info=self.info, augment=self.augment
        )

    def with_augment(self, augment: str) -> FolderImages:
        """The same images, read with the training (``augment != "none"``) or evaluation transform."""
        return FolderImages(self.samples, self.indices, info=self.info, augment=augment)


def _unreadable(path: str, error: OSError) -> UserError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(f"image file {path} cannot be read ({reason}); replace it or remove it from the dataset folder")


def check_image_files(splits: Splits) -> None:
    """Every split's files open as images (:meth:`FolderImages.check_files`); in-memory splits pass."""
    for part in (splits.train, splits.val, splits.test):
        if isinstance(part, FolderImages):
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


@dataclass(frozen=True)
class _Request:
    """The arguments of ``load_dataset`` that a dataset builder reads."""

    root: str | None
    image_size: int | None
    download: bool


# A builder returns the dataset's info, the training data a validation split is carved from, and
# the test data.
_Builder = Callable[[_Request], tuple[DatasetInfo, Dataset, Dataset]]


def dataset_names() -> list[str]:
    """The names ``load_dataset`` accepts, sorted."""
    return sorted(_BUILDERS)


def load_dataset(
    name: str,
    *,
    root: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    data_fraction: float = 1.0,
    image_size: int | None = None,
    download: bool = False,
) -> Splits:
    """Load dataset ``name`` and split it deterministically for ``seed``.

    The validation split is ``val_fraction`` of the training data; ``data_fraction`` then keeps
    that fraction of the remaining training split only (validation and test stay whole, so scores
    stay comparable). ``image_size`` resizes the images (bilinear for in-memory data). ``name`` may
    also be the user's factory, ``package.module:factory`` (``pruning.user_data``).
    """
    from prunetune.pruning.user_models import is_reference

    if name not in _BUILDERS and not is_reference(name):
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}, or your own "
                        f"factory: package.module:factory or path/to/file.py:factory")
    if not 0.0 < val_fraction <= 0.5:
        raise UserError(f"val_fraction must be in (0, 0.5], got {val_fraction}; pass e.g. 0.1")
    if not 0.0 < data_fraction <= 1.0:
        raise UserError(
            f"data_fraction must be in (0, 1], got {data_fraction}; pass e.g. 1.0 for all the data"
        )
    if image_size is not None and image_size < 1:
        raise UserError(f"image_size must be a positive number of pixels, got {image_size}")
    if is_reference(name):  # the user's own factory (pruning.user_data)
        from prunetune.pruning.user_data import factory_splits

        return factory_splits(name, root=root, seed=seed, val_fraction=val_fraction, data_fraction=data_fraction,
                              image_size=image_size)
    info, train_and_val, test = _BUILDERS[name](_Request(root=root, image_size=image_size, download=download))
    train_indices, val_indices = _carve(len(train_and_val), val_fraction, seed=seed, stream=1)
    if data_fraction < 1.0:
        kept, _ = _carve(len(train_indices), 1.0 - data_fraction, seed=seed, stream=2)
        train_indices = train_indices[kept]
    return Splits(
        info=info,
        train=train_and_val.subset(train_indices),
        val=train_and_val.subset(val_indices),
        test=test,
    )


def _carve(size: int, fraction: float, *, seed: int, stream: int) -> tuple[Tensor, Tensor]:
    """Split ``range(size)`` into (rest, carved): ``fraction`` of it, at least one of each, chosen
    at random for ``(seed, stream)``; both sorted. Distinct streams give independent choices."""
    if size < 2:
        raise UserError(f"a dataset of {size} samples is too small to split; use more data")
    count = min(max(round(size * fraction), 1), size - 1)
    order = torch.from_numpy(np.random.default_rng([seed, stream]).permutation(size))
    return order[count:].sort().values, order[:count].sort().values


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _build_digits(request: _Request) -> tuple[DatasetInfo, Dataset, Dataset]:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16), resized, with a fixed test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = request.image_size or 16
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    info = DatasetInfo("digits", 10, 1, size, (0.3053,), (0.3761,), "crop")
    data = TensorImages(_resize(images, size), torch.tensor(digits.target), mean=info.mean, std=info.std)
    rest, test = _carve(len(data), _DIGITS_TEST_FRACTION, seed=_DIGITS_TEST_SEED, stream=0)
    return info, data.subset(rest), data.subset(test)


def _build_synthetic(request: _Request) -> tuple[DatasetInfo, Dataset, Dataset]:
    """A small learnable 10-class RGB task for tests: one stripe pattern per class under noise."""
    size = request.image_size or 16
    info = DatasetInfo("synthetic", 10, 3, size, (0.5, 0.5, 0.5), (0.3, 0.3, 0.3), "crop")
    train, test = (
        make_synthetic(count, image_size=size, seed=_SYNTHETIC_DATA_SEED, stream=stream)
        for stream, count in enumerate(_SYNTHETIC_SIZES, start=1)
    )
    return info, _with_info(train, info), _with_info(test, info)


def make_synthetic(
    num_samples: int, *, image_size: int, seed: int, stream: int = 0, num_classes: int = 10, channels: int = 3
) -> TensorImages:
    """``num_samples`` uint8 images of coloured stripes under Gaussian noise, balanced labels.

    Class ``k`` has its own stripe orientation and frequency and colour (the same for every
    ``stream`` of one ``seed``); each image has a random phase, so the stripes sit anywhere and a
    linear model scores near chance while a small CNN with global pooling learns the task. Labels,
    phases and noise are drawn for ``(seed, stream)``.
    """
    class_rng = torch.Generator().manual_seed(seed)
    colours = torch.rand(num_classes, channels, generator=class_rng) * 2 - 1
    classes = torch.arange(num_classes)
    angles = (classes % 5) * math.pi / 5
    frequencies = torch.where(classes % 10 < 5, 0.15, 0.3) * 16 / image_size
    rng = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))
    labels = (torch.arange(num_samples) % num_classes)[torch.randperm(num_samples, generator=rng)]
    phases = torch.rand(num_samples, generator=rng) * 2 * math.pi
    rows, cols = torch.meshgrid(
        torch.arange(image_size).float(), torch.arange(image_size).float(), indexing="ij"
    )
    angle, frequency = angles[labels].view(-1, 1, 1), frequencies[labels].view(-1, 1, 1)
    position = cols * torch.cos(angle) + rows * torch.sin(angle)
    stripes = torch.sin(2 * math.pi * frequency * position + phases.view(-1, 1, 1)).unsqueeze(1)
    noise = _SYNTHETIC_NOISE * torch.randn(num_samples, channels, image_size, image_size, generator=rng)
    images = 0.5 + _SYNTHETIC_AMPLITUDE * stripes * colours[labels].view(-1, channels, 1, 1) + noise
    return TensorImages(images.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8), labels)


_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _build_fashion_mnist(request: _Request) -> tuple[DatasetInfo, Dataset, Dataset]:
    """Fashion-MNIST from its four idx files (gzipped or not), as Debian's dataset package installs them."""
    root = Path(request.root or FASHION_MNIST_ROOT).expanduser()
    paths = {key: _find_idx_file(root, stem) for key, stem in _FASHION_FILES.items()}
    arrays = {key: _read_idx(path) for key, path in paths.items()}
    size = request.image_size or 28
    info = DatasetInfo("fashion-mnist", 10, 1, size, (0.2860,), (0.3530,), "crop")
    splits = []
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{paths[f'{part}_images']} and {paths[f'{part}_labels']} do not match "
                f"(shapes {images.shape} and {labels.shape}); replace them with the original idx files"
            )
        tensor = _resize(torch.from_numpy(images.copy()).unsqueeze(1), size)
        splits.append(
            TensorImages(tensor, torch.from_numpy(labels.astype(np.int64)), mean=info.mean, std=info.std)
        )
    return info, splits[0], splits[1]


def _find_idx_file(root: Path, stem: str) -> Path:
    """``root/stem.gz`` or ``root/stem``, or a UserError naming both ways to get the files."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}: install Debian's package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist) or pass --data-root DIR holding the four idx files"
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file of unsigned bytes (the MNIST format): a 4-byte magic, big-endian int32 dims, data."""
    corrupt = f"{path} is corrupt or truncated; download the original idx file again"
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{corrupt} ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{corrupt} (not an unsigned-byte idx file)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(corrupt)
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise UserError(f"{corrupt} (expected {int(np.prod(dims))} bytes of data, found {len(raw) - header})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


_CIFAR_STATS = {
    "cifar10": (10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _build_cifar(name: str) -> _Builder:
    """A builder for CIFAR-10 or CIFAR-100 through torchvision, held in memory as uint8 tensors."""

    def build(request: _Request) -> tuple[DatasetInfo, Dataset, Dataset]:
        from prunetune.pruning.torchvision_compat import import_torchvision

        if request.root is None and not request.download:
            raise UserError(f"{name} needs its files: pass --data-root DIR holding them, or --download to fetch "
                            f"them (in a config: dataset.download: true)")
        datasets = import_torchvision().datasets
        loader = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        root = os.path.expanduser(request.root or DOWNLOAD_ROOT)
        num_classes, mean, std = _CIFAR_STATS[name]
        size = request.image_size or 32
        info = DatasetInfo(name, num_classes, 3, size, mean, std, "crop_flip")
        parts = []
        for train in (True, False):
            try:
                raw = loader(root, train=train, download=request.download)
            except RuntimeError as error:
                raise UserError(
                    f"{name} not found in {root} ({error}); pass --data-root DIR holding it, or --download to fetch it"
                ) from error
            except OSError as error:  # the download itself failed (no network, refused, disk full)
                raise UserError(
                    f"{name} could not be downloaded to {root} ({getattr(error, 'reason', error)}); "
                    f"pass --data-root DIR holding its files"
                ) from None
            images = _resize(torch.from_numpy(raw.data).permute(0, 3, 1, 2).contiguous(), size)
            parts.append(TensorImages(images, torch.tensor(raw.targets), mean=mean, std=std))
        return info, parts[0], parts[1]

    return build


def _build_imagefolder(request: _Request) -> tuple[DatasetInfo, Dataset, Dataset]:
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


def _resize(images: Tensor, size: int) -> Tensor:
    """Square ``images`` resized to ``size`` pixels by bilinear interpolation, keeping their dtype."""
    if images.shape[-2:] == (size, size):
        return images
    needed = images.shape[0] * images.shape[1] * size * size * images.element_size()  # N x C x size x size
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > memory:
        raise UserError(f"{len(images)} images resized to {size} x {size} pixels need {needed / 2**30:.0f} GiB, more "
                        f"than this machine's {memory / 2**30:.0f} GiB of memory; pass a smaller --image-size (dataset.image_size)")
    chunks = []
    for chunk in images.split(_RESIZE_CHUNK):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False)
        if images.dtype == torch.uint8:
            resized = resized.round_().clamp_(0, 255).to(torch.uint8)
        chunks.append(resized)
    return torch.cat(chunks)


def _with_info(data: TensorImages, info: DatasetInfo) -> TensorImages:
    """``data`` normalised with the mean and std of ``info``."""
    return TensorImages(data.images, data.labels, mean=info.mean, std=info.std)


_BUILDERS: dict[str, _Builder] = {
    "digits": _build_digits,
    "fashion-mnist": _build_fashion_mnist,
    "cifar10": _build_cifar("cifar10"),
    "cifar100": _build_cifar("cifar100"),
    "imagefolder": _build_imagefolder,
    "synthetic": _build_synthetic,
}


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


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
