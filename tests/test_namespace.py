"""One import namespace: the repository's folders install as ``prunetune.*``, so a user's own
``search.py``, ``tracking.py`` or ``methods/`` in the working directory changes nothing that
``prunetune`` imports, in the driver or in its Ray workers (DESIGN.md, Layout)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.search_helpers import QUICK, read_jsonl, run_cli

ROOT = Path(__file__).resolve().parents[1]
SHADOWS = ("search.py", "tracking.py", "pruning.py", "cluster.py", "methods/__init__.py")


def test_every_package_folder_installs_under_prunetune():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: Path(path) for name, path in setuptools["package-dir"].items()}
    found = {"prunetune"}
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *relative)))
    assert sorted(setuptools["packages"]) == sorted(found)
    assert all(name == "prunetune" or name.startswith("prunetune.") for name in folders)


def test_the_old_top_level_names_are_not_installed(tmp_path):
    code = "import importlib.util as u; print([n for n in ('search', 'methods', 'pruning') if u.find_spec(n)])"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_users_own_modules_in_the_working_directory_change_nothing(tmp_path):
    """Measured before the namespace: both trials failed in the workers (ActorDiedError), exit 0."""
    for name in SHADOWS:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    result = run_cli(["run", *QUICK, "--method", "random", "--trials", "2", "--name", "shadowed",
                      "--storage", str(tmp_path / "runs")], cache=tmp_path / "cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(tmp_path / "runs" / "shadowed" / "trials.jsonl")
    assert [r["status"] for r in records] == ["finished", "finished"]
    assert "the user's own" not in result.stderr
