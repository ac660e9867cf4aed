"""One import namespace: the repository's folders install as ``prunetune.*``, so a user's own
``search.py``, ``tracking.py`` or ``methods/`` in the working directory changes nothing that
``prunetune`` imports, in the driver or in its Ray workers (DESIGN.md, Layout)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.search_helpers import SHADOWS, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


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
def test_a_users_own_modules_in_the_working_directory_change_nothing(optuna_search):
    """Measured before the namespace: both trials failed in the workers (ActorDiedError), exit 0.
    The session's Optuna search (conftest) runs among the shadowing modules and exits 0."""
    work, run_dir, result = optuna_search
    assert all((work / name).is_file() for name in SHADOWS)
    records = read_jsonl(run_dir / "trials.jsonl")
    assert [r["status"] for r in records] == ["finished"] * 4
    assert "the user's own" not in result.stderr
