"""Importance criteria: one finite score per channel, and ARPruning's attention on constructed maps."""

import pytest
import torch

from prunetune.pruning.dependency import tp_group, trace_graph, trace_groups
from prunetune.pruning.errors import UserError
from prunetune.pruning.importance import attention_scores, criterion_names, get_criterion
from prunetune.pruning.models import classifier_layer, create_model


def test_attention_ranks_the_channel_that_shapes_the_map_first():
    torch.manual_seed(0)
    features = torch.full((2, 4, 6, 6), 0.5)
    features[:, 2, 1, 1] = 6.0  # channel 2 alone puts a hot spot on the map
    features[:, 3] = 0.0  # an all-zero channel
    features[:, 1] += 0.01 * torch.randn(2, 6, 6)
    scores = attention_scores(features)
    assert scores.argmax().item() == 2
    assert scores[3].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.all(scores >= 0)


def test_attention_matches_the_definition_for_one_channel():
    torch.manual_seed(1)
    f = torch.randn(3, 5, 4, 4)
    j = 2

    def q(x):
        v = x.pow(2).mean(dim=1).flatten(1)
        return v / v.norm(dim=1, keepdim=True)

    expected = (q(f) - q(torch.cat([f[:, :j], f[:, j + 1:]], dim=1))).pow(2).mean()
    assert attention_scores(f)[j].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["l1", "l2", "bn_scale", "fpgm", "taylor", "random", "attention"])
@pytest.mark.parametrize("model_name", ["tiny_resnet", "tiny_mobilenet", "tiny_concat"])
def test_every_criterion_gives_one_finite_score_per_channel(name, model_name):
    torch.manual_seed(0)
    model = create_model(model_name, 10, 3)
    graph = trace_graph(model, (3, 16, 16))
    traced = trace_groups(model, graph, ignored=[classifier_layer(model)])
    groups = {g.name: tp_group(graph, g.root) for g in traced}
    calib = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    scores = get_criterion(name)(model, groups, calib)
    assert set(scores) == set(groups)
    for g in traced:
        assert scores[g.name].shape == (g.channels,)
        assert torch.isfinite(scores[g.name]).all()
    assert all(p.grad is None for p in model.parameters())


def test_unknown_criterion_lists_the_valid_ones():
    with pytest.raises(UserError, match="attention"):
        get_criterion("l3")
    assert "attention" in criterion_names()


def test_activation_criteria_need_calibration():
    with pytest.raises(UserError, match="calibration"):
        get_criterion("attention")(create_model("tiny_resnet"), {}, None)
