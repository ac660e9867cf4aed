"""Issue 14: the user's own model (file path, import path, torchvision:NAME), weights and ONNX export.

End to end on digits at 8x8: a model class defined in a file this test writes goes through `run`
(real Ray workers import the file), `export` (state, TorchScript, ONNX) and a reload in a fresh
process; torchvision:resnet18 with the test's own state_dict keeps its weights when pruned at
keep ratio 1.0. Bad input is one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from prunetune.pruning.errors import UserError
from tests.search_helpers import QUICK, assert_user_error, read_jsonl, run_cli

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class MyNet(nn.Module):
        def __init__(self, num_classes, in_channels, width=8):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU())
            self.head = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))


    def three(num_classes):
        return 3
''')
# QUICK without its model, digits at 8x8
DATA = ["--dataset", "digits", "--image-size", "8"]
SEARCH = [*DATA, "--finetune-epochs", "1", "--set", "finetune.bn_recalibration_batches=2",
          "--set", "optuna.n_startup_trials=2", "--set", "final.epochs=0"]


def write_model(folder):
    path = folder / "mynet.py"
    path.write_text(MODEL_FILE)
    return path


def digits_info():
    from prunetune.pruning.data import load_dataset

    return load_dataset("digits", image_size=8)


@pytest.mark.slow
def test_file_model_run_export_and_reload(tmp_path, tracking_store):
    from prunetune.pruning.models import create_model
    from prunetune.pruning.train import evaluate

    path = write_model(tmp_path)
    ref = f"{path}:MyNet"
    torch.manual_seed(0)
    given = create_model(ref, num_classes=10, in_channels=1, model_args={"width": 6})
    torch.save(given.state_dict(), tmp_path / "w.pt")
    result = run_cli(["run", "--model", ref, "--set", "model_args.width=6", "--weights", str(tmp_path / "w.pt"),
                      *SEARCH, "--trials", "2", "--concurrency", "2", "--name", "own",
                      "--storage", str(tracking_store(tmp_path / "runs"))], cache=tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not pretrained" in result.stderr and not (tmp_path / "cache").exists()
    run_dir = tmp_path / "runs" / "own"
    records = read_jsonl(run_dir / "trials.jsonl")
    assert [r["status"] for r in records] == ["finished", "finished"]  # the Ray workers built MyNet
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["baseline"]["val_accuracy"] == evaluate(given, digits_info().val)[0]  # the data as given

    outputs = {}
    for fmt, name in (("state", "p.pt"), ("torchscript", "p.ts"), ("onnx", "p.onnx")):
        exported = run_cli(["export", str(run_dir), "--out", str(tmp_path / name), "--format", fmt, "--check"],
                           cache=tmp_path / "cache", cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr[-2000:]
        outputs[fmt] = exported.stdout
    assert "largest difference from PyTorch's logits" in outputs["onnx"]
    gap = float(outputs["onnx"].rsplit(" ", 1)[1])
    assert gap < 1e-4

    # another process (as another machine with the same file) rebuilds MyNet from the saved arch
    script = textwrap.dedent(f'''
        import torch, onnxruntime
        from prunetune import load_pruned
        model, meta = load_pruned({str(tmp_path / "p.pt")!r})
        model.eval()
        assert type(model).__name__ == "MyNet" and meta["arch"]["model_args"] == {{"width": 6}}
        x = torch.randn(3, 1, 8, 8)
        want = model(x)
        ts = torch.jit.load({str(tmp_path / "p.ts")!r})(x)
        ort = onnxruntime.InferenceSession({str(tmp_path / "p.onnx")!r}).run(None, {{"input": x.numpy()}})[0]
        assert torch.allclose(ts, want, atol=1e-5) and torch.allclose(torch.from_numpy(ort), want, atol=1e-4)
        print("ok", meta["arch"]["name"])
    ''')
    reloaded = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
    assert reloaded.returncode == 0, reloaded.stderr[-2000:]
    assert reloaded.stdout.split() == ["ok", ref]


def test_torchvision_resnet18_keeps_given_weights(tmp_path):
    import prunetune
    from prunetune.pruning.models import create_model
    from prunetune.pruning.train import evaluate

    torch.manual_seed(1)
    given = create_model("torchvision:resnet18", num_classes=10, in_channels=1).eval()
    torch.save(given.state_dict(), tmp_path / "w.pt")
    result = run_cli(["prune", "--model", "torchvision:resnet18", *DATA, "--weights", str(tmp_path / "w.pt"),
                      "--uniform", "1.0", "--json", "--out", str(tmp_path / "p.pt")],
                     cache=tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["base"]["val_accuracy"] == evaluate(given, digits_info().val)[0]
    assert not (tmp_path / "cache").exists()  # nothing pretrained

    x = torch.randn(4, 1, 8, 8)
    kept = prunetune.prune(given, 1.0, input_shape=(1, 8, 8)).eval()
    with torch.no_grad():
        assert torch.equal(kept(x), given(x))
    half = prunetune.prune(given, 0.5, input_shape=(1, 8, 8))
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in given.parameters())


def test_import_path_model_and_its_cache_key(tmp_path, monkeypatch):
    from prunetune.pruning.models import create_model
    from prunetune.pruning.train import TrainRecipe, pretrain_path

    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    write_model(tmp_path / "userpkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("userpkg.mynet:MyNet", num_classes=3, in_channels=2, model_args={"width": 4})
    assert model(torch.zeros(1, 2, 8, 8)).shape == (1, 3)
    names = {pretrain_path("userpkg.mynet:MyNet", "d", TrainRecipe(), 0, tmp_path, args).name
             for args in ({"width": 4}, {"width": 5})}
    assert len(names) == 2 and all("/" not in name for name in names)


def test_cluster_runtime_env_ships_the_users_code(tmp_path, monkeypatch):
    from prunetune.pruning.user_models import code_to_ship, resolve_factory
    from prunetune.search.config import load_config
    from prunetune.search.ray_session import user_code_runtime_env

    path = write_model(tmp_path)
    cfg = load_config(None, overrides={"model": f"{path}:MyNet", "address": "10.0.0.1:6379"}, names=False)
    assert user_code_runtime_env(cfg) == {"py_modules": [str(path)]}
    assert user_code_runtime_env(load_config(None, overrides={"model": f"{path}:MyNet"})) is None  # local Ray
    assert code_to_ship("torchvision:resnet18") == [] and code_to_ship("small_cnn") == []
    # a worker where the recorded path is missing imports the shipped file by its stem
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_factory(f"{tmp_path / 'elsewhere' / 'mynet.py'}:MyNet").__name__ == "MyNet"


@pytest.mark.parametrize("model, fragment", [
    ("nosuchpkg.mod:Net", "cannot import module 'nosuchpkg.mod'"),
    ("{dir}/mynet.py:three", "returned a int, not a torch.nn.Module"),
    ("{dir}/mynet.py:Nope", "has no attribute 'Nope'"),
    ("torchvision:resnet1000", "torchvision has no classification model 'resnet1000'"),
])
def test_bad_model_reference_is_one_line(tmp_path, model, fragment):
    write_model(tmp_path)
    result = run_cli(["run", "--model", model.format(dir=tmp_path), *QUICK[2:], "--storage", str(tmp_path / "runs")],
                     cache=tmp_path / "cache", cwd=tmp_path)
    assert_user_error(result, fragment)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_bad_weights_are_one_line(tmp_path):
    from prunetune.pruning.models import create_model

    path = write_model(tmp_path)
    ref = f"{path}:MyNet"
    torch.save(create_model(ref, 10, 1, {"width": 4}).state_dict(), tmp_path / "narrow.pt")
    torch.save(create_model(ref, 10, 1), tmp_path / "module.pt")
    for weights, fragment in (("narrow.pt", "key 'features.0.weight' has shape (4, 1, 3, 3) in the file, "
                                            "(8, 1, 3, 3) in the model"),
                              ("module.pt", "holds a pickled object, not a state_dict")):
        result = run_cli(["run", "--model", ref, "--weights", str(tmp_path / weights), *SEARCH,
                          "--storage", str(tmp_path / "runs")], cache=tmp_path / "cache", cwd=tmp_path)
        assert_user_error(result, fragment)
        assert not (tmp_path / "runs").exists()


def test_registry_model_refuses_model_args():
    from prunetune.pruning.models import create_model

    with pytest.raises(UserError, match="takes no model_args"):
        create_model("small_cnn", model_args={"width": 3})


DATA_FILE = textwrap.dedent('''
    import torch
    from sklearn.datasets import load_digits


    def make():
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        pairs = list(zip(images, digits.target.tolist()))
        return pairs[:1200], pairs[1200:1400], pairs[1400:]


    def flat():
        digits = load_digits()
        pairs = [(torch.tensor(image, dtype=torch.float32), int(t)) for image, t in zip(digits.images, digits.target)]
        return pairs[:100], pairs[100:150]
''')


def test_dataset_factory_infers_classes_and_shape(tmp_path):
    from prunetune.pruning.data import load_dataset

    (tmp_path / "mydata.py").write_text(DATA_FILE)
    splits = load_dataset(f"{tmp_path / 'mydata.py'}:make", image_size=8)
    info = splits.info
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1200, 200, 397)  # its own val split
    result = run_cli(["prune", "--model", "small_cnn", "--dataset", "mydata.py:make", "--image-size", "8",
                      "--pretrain-epochs", "1", "--uniform", "0.5", "--json", "--cache-dir", str(tmp_path / "cache")],
                     cache=tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["macs_ratio"] < 0.5


def test_dataset_factory_of_the_wrong_shape_is_one_line(tmp_path):
    (tmp_path / "mydata.py").write_text(DATA_FILE)
    result = run_cli(["run", *QUICK[:2], "--dataset", "mydata.py:flat", "--storage", str(tmp_path / "runs")],
                     cache=tmp_path / "cache", cwd=tmp_path)
    assert_user_error(result, "train image 0 has shape (8, 8), not (C, H, W)")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def build_registered(num_classes, in_channels):
    from prunetune.pruning.models import create_model

    return create_model("small_cnn", num_classes=num_classes, in_channels=in_channels)


def test_a_model_registered_at_run_time_travels_by_reference(monkeypatch):
    from prunetune.pruning import models
    from prunetune.pruning.user_models import portable_name

    monkeypatch.setitem(models.MODEL_BUILDERS, "mine", build_registered)
    ref = portable_name("mine")
    assert ref == "tests.test_own_model:build_registered" and portable_name("small_cnn") == "small_cnn"
    assert models.create_model(ref, num_classes=3, in_channels=1)(torch.zeros(1, 1, 8, 8)).shape == (1, 3)


def test_space_lists_the_layers_left_whole(tmp_path):
    path = write_model(tmp_path)
    result = run_cli(["space", "--model", f"{path}:MyNet", *DATA, "--set", "model_args.width=4"],
                     cache=tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left whole (output channels not pruned): head" in result.stdout
    assert result.stdout.split("features.0")[1].split()[0] == "4"  # model_args reached the factory
