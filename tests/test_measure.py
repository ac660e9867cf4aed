"""MACs against hand counts, parameters against numel, and latency that is sane and ordered."""

import math

import pytest
import torch
from torch import nn

from prunetune.pruning.errors import UserError
from prunetune.pruning.measure import (
    Measurement,
    count_macs,
    count_params,
    layer_macs,
    measure,
    measure_latency,
)


def tiny_net() -> nn.Sequential:
    """Conv 3->8 (8x8), depthwise 8 (groups=8, 8x8), strided conv 8->16 (4x4), pool, linear 16->10."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def test_layer_macs_match_hand_counts():
    macs = layer_macs(tiny_net(), (3, 8, 8))
    assert macs == {
        "0": 8 * 8 * 8 * 3 * 9,  # out elements (8 ch x 8 x 8) * in_channels * kh * kw
        "3": 8 * 8 * 8 * 1 * 9,  # depthwise: in_channels / groups = 1
        "4": 16 * 4 * 4 * 8 * 9,  # stride 2 halves the output to 4x4
        "7": 10 * 16,
    }
    assert count_macs(tiny_net(), (3, 8, 8)) == sum(macs.values())


def test_macs_follow_the_input_size():
    assert count_macs(tiny_net(), (3, 16, 16)) == 4 * (count_macs(tiny_net(), (3, 8, 8)) - 160) + 160


class Reuse(nn.Module):
    """Calls one conv twice and never calls another."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(2, 2, 1)
        self.unused = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.shared(x))


def test_called_twice_counts_twice_and_never_called_counts_nothing():
    assert layer_macs(Reuse(), (2, 4, 4)) == {"shared": 2 * (2 * 4 * 4 * 2), "unused": 0}


def test_linear_counts_every_output_position():
    model = nn.Sequential(nn.Flatten(2), nn.Linear(16, 3))  # (1, 2, 16) -> (1, 2, 3)
    assert count_macs(model, (2, 4, 4)) == 2 * 3 * 16


def test_params_are_every_element_of_every_parameter():
    model = tiny_net()
    model[0].weight.requires_grad_(False)
    expected = (8 * 3 * 9 + 8) + (8 + 8) + (8 * 9) + (16 * 8 * 9 + 16) + (10 * 16 + 10)
    assert count_params(model) == expected == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_measuring_restores_train_eval_mode(training):
    model = tiny_net().train(training)
    model[1].train(not training)  # a mixed model keeps its mix
    measure(model, (3, 8, 8), batch_size=2, repeats=2)
    assert model.training is training
    assert model[1].training is (not training)
    assert all(m.training is training for i, m in enumerate(model) if i != 1)


def test_measuring_leaves_batchnorm_statistics_alone():
    model = tiny_net().train()
    before = model[1].running_mean.clone()
    measure(model, (3, 8, 8), batch_size=2, repeats=2)
    assert torch.equal(model[1].running_mean, before)
    assert model[1].num_batches_tracked.item() == 0


def wide_net(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))


def test_latency_is_positive_finite_and_grows_with_macs():
    small, big = wide_net(4), wide_net(64)
    assert count_macs(big, (3, 32, 32)) > 100 * count_macs(small, (3, 32, 32))
    small_ms = measure_latency(small, (3, 32, 32), batch_size=4, repeats=7)
    big_ms = measure_latency(big, (3, 32, 32), batch_size=4, repeats=7)
    assert 0 < small_ms < big_ms < math.inf


def test_measure_bundles_all_costs():
    model = tiny_net()
    result = measure(model, (3, 8, 8), batch_size=4, repeats=3)
    assert isinstance(result, Measurement)
    assert result.macs == count_macs(model, (3, 8, 8))
    assert result.params == count_params(model)
    assert result.batch_size == 4
    assert result.latency_ms > 0 and result.latency_batch_ms > 0


def test_bad_shape_is_a_user_error():
    with pytest.raises(UserError, match="input_shape"):
        count_macs(tiny_net(), (8, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_latency_moves_the_model_back():
    model = tiny_net()
    assert measure_latency(model, (3, 8, 8), device="cuda", repeats=3) > 0
    assert next(model.parameters()).device.type == "cpu"


def test_latency_keeps_its_spread_and_the_load_beside_the_figure():
    from dataclasses import replace

    from prunetune.pruning.measure import Latency, time_latency

    threads = torch.get_num_threads()
    latency = time_latency(tiny_net(), (3, 8, 8), repeats=10, rounds=3, threads=1)
    assert isinstance(latency, Latency)
    assert latency.repeats == 12 and latency.rounds == 3  # at least 3 timings a round
    assert 0 < latency.ms <= latency.median_ms * 3 and latency.iqr_ms >= 0
    assert latency.threads == 1 and torch.get_num_threads() == threads  # the caller's threads restored
    record = latency.to_json()
    assert set(record) == {"latency_ms", "latency_median_ms", "latency_iqr_ms", "latency_repeats",
                           "latency_load_avg", "latency_threads", "latency_cpus"}
    assert Latency.from_json(record) == replace(latency, rounds=0)  # what a trial record keeps
    assert Latency.from_json({"latency_ms": 1.0}) is None  # a record of an older version: no spread
    assert measure(tiny_net(), (3, 8, 8), batch_size=2, repeats=3).latency.repeats >= 3


def test_a_latency_ratio_is_flagged_when_the_spread_or_the_load_makes_it_meaningless():
    from prunetune.pruning.measure import Latency, latency_warning

    def timing(iqr_ms: float, load: float | None) -> Latency:
        return Latency(ms=1.0, median_ms=1.0, iqr_ms=iqr_ms, repeats=20, rounds=5, load_avg=load, cpus=2)

    assert latency_warning(timing(0.05, 0.5), timing(0.1, 0.5)) is None
    assert "IQR 80% of the median" in latency_warning(timing(0.05, 0.5), timing(0.8, 0.5))
    assert "load average 16.3 on 2 CPUs" in latency_warning(timing(0.05, 16.3), timing(0.05, 0.5))
    assert latency_warning(timing(0.05, None)) is None  # no load average on this system: the spread decides
