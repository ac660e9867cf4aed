"""A MACs target a method cannot reach with its options is refused before anything trains
(``methods.reach``, called by the driver's ``check_target``): one line naming the option and the
lowest target it allows. The CLI rows are in tests/test_bad_input_regression.py."""

from __future__ import annotations

import pytest

from prunetune.methods.reach import check_reach, floor_macs_ratio
from prunetune.methods.registry import METHODS
from prunetune.pruning.errors import UserError


def model_and_space(name: str):
    from prunetune.pruning.dependency import build_space
    from prunetune.pruning.models import create_model

    model = create_model(name, num_classes=10, in_channels=1).eval()
    return model, build_space(model, name, (1, 16, 16))

HIGH_FLOOR = {"optuna": {"min_keep_ratio": 0.9}, "random": {"floor": 0.9}, "global": {"floor": 0.9},
              "arpruning": {"floor": 0.9}, "dcm": {"floor": 0.9}, "dcpa": {"width_min": 0.9}}


def test_every_method_with_a_lowest_keep_ratio_is_listed():
    from prunetune.methods.reach import floor_key

    searchers = {name for name, spec in METHODS.items()
                 if spec.kind != "learner" and floor_key(spec.options()) is not None}
    assert searchers == {"optuna", "random", "global", "arpruning"}


@pytest.mark.parametrize("method", sorted(HIGH_FLOOR))
def test_a_target_below_the_methods_floor_is_refused_naming_the_option(method):
    _, space = model_and_space("tiny_resnet")
    (key, value), = HIGH_FLOOR[method].items()
    lowest = floor_macs_ratio(space, value)
    assert 0.3 < lowest < 1
    with pytest.raises(UserError, match=rf"{METHODS[method].options.section}\.{key}") as refused:
        check_reach(method, space, macs_target=0.2, options=HIGH_FLOOR[method])
    assert "raise --macs-target to at least" in str(refused.value)
    check_reach(method, space, macs_target=0.99, options=HIGH_FLOOR[method])  # reachable: no error


def test_searching_depth_lowers_the_floor_and_the_refusal_says_so():
    _, space = model_and_space("tiny_resnet")
    assert space.droppable_blocks
    deep = floor_macs_ratio(space, 0.9, drop_blocks=True)
    assert deep < floor_macs_ratio(space, 0.9)
    check_reach("random", space, macs_target=deep + 1e-3, options={"floor": 0.9, "search_depth": True})
    with pytest.raises(UserError, match="every droppable block dropped") as refused:
        check_reach("random", space, macs_target=deep - 1e-3, options={"floor": 0.9, "search_depth": True})
    assert f"raise --macs-target to at least {deep:.3f}, or lower --set random.floor" in str(refused.value)
    with pytest.raises(UserError, match="random.floor 0.9"):
        check_reach("random", space, macs_target=deep + 1e-3, options={"floor": 0.9})


def test_uniform_and_low_floors_pass():
    _, space = model_and_space("tiny_resnet")
    for method in ("uniform", "optuna", "random", "global", "arpruning"):
        check_reach(method, space, macs_target=0.2)  # defaults: the floor 0.1 reaches 0.2
