"""The GPU data path: device-resident splits, batches made on the device, bf16 autocast, channels_last.

What runs on a CPU is tested here on CPU tensors (and on torch's ``meta`` device, which stands in
for an accelerator's memory where only shapes and devices matter); what needs CUDA is marked
``gpu`` and skipped without one.
"""

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prunetune.pruning.data import Splits, TensorImages, fits_on_device, load_dataset
from prunetune.pruning.errors import UserError
from prunetune.pruning.loader import make_loader
from prunetune.pruning.models import create_model
from prunetune.pruning.train import Trainer, TrainRecipe, autocast, evaluate, recalibrate_bn


def reference_batches(data: TensorImages, batch_size: int, *, seed: int, epoch: int, augment: str,
                      drop_last: bool):
    """The batches of one epoch as the loader made them before the device path (its code, copied):
    per batch, index, crop (offsets drawn top then left) and flip (drawn after), then normalise."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    order = torch.randperm(len(data), generator=generator)
    full, rest = divmod(len(data), batch_size)
    count = full if drop_last or rest == 0 else full + 1
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    for number in range(count):
        indices = order[number * batch_size : (number + 1) * batch_size]
        images = data.images[indices].float().div_(255.0)
        n, channels, height, width = images.shape
        if augment != "none":
            pad = 2 if max(height, width) <= 16 else 4
            padded = F.pad(images, (pad, pad, pad, pad)).reshape(n, channels, -1)
            top = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
            left = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
            rows = top + torch.arange(height).view(1, -1, 1)
            cols = left + torch.arange(width).view(1, 1, -1)
            flat = (rows * (width + 2 * pad) + cols).reshape(n, 1, -1).expand(-1, channels, -1)
            images = padded.gather(2, flat).reshape(n, channels, height, width)
        if augment == "crop_flip":
            flip = torch.rand(n, generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        yield (images - mean) / std, data.labels[indices]


def uint8_images(count: int, size: int, channels: int = 3, seed: int = 0) -> TensorImages:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return TensorImages(images, labels, mean=(0.49, 0.48, 0.45)[:channels], std=(0.25, 0.24, 0.26)[:channels])


@pytest.mark.parametrize("size, augment, drop_last", [(32, "crop_flip", True), (16, "crop", False),
                                                      (28, "none", False)])
def test_cpu_batches_are_the_ones_the_loader_always_made(size, augment, drop_last):
    data = uint8_images(203, size)
    loader = make_loader(data, 32, shuffle=True, seed=7, augment=augment, drop_last=drop_last)
    for epoch in range(2):
        made = list(loader)
        expected = list(reference_batches(data, 32, seed=7, epoch=epoch, augment=augment, drop_last=drop_last))
        assert len(made) == len(expected) == (6 if drop_last else 7)
        for (x, y), (x_ref, y_ref) in zip(made, expected, strict=True):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert augment == "none" or not torch.equal(made[0][0], list(reference_batches(
        data, 32, seed=7, epoch=0, augment=augment, drop_last=drop_last))[0][0])  # epochs differ


def splits_of(data: TensorImages) -> Splits:
    from prunetune.pruning.data import DatasetInfo

    info = DatasetInfo("t", 10, 3, data.images.shape[-1], data.mean, data.std, "crop_flip")
    return Splits(info, data.subset(torch.arange(0, 60)), data.subset(torch.arange(60, 80)),
                  data.subset(torch.arange(80, 100)))


def test_cpu_splits_stay_as_they_are():
    splits = splits_of(uint8_images(100, 8))
    assert splits.on_device("cpu") is splits


def test_splits_move_once_where_they_fit_and_stay_where_they_do_not():
    """The ``meta`` device stands in for a GPU: shapes and devices without memory."""
    splits = splits_of(uint8_images(100, 8))
    needed = sum(part.nbytes for part in (splits.train, splits.val, splits.test))
    assert needed == 100 * 3 * 8 * 8 + 100 * 8  # uint8 images (kept uint8 on the device), int64 labels
    assert splits.on_device("meta", free_bytes=math.ceil(needed / 0.25) - 1) is splits  # over the share
    assert splits.on_device("meta") is splits  # no free memory known there: the data stays
    moved = splits.on_device("meta", free_bytes=4 * needed)
    assert moved is not splits and moved.info == splits.info
    for part in (moved.train, moved.val, moved.test):
        assert part.images.device.type == "meta" and part.labels.device.type == "meta"
        assert part.images.dtype == torch.uint8
    again = splits.on_device("meta", free_bytes=0)  # already there: nothing moves, nothing is checked
    assert again.train is moved.train and again.val is moved.val and again.test is moved.test
    assert moved.train.to_device("meta") is moved.train
    restored = pickle.loads(pickle.dumps(splits.train))  # a pickle carries the CPU data, not the copies
    assert not restored.has_copy_on("meta") and splits.train.has_copy_on("meta")
    assert torch.equal(restored.images, splits.train.images)


def test_the_fit_check_leaves_three_quarters_of_the_free_memory():
    assert fits_on_device(250, 1000) and not fits_on_device(251, 1000)
    assert fits_on_device(10, 100, share=0.1) and not fits_on_device(11, 100, share=0.1)


def test_an_unknown_amp_is_refused():
    with pytest.raises(UserError, match="unknown amp 'fp16'"):
        autocast("cpu", "fp16")


def test_the_config_declares_amp_and_channels_last():
    from prunetune.search.config import ResourcesSection

    assert (ResourcesSection().amp, ResourcesSection().channels_last) == ("none", False)
    assert ResourcesSection(amp="bf16", channels_last=True).amp == "bf16"
    with pytest.raises(UserError, match="amp"):
        ResourcesSection(amp="fp16")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, image_size=8)  # 8x8: a 3-epoch run takes about a second


def short_run(digits, **options):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    trainer = Trainer(model, digits, TrainRecipe(epochs=3, lr=0.1, batch_size=64), seed=0, **options)
    return trainer, list(trainer.remaining_epochs())


def test_bf16_autocast_on_cpu_trains_about_as_well_as_float32(digits):
    _, fp32 = short_run(digits)
    trainer, bf16 = short_run(digits, amp="bf16")
    assert all(math.isfinite(r.train_loss) and math.isfinite(r.val_loss) for r in bf16)
    assert fp32[-1].val_accuracy > 0.5  # it learned, so "close" says something
    assert abs(bf16[-1].val_accuracy - fp32[-1].val_accuracy) <= 0.05
    assert bf16[-1].train_loss != fp32[-1].train_loss  # bf16 did run: its rounding shows
    accuracy, loss = evaluate(trainer.model, digits.val, amp="bf16")
    assert abs(accuracy - bf16[-1].val_accuracy) <= 0.02 and math.isfinite(loss)
    assert next(trainer.model.parameters()).dtype == torch.float32  # weights stay float32


def test_channels_last_computes_what_contiguous_does(digits):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    inputs = next(iter(make_loader(digits.val, 16, shuffle=False)))[0]
    expected = model(inputs)
    trainer = Trainer(model, digits, TrainRecipe(epochs=1, batch_size=64), seed=0, channels_last=True)
    weight = next(p for p in trainer.model.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    channels_last = trainer.model.eval()(inputs.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(channels_last, expected, atol=1e-5, rtol=1e-4)
    assert evaluate(model, digits.val, channels_last=True) == pytest.approx(evaluate(model, digits.val), abs=1e-5)


def test_channels_last_trains_as_contiguous_does(digits):
    trainer, contiguous = short_run(digits)
    _, channels_last = short_run(digits, channels_last=True)
    assert channels_last[0].train_loss == pytest.approx(contiguous[0].train_loss, rel=1e-3)  # rounding only
    assert abs(channels_last[-1].val_accuracy - contiguous[-1].val_accuracy) <= 0.05  # SGD amplifies it
    recalibrate_bn(trainer.model, digits.train, batches=2, channels_last=True, amp="bf16")  # runs, no error


def test_a_trial_runs_with_bf16_and_channels_last(digits):
    from prunetune.pruning.measure import measure
    from prunetune.pruning.policy import Policy
    from prunetune.search.prepare import model_space
    from prunetune.search.trial import TrialSetup, run_trial

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    space = model_space("small_cnn", digits.info)
    measured = measure(model, space.input_shape, batch_size=64, repeats=2)
    setup = TrialSetup(arch={"name": "small_cnn", "num_classes": 10, "in_channels": 1},
                       base_state=model.state_dict(), base_metrics={"macs": measured.macs, "params": measured.params},
                       space=space, splits=digits, finetune=TrainRecipe(epochs=1, lr=0.05, batch_size=64),
                       bn_recalibration_batches=2, latency_repeats=2, amp="bf16", channels_last=True)
    policy = Policy({group.name: 0.5 for group in space.groups})
    result = run_trial(setup, policy, seed=0, report=lambda metrics, writer: None, evaluate_test=True)
    assert math.isfinite(result["val_loss"]) and 0.0 <= result["test_accuracy"] <= 1.0
    assert result["macs_ratio"] < 1.0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_splits_live_on_the_device_and_give_the_cpu_batches():
    splits = splits_of(uint8_images(100, 32))
    free_before = torch.cuda.mem_get_info()[0]
    moved = splits.on_device("cuda")
    assert moved.train.images.is_cuda and moved.test.labels.is_cuda
    assert moved.train.images.dtype == torch.uint8
    assert splits.on_device("cuda").train is moved.train  # the second trial, or epoch, moves nothing
    assert splits.on_device(f"cuda:{torch.cuda.current_device()}").val is moved.val
    assert free_before > 0
    cpu = make_loader(splits.train, 16, shuffle=True, seed=3, augment="crop_flip", drop_last=True)
    gpu = make_loader(moved.train, 16, shuffle=True, seed=3, augment="crop_flip", drop_last=True)
    for (x, y), (x_gpu, y_gpu) in zip(cpu, gpu, strict=True):
        assert x_gpu.is_cuda and y_gpu.is_cuda
        assert torch.equal(y_gpu.cpu(), y) and torch.allclose(x_gpu.cpu(), x, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_a_bf16_channels_last_epoch_on_device_data_trains():
    digits = load_dataset("digits", seed=0).on_device("cuda")
    assert digits.train.images.is_cuda
    trainer, reports = short_run(digits, device="cuda", amp="bf16", channels_last=True)
    assert all(math.isfinite(r.train_loss) for r in reports) and reports[-1].val_accuracy > 0.5
    _, fp32 = short_run(digits, device="cuda")
    assert abs(reports[-1].val_accuracy - fp32[-1].val_accuracy) <= 0.05


def test_the_trials_of_a_worker_share_one_device_copy_of_the_search_splits(monkeypatch):
    """Ray hands every trial its setup unpickled anew; the moved splits are kept per process by the
    search's cache_key. The ``meta`` device stands in for a GPU with room for the data."""
    from dataclasses import replace

    import prunetune.pruning.data as data
    from prunetune.search.trial import RESIDENT, TrialSetup, on_device

    monkeypatch.setattr(data, "device_free_bytes", lambda device: 10**9)
    monkeypatch.setattr(RESIDENT, "_entries", type(RESIDENT._entries)())
    splits = splits_of(uint8_images(100, 8))

    def handed_to_a_trial(**changes) -> TrialSetup:
        setup = TrialSetup(arch={}, base_state={}, base_metrics={}, space=None,
                           splits=pickle.loads(pickle.dumps(splits)), finetune=TrainRecipe(epochs=1),
                           device="meta", cache_key="search-1")
        return replace(setup, **changes)

    first, second = on_device(handed_to_a_trial()), on_device(handed_to_a_trial())
    assert first.splits.train.images.device.type == "meta"
    assert second.splits.train is first.splits.train and second.splits.test is first.splits.test
    proxy = handed_to_a_trial()
    proxy = replace(proxy, finetune_splits=replace(proxy.splits, train=proxy.splits.train.subset(torch.arange(10))))
    moved = on_device(proxy)  # a proxy's training fraction moves; its validation split is the search's
    assert moved.finetune_splits.val is first.splits.val and len(moved.finetune_splits.train) == 10
    assert moved.finetune_splits.train.images.device.type == "meta"
    assert on_device(handed_to_a_trial(cache_key="search-2")).splits.train is not first.splits.train
    cpu = handed_to_a_trial(device="cpu")
    assert on_device(cpu).splits is cpu.splits  # on a CPU nothing moves and nothing is kept
