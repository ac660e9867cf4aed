"""Datasets by name, split into train / validation / test.

``load_dataset(name, ...)`` returns :class:`Splits`: the validation split is carved from the
training data with the run's seed, so a search scores policies on validation data and the test
split is touched only by final reports. Small datasets live in memory as :class:`TensorImages`,
which ``pruning.loader.make_loader`` batches by slicing tensors (shuffle, crop, flip and normalise a
whole batch at once), several times faster on CPU than a per-sample ``DataLoader``.
``imagefolder`` data (``pruning.image_folder``) is decoded from disk per sample, through a
``DataLoader``.

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
from collections.abc import Callable, Sequence
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


def _build_imagefolder(request: _Request) -> tuple[DatasetInfo, Dataset, Dataset]:
    from prunetune.pruning.image_folder import build_imagefolder  # it imports this module

    return build_imagefolder(request)


_BUILDERS: dict[str, _Builder] = {
    "digits": _build_digits,
    "fashion-mnist": _build_fashion_mnist,
    "cifar10": _build_cifar("cifar10"),
    "cifar100": _build_cifar("cifar100"),
    "imagefolder": _build_imagefolder,
    "synthetic": _build_synthetic,
}
