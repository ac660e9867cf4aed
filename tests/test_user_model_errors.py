"""A user's own model, weights and importance criterion that cannot work: one line, exit 2, no traceback.

The model file's factory raising, a model file that is no Python file, a weights file ``torch.load``
cannot read, the training checkpoints and DataParallel state_dicts that are read, and ``bn_scale``
on a model without BatchNorm (``pruning.user_models``, ``pruning.importance``). The CLI runs in
this process (``cli.main``): each refusal comes before Ray starts.
"""

from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch
from torch import nn

from prunetune.pruning.errors import UserError
from tests.search_helpers import assert_user_error

NETS = textwrap.dedent('''
    from torch import nn


    def raises(num_classes):
        raise ValueError("boom in factory\\nits second line")


    class Raising(nn.Module):
        def __init__(self, num_classes, in_channels):
            super().__init__()
            raise RuntimeError("no such layer")


    class BodyTypeError(nn.Module):  # a TypeError of the constructor's body, not of its arguments
        def __init__(self, num_classes):
            super().__init__()
            self.width = None + 1


    class Net(nn.Module):
        def __init__(self, num_classes, in_channels, norm=True):
            super().__init__()
            norm_layer = nn.BatchNorm2d if norm else (lambda channels: nn.Identity())
            self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), norm_layer(8), nn.ReLU(),
                                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))


    def no_batchnorm(num_classes, in_channels):
        return Net(num_classes, in_channels, norm=False)
''')
DATA = ["--dataset", "digits", "--image-size", "8"]
PRUNE = ["prune", *DATA, "--uniform", "0.5"]


@pytest.fixture
def nets(tmp_path):
    """``nets/nets.py`` in the test's folder, the CLI's working directory."""
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "nets.py").write_text(NETS)
    return tmp_path


def cli(argv: list[str], cwd, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """``prunetune ARGV`` through ``cli.main`` in this process, in ``cwd`` with its own cache."""
    from prunetune.search.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PRUNETUNE_CACHE", str(cwd / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, status, out, err)


def build(ref: str, **model_args) -> nn.Module:
    from prunetune.pruning.models import create_model

    return create_model(ref, num_classes=10, in_channels=1, model_args=model_args)


# ----------------------------------------------------------------------------------------------
# The model's factory or file
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory, says", [
    ("raises", "nets/nets.py:raises' raised ValueError: boom in factory; fix the model's constructor"),
    ("Raising", "nets/nets.py:Raising' raised RuntimeError: no such layer; fix the model's constructor"),
    ("BodyTypeError", "nets/nets.py:BodyTypeError' raised TypeError: unsupported operand"),
])
def test_a_factory_that_raises_is_one_line(nets, capsys, monkeypatch, factory, says):
    result = cli(["space", "--model", f"nets/nets.py:{factory}", *DATA], nets, capsys, monkeypatch)
    assert_user_error(result, says)
    assert "its second line" not in result.stderr  # the message's first line only


def test_run_refuses_a_raising_factory_before_anything_is_written(nets, capsys, monkeypatch):
    result = cli(["run", "--model", "nets/nets.py:raises", *DATA, "--pretrain-epochs", "1",
                  "--storage", str(nets / "runs"), "--name", "x"], nets, capsys, monkeypatch)
    assert_user_error(result, "raised ValueError: boom in factory; fix the model's constructor")
    assert not (nets / "runs" / "x").exists() and not (nets / "cache").exists()


def test_arguments_the_factory_does_not_take_are_still_named(nets):
    with pytest.raises(UserError, match=r"refused its arguments \['depth', 'in_channels', 'num_classes'\]"):
        build(f"{nets}/nets/nets.py:Net", depth=3)


@pytest.mark.parametrize("name", ["notpy.txt", "absent.txt", "nets"])
def test_a_model_file_that_is_no_python_file_is_one_line(nets, capsys, monkeypatch, name):
    (nets / "notpy.txt").write_text("class X: pass\n")
    result = cli(["space", "--model", f"./{name}:X", *DATA], nets, capsys, monkeypatch)
    assert_user_error(result, f"names the file ./{name}, which is not a Python file (.py)")


# ----------------------------------------------------------------------------------------------
# Weights files
# ----------------------------------------------------------------------------------------------


def _truncated_zip(path) -> None:
    torch.save(nn.Linear(2, 2).state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("write, reason", [
    (lambda path: path.write_text("hello"), "(torch.load: KeyError: 101)"),
    (lambda path: path.write_bytes(b""), "(the file is empty)"),
    (lambda path: path.write_bytes(bytes(range(200, 256)) * 4), "(UnpicklingError: Unsupported operand"),
    (_truncated_zip, "(a damaged zip archive: RuntimeError: PytorchStreamReader failed reading zip archive"),
])
def test_a_weights_file_torch_cannot_read_is_one_line(tmp_path, write, reason):
    from prunetune.pruning.user_models import load_weights

    path = tmp_path / "w.pt"
    write(path)
    with pytest.raises(UserError, match="is not a torch checkpoint") as refused:
        load_weights(build("small_cnn"), path, model_name="small_cnn")
    assert reason in str(refused.value)
    assert str(refused.value).endswith(f"; pass a file written by torch.save(model.state_dict(), {path})")


def test_prune_refuses_a_text_file_as_weights(tmp_path, capsys, monkeypatch):
    (tmp_path / "w_text.pt").write_text("hello")
    result = cli([*PRUNE, "--model", "small_cnn", "--weights", "w_text.pt"], tmp_path, capsys, monkeypatch)
    assert_user_error(result, "w_text.pt is not a torch checkpoint (torch.load: KeyError: 101); pass a file "
                              "written by torch.save(model.state_dict(), ")
    assert not (tmp_path / "cache").exists()


def test_a_pickled_module_names_what_weights_only_refuses(tmp_path):
    from prunetune.pruning.user_models import load_weights

    torch.save(build("small_cnn"), tmp_path / "module.pt")
    with pytest.raises(UserError, match=r"holds a pickled object, not a state_dict \(weights_only=True refuses "
                                        r"prunetune\.pruning\.models\."):
        load_weights(build("small_cnn"), tmp_path / "module.pt", model_name="small_cnn")


def _wrapped(key: str):
    return lambda model: {"epoch": 3, key: model.state_dict(), "optimizer": {"state": {}, "param_groups": []}}


@pytest.mark.parametrize("checkpoint", [
    _wrapped("model"), _wrapped("model_state_dict"), _wrapped("state_dict"), _wrapped("net"),
    lambda model: nn.DataParallel(model).state_dict(),  # every key prefixed "module."
    lambda model: {"model": nn.DataParallel(model).state_dict()},
    lambda model: {"model": torch.zeros(3), "net": model.state_dict()},  # the first key holding a state_dict
], ids=["model", "model_state_dict", "state_dict", "net", "data-parallel", "data-parallel-in-a-checkpoint",
        "a-tensor-under-model"])
def test_checkpoints_and_data_parallel_state_dicts_are_read(tmp_path, checkpoint):
    from prunetune.pruning.user_models import load_weights

    torch.manual_seed(1)
    trained = build("small_cnn")
    torch.save(checkpoint(trained), tmp_path / "w.pt")
    loaded = load_weights(build("small_cnn"), tmp_path / "w.pt", model_name="small_cnn").state_dict()
    assert loaded.keys() == trained.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())


def test_a_dict_without_a_state_dict_names_its_keys_and_the_wrappers_read(tmp_path):
    from prunetune.pruning.user_models import load_weights

    torch.save({"epoch": 3, "weights": {"a": 1}}, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"holds a dict of 'epoch', 'weights', not a state_dict of tensors; .* "
                                        r"under 'state_dict', 'model_state_dict', 'model' or 'net'$"):
        load_weights(build("small_cnn"), tmp_path / "w.pt", model_name="small_cnn")


def test_a_prefix_on_every_key_is_named(tmp_path):
    from prunetune.pruning.user_models import load_weights

    torch.save({f"model.{k}": v for k, v in build("small_cnn").state_dict().items()}, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"key 'features.0.weight' is missing from the file, whose keys all start "
                                        r"with 'model.' \('model.features.0.weight'\); save the state_dict of the "
                                        r"model itself, without that prefix"):
        load_weights(build("small_cnn"), tmp_path / "w.pt", model_name="small_cnn")


def test_pretrain_epochs_beside_weights_are_refused():
    from prunetune.pruning.user_models import check_weights_alone

    check_weights_alone(None, 3)
    check_weights_alone("w.pt", None)
    with pytest.raises(UserError, match=r"^--pretrain-epochs 3 has no effect with --weights w.pt: .*; drop "
                                        r"--pretrain-epochs, or drop --weights to pretrain it$"):
        check_weights_alone("w.pt", 3)


# ----------------------------------------------------------------------------------------------
# bn_scale on a model without BatchNorm
# ----------------------------------------------------------------------------------------------

NO_BN_RULE = ("importance bn_scale needs a BatchNorm after each prunable layer; {model}'s features.0 has none; "
              "choose --importance l1 (or --set importance=l1)")


def _space(model, ref):
    from prunetune.pruning.dependency import build_space

    return build_space(model, ref, (1, 8, 8))


def test_bn_scale_is_checked_against_the_model(nets):
    from prunetune.pruning.importance import check_criterion_fits

    ref = f"{nets}/nets/nets.py:no_batchnorm"
    model = build(ref)
    with pytest.raises(UserError) as refused:
        check_criterion_fits("bn_scale", model, _space(model, ref), model_name=ref)
    assert str(refused.value) == NO_BN_RULE.format(model=ref)
    check_criterion_fits("l1", model, _space(model, ref), model_name=ref)  # magnitude needs no BatchNorm
    for fitting in (f"{nets}/nets/nets.py:Net", "small_cnn", "tiny_resnet"):
        check_criterion_fits("bn_scale", build(fitting), _space(build(fitting), fitting), model_name=fitting)


def test_bn_scale_refuses_to_score_a_group_without_batchnorm(nets):
    from prunetune.pruning.policy import Policy
    from prunetune.pruning.surgery import prune

    ref = f"{nets}/nets/nets.py:no_batchnorm"
    model = build(ref)
    space = _space(model, ref)
    with pytest.raises(UserError, match="^" + NO_BN_RULE.format(model="Net").replace("(", r"\(").replace(")", r"\)")):
        prune(model, space, Policy.uniform(space, 0.5), importance="bn_scale")


def test_prune_with_bn_scale_on_a_model_without_batchnorm_is_one_line(nets, capsys, monkeypatch):
    argv = [*PRUNE, "--model", "nets/nets.py:no_batchnorm", "--importance", "bn_scale", "--pretrain-epochs", "1"]
    result = cli(argv, nets, capsys, monkeypatch)
    assert_user_error(result, "importance bn_scale needs a BatchNorm after each prunable layer")


class _Reached(Exception):
    """The command got past its checks to where the base model is made."""


def test_run_refuses_bn_scale_on_a_model_without_batchnorm_before_the_base_model(nets, capsys, monkeypatch):
    import prunetune.search.driver as driver

    monkeypatch.setattr(driver, "_ray_and_base_model", lambda *a, **k: (_ for _ in ()).throw(_Reached()))
    result = cli(["run", "--model", "nets/nets.py:no_batchnorm", "--method", "dcm", *DATA, "--pretrain-epochs",
                  "1", "--storage", str(nets / "runs"), "--name", "x"], nets, capsys, monkeypatch)
    assert_user_error(result, "importance bn_scale needs a BatchNorm after each prunable layer; ")


def test_prune_refuses_bn_scale_before_pretraining(nets, capsys, monkeypatch):
    from prunetune.search.commands import common

    monkeypatch.setattr(common, "pretrained_base", lambda *a, **k: (_ for _ in ()).throw(_Reached()))
    argv = [*PRUNE, "--model", "nets/nets.py:no_batchnorm", "--importance", "bn_scale", "--pretrain-epochs", "1"]
    result = cli(argv, nets, capsys, monkeypatch)
    assert_user_error(result, "importance bn_scale needs a BatchNorm after each prunable layer; ")


def test_run_refuses_pretrain_epochs_beside_weights(tmp_path, capsys, monkeypatch):
    import prunetune.search.driver as driver

    monkeypatch.setattr(driver, "_ray_and_base_model", lambda *a, **k: (_ for _ in ()).throw(_Reached()))
    torch.save(build("small_cnn").state_dict(), tmp_path / "w.pt")
    result = cli(["run", "--model", "small_cnn", *DATA, "--weights", "w.pt", "--pretrain-epochs", "2",
                  "--storage", str(tmp_path / "runs"), "--name", "x"], tmp_path, capsys, monkeypatch)
    assert_user_error(result, "--pretrain-epochs 2 has no effect with --weights ")


def test_prune_refuses_pretrain_epochs_beside_weights(tmp_path, capsys, monkeypatch):
    import prunetune.search.prepare as prepare

    monkeypatch.setattr(prepare, "given_weights_model", lambda *a, **k: (_ for _ in ()).throw(_Reached()))
    torch.save(build("small_cnn").state_dict(), tmp_path / "w.pt")
    result = cli([*PRUNE, "--model", "small_cnn", "--weights", "w.pt", "--pretrain-epochs", "2"], tmp_path, capsys,
                 monkeypatch)
    assert_user_error(result, "--pretrain-epochs 2 has no effect with --weights w.pt")
