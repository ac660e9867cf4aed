"""Datasets and loaders: deterministic disjoint splits, normalised reproducible batches, clear errors."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from prunetune.pruning.augment import random_crop, random_flip
from prunetune.pruning.data import (
    AUGMENTS,
    TensorImages,
    dataset_names,
    load_dataset,
)
from prunetune.pruning.errors import UserError
from prunetune.pruning.loader import make_loader


def _row_hashes(dataset: TensorImages) -> set[str]:
    """One hash per image, to compare splits by content."""
    return {hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in dataset.images}


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# --- the registry and the splits -----------------------------------------------------------------


def test_registry_names_every_dataset():
    assert dataset_names() == ["cifar10", "cifar100", "digits", "fashion-mnist", "imagefolder", "synthetic"]


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(UserError, match="unknown dataset 'mnist'.*digits.*synthetic"):
        load_dataset("mnist")


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("val_fraction", 0.0), ("val_fraction", 0.6), ("data_fraction", 0.0), ("data_fraction", 1.5)],
)
def test_bad_fractions_are_user_errors(keyword, value):
    with pytest.raises(UserError, match=keyword):
        load_dataset("synthetic", **{keyword: value})


def test_splits_are_deterministic_per_seed_and_differ_across_seeds():
    first, again, other = (load_dataset("synthetic", seed=seed) for seed in (3, 3, 4))
    assert torch.equal(first.train.images, again.train.images)
    assert torch.equal(first.val.labels, again.val.labels)
    assert _row_hashes(first.val) != _row_hashes(other.val)
    assert torch.equal(first.test.images, other.test.images)


def test_synthetic_splits_are_disjoint_and_add_up():
    splits = load_dataset("synthetic", seed=1, val_fraction=0.25)
    train, val, test = (_row_hashes(part) for part in (splits.train, splits.val, splits.test))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (384, 128, 128)
    assert len(train) == 384 and len(val) == 128 and len(test) == 128  # every noisy image is unique
    assert not train & val and not train & test and not val & test
    assert set(splits.train.labels.tolist()) == set(range(10))


def test_digits_test_split_is_fixed_and_the_rest_follows_the_seed():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert a.info.num_classes == 10 and a.info.in_channels == 1 and a.info.image_size == 16
    assert a.train.images.shape[1:] == (1, 16, 16)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert round(1797 * 0.2) == len(a.test)
    assert torch.equal(a.test.images, b.test.images)
    assert _row_hashes(a.val) != _row_hashes(b.val)
    train, val, test = (_row_hashes(part) for part in (a.train, a.val, a.test))
    assert len(train | val | test) == 1797  # disjoint: no image in two splits


def test_image_size_resizes_in_memory_data():
    splits = load_dataset("digits", image_size=8)
    assert splits.info.image_size == 8 and splits.train.images.shape[1:] == (1, 8, 8)


def test_data_fraction_shrinks_train_only():
    full = load_dataset("synthetic", seed=2)
    part = load_dataset("synthetic", seed=2, data_fraction=0.25)
    assert len(part.train) == round(len(full.train) * 0.25)
    assert _row_hashes(part.train) <= _row_hashes(full.train)
    assert torch.equal(part.val.images, full.val.images)
    assert torch.equal(part.test.images, full.test.images)


# --- loaders -------------------------------------------------------------------------------------


def test_loader_yields_normalised_float_batches_in_order():
    splits = load_dataset("synthetic")
    data = splits.train
    loader = make_loader(data, 100, shuffle=False)
    x, y = _epoch(loader)
    assert len(loader) == 5 and x.shape == (len(data), 3, 16, 16)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, data.labels)
    mean, std = torch.tensor(splits.info.mean), torch.tensor(splits.info.std)
    expected = (data.images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    assert torch.allclose(x, expected)
    assert torch.allclose(data[7][0], x[7]) and data[7][1] == int(y[7])
    assert abs(x.mean().item()) < 0.5 and 0.5 < x.std().item() < 1.5


def test_drop_last_drops_the_short_batch():
    data = load_dataset("synthetic").train
    loader = make_loader(data, 100, shuffle=True, drop_last=True)
    sizes = [len(y) for _, y in loader]
    assert sizes == [100] * (len(data) // 100) and len(loader) == len(sizes)


def test_shuffle_is_reproducible_per_seed_and_new_each_epoch():
    data = load_dataset("synthetic").train
    one, same, other = (make_loader(data, 64, shuffle=True, seed=s, augment="crop_flip") for s in (5, 5, 6))
    epoch0_x, epoch0_y = _epoch(one)
    assert torch.equal(epoch0_x, _epoch(same)[0])
    assert not torch.equal(epoch0_y, _epoch(other)[1])
    epoch1_y = _epoch(one)[1]
    assert not torch.equal(epoch0_y, epoch1_y)
    assert sorted(epoch0_y.tolist()) == sorted(data.labels.tolist())
    one.set_epoch(1)
    assert torch.equal(_epoch(one)[1], epoch1_y)


def test_augmentation_keeps_shape_and_changes_pixels():
    data = load_dataset("synthetic").train
    plain, _ = _epoch(make_loader(data, 128, shuffle=False))
    for augment in ("crop", "crop_flip"):
        augmented, labels = _epoch(make_loader(data, 128, shuffle=False, augment=augment))
        assert augmented.shape == plain.shape and torch.equal(labels, data.labels)
        changed = (augmented != plain).flatten(1).any(1).float().mean().item()
        assert changed > 0.5


def test_random_crop_takes_a_window_of_the_zero_padded_image():
    images = torch.rand(32, 2, 12, 12)
    cropped = random_crop(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    windows = padded.unfold(2, 12, 1).unfold(3, 12, 1)  # (N, C, 5, 5, 12, 12): every 2-pixel shift
    for image, options in zip(cropped, windows.permute(0, 2, 3, 1, 4, 5), strict=True):
        assert any(torch.equal(image, option) for option in options.flatten(0, 1))
    assert not torch.equal(cropped, images)


def test_random_flip_mirrors_about_half_the_images():
    images = torch.rand(200, 1, 4, 4)
    flipped = random_flip(images, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(a, b.flip(2)) for a, b in zip(flipped, images, strict=True)])
    unchanged = torch.tensor([torch.equal(a, b) for a, b in zip(flipped, images, strict=True)])
    assert bool((mirrored | unchanged).all()) and 60 < int(mirrored.sum()) < 140


def test_unknown_augment_is_a_user_error():
    with pytest.raises(UserError, match="crop_flip"):
        make_loader(load_dataset("synthetic").val, 8, shuffle=False, augment="rotate")
    assert AUGMENTS == ("crop_flip", "crop", "none")


# --- Fashion-MNIST from idx files ----------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an idx file, gzipped when ``path`` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_root(root: Path, train: int = 40, test: int = 10) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (train, 28, 28)))
    _write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(train) % 10)
    _write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (test, 28, 28)))  # uncompressed
    _write_idx(root / "t10k-labels-idx1-ubyte", np.arange(test) % 10)
    return root


def test_fashion_mnist_parses_idx_files_gzipped_or_not(tmp_path):
    root = _fake_fashion_root(tmp_path / "fashion")
    splits = load_dataset("fashion-mnist", root=str(root), val_fraction=0.25)
    assert splits.info.augment == "crop" and splits.info.in_channels == 1
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    assert splits.train.images.shape[1:] == (1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.test.labels.tolist() == list(range(10))
    with gzip.open(root / "train-images-idx3-ubyte.gz") as stream:
        first_train = np.frombuffer(stream.read(), dtype=np.uint8, offset=16)[: 28 * 28].reshape(28, 28)
    index = torch.cat([splits.train.images, splits.val.images])
    assert any(torch.equal(image[0], torch.from_numpy(first_train.copy())) for image in index)


def test_fashion_mnist_missing_files_name_both_fixes(tmp_path):
    with pytest.raises(UserError, match="dataset-fashion-mnist.*--data-root"):
        load_dataset("fashion-mnist", root=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte"])
def test_fashion_mnist_truncated_file_is_named(tmp_path, name):
    root = _fake_fashion_root(tmp_path / "fashion")
    path = root / name
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        load_dataset("fashion-mnist", root=str(root))


# --- datasets through torchvision ----------------------------------------------------------------


def test_cifar_without_files_asks_for_a_root_or_download(tmp_path):
    with pytest.raises(UserError, match="--data-root.*--download"):
        load_dataset("cifar10")
    with pytest.raises(UserError, match="--data-root.*--download"):
        load_dataset("cifar100", root=str(tmp_path))


def test_imagefolder_loads_train_val_test_through_a_dataloader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, count in (("train", 5), ("val", 2)):
        for label in ("cat", "dog"):
            folder = tmp_path / part / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    splits = load_dataset("imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.2)
    assert splits.info.num_classes == 2 and (len(splits.train), len(splits.val), len(splits.test)) == (
        8,
        2,
        4,
    )
    state = torch.get_rng_state()
    first = _epoch(make_loader(splits.train, 3, shuffle=True, seed=1, augment="crop_flip"))
    again = _epoch(make_loader(splits.train, 3, shuffle=True, seed=1, augment="crop_flip"))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert (
        first[0].shape == (8, 3, 8, 8) and first[0].dtype == torch.float32 and first[1].dtype == torch.int64
    )
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    x, y = _epoch(make_loader(splits.test, 4, shuffle=False))
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]


def test_an_imagefolder_split_unpickles_where_torchvision_was_never_imported(tmp_path):
    """A Ray worker unpickles the trial setup before anything imports torchvision; a pickled
    torchvision object would import it directly there and fail on CPU torch ('torchvision::nms')."""
    import pickle
    import subprocess
    import sys

    from PIL import Image

    for part in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / part / label).mkdir(parents=True)
            Image.new("RGB", (6, 6), (200, 10, 10)).save(tmp_path / part / label / "0.png")
    splits = load_dataset("imagefolder", root=str(tmp_path), image_size=4, val_fraction=0.5)
    (tmp_path / "split.pkl").write_bytes(pickle.dumps(splits.test))
    code = ("import pickle, sys; data = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "assert 'torchvision' not in sys.modules or data.transform; x, y = data[1]; print(tuple(x.shape), y)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "split.pkl")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(3,", "4,", "4)", "1"]


def test_imagefolder_without_its_subfolders_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="train/ and val/"):
        load_dataset("imagefolder", root=str(tmp_path))


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_installed_by_debian_loads_whole():
    splits = load_dataset("fashion-mnist")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (54000, 6000, 10000)
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
