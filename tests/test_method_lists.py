"""Every list of methods a user reads agrees with the registry (issue: options declared once):
`prunetune run --help`, README's table of methods and its config reference, and the config's
method sections; the shipped configs name no list of their own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from prunetune.methods.registry import METHODS, method_sections
from prunetune.search.config import METHOD_SECTIONS, describe_config

ROOT = Path(__file__).resolve().parents[1]


def test_run_help_lists_every_method():
    done = subprocess.run([sys.executable, "-m", "prunetune.search.cli", "run", "--help"], capture_output=True,
                          text=True, timeout=60, check=True)
    text = " ".join(done.stdout.split())
    for name, spec in METHODS.items():
        assert f"{name} ({spec.kind})" in text


def test_the_shipped_configs_do_not_copy_the_method_list():
    """A list of methods in a YAML comment would be one more copy to keep in step; they point to --help."""
    for path in (ROOT / "search/configs").glob("*.yaml"):
        for line in path.read_text().splitlines():
            if line.startswith("method:"):
                assert sum(name in line for name in METHODS) <= 1, (path.name, line)


def test_readme_has_a_row_per_method():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Methods"):]
    table = section[:section.index("\n\n", section.index("| `--method`"))]
    rows = [name for name in re.findall(r"^\| `([\w-]+)`", table, flags=re.M) if name != "--method"]
    assert sorted(rows) == sorted(METHODS)


def test_the_config_sections_are_the_registered_options():
    assert method_sections() == METHOD_SECTIONS
    for name, spec in METHODS.items():
        if spec.section is not None:
            assert METHOD_SECTIONS[spec.section] is spec.options, name
            assert spec.section == name.replace("-", "_")
    documented = {row.key.split(".")[0] for row in describe_config() if "." in row.key}
    assert set(METHOD_SECTIONS) <= documented
