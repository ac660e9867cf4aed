"""import_torchvision: torchvision imports and runs on this torch, once or twice per process.

Each check runs in a fresh interpreter, since torchvision and the op schemas can be imported and
defined only once per process.
"""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_fresh(code: str) -> str:
    """Run ``code`` in a new Python process at the repository root and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_resnet18_runs_a_forward_pass_and_a_second_import_is_harmless():
    out = _run_fresh(
        "import torch\n"
        "from prunetune.pruning.torchvision_compat import import_torchvision\n"
        "tv = import_torchvision()\n"
        "again = import_torchvision()\n"
        "assert again is tv\n"
        "model = tv.models.resnet18(weights=None).eval()\n"
        "with torch.no_grad():\n"
        "    y = model(torch.randn(1, 3, 32, 32))\n"
        "print(tuple(y.shape))\n"
    )
    assert out.strip() == "(1, 1000)"


def test_schemas_are_defined_at_most_once_and_only_when_ops_are_missing():
    out = _run_fresh(
        "import torch\n"
        "from prunetune.pruning import torchvision_compat as compat\n"
        "loads = compat._torchvision_ops_available()\n"
        "compat.import_torchvision()\n"
        "first = compat._SCHEMA_LIBRARY\n"
        "compat._define_missing_schemas()\n"
        "assert compat._SCHEMA_LIBRARY is first\n"
        "assert (first is None) == loads\n"
        "assert hasattr(torch.ops.torchvision, 'nms')\n"
        "print('ok')\n"
    )
    assert out.strip() == "ok"
