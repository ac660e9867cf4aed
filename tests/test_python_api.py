"""Issue 14: the Python API's README example runs as written (its own model, a real Ray Tune search,
the best model loaded back), and prunetune.prune / prunetune.load_pruned."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.search_helpers import cli_env

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first python block of README's "Python API" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path, tracking_store):
    code = readme_example()
    tracking_store(tmp_path / "runs")  # the example's storage="runs"
    assert len(code.strip().splitlines()) <= 25
    (tmp_path / "example.py").write_text(code)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=cli_env(tmp_path / "cache"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ratio, shape = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert float(ratio) <= 0.5 + 0.02 and shape == "torch.Size([1, 10])"
    (run_dir,) = (tmp_path / "runs").glob("optuna-Net-digits-*")
    assert (run_dir / "summary.json").is_file()


def test_prune_and_load_pruned(tmp_path):
    import prunetune
    from prunetune.pruning.dependency import build_space
    from prunetune.pruning.models import create_model
    from prunetune.pruning.surgery import save_pruned

    model = create_model("tiny_resnet", num_classes=4, in_channels=1).eval()
    space = build_space(model, "tiny_resnet", (1, 8, 8))
    policy = {g.name: 0.5 for g in space.groups}
    calib = [(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,)))]
    pruned = prunetune.prune(model, policy, importance="taylor", calib=calib)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    save_pruned(tmp_path / "p.pt", pruned, arch={"name": "tiny_resnet", "num_classes": 4, "in_channels": 1},
                space=space, policy=space.uniform_policy(0.5).with_ratios(policy))
    loaded, meta = prunetune.load_pruned(tmp_path / "p.pt")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned.eval()(x))
    with pytest.raises(prunetune.pruning.errors.UserError, match="input_shape"):
        prunetune.prune(model, 0.5)


class Wide(torch.nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, 4, 3)
        self.head = torch.nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_search_takes_a_class_a_function_or_an_instance(tmp_path):
    from prunetune.api import _model_keys

    assert _model_keys(Wide, None, tmp_path) == {"model": "tests.test_python_api:Wide", "weights": None}
    assert _model_keys(readme_example, "w.pt", tmp_path)["model"] == "tests.test_python_api:readme_example"
    instance = Wide()
    keys = _model_keys(instance, None, tmp_path)
    assert keys["model"] == "tests.test_python_api:Wide"
    saved = torch.load(keys["weights"], weights_only=True)
    assert torch.equal(saved["conv.weight"], instance.conv.weight)
    with pytest.raises(prunetune_errors().UserError, match="not a module-level class or function"):
        _model_keys(lambda num_classes: Wide(num_classes), None, tmp_path)


def prunetune_errors():
    from prunetune.pruning import errors

    return errors
