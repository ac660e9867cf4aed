"""README against the declarations it describes (as its config reference is checked against the
schema): its command synopses list every option each command's parser declares, and its lists of
importance criteria name every criterion of ``pruning.importance.CRITERIA``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from prunetune.search.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _code_lines(text: str) -> list[list[str]]:
    """The lines of every fenced code block of ``text``."""
    blocks, block = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if block is not None:
                blocks.append(block)
            block = None if block is not None else []
        elif block is not None:
            block.append(line)
    return blocks


def synopses(text: str, command: str) -> list[str]:
    """Every synopsis of ``command`` in README: a code line ``prunetune COMMAND ...`` with a
    placeholder in capitals (``RUN_DIR``, ``MODEL``; an example has none), joined with its indented
    continuation lines, a trailing comment cut."""
    found = []
    for block in _code_lines(text):
        for i, line in enumerate(block):
            if not line.startswith(f"prunetune {command} ") or not re.search(r"\b[A-Z][A-Z_]+\b", line.split("  #")[0]):
                continue
            parts = [line.split("  #")[0]]
            for more in block[i + 1:]:
                if not more.startswith(" ") or not more.strip().startswith(("[", "(")):
                    break
                parts.append(more.split("  #")[0])
            found.append(" ".join(parts))
    return found


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Its long options; a BooleanOptionalAction's ``--no-X`` is named by ``--X``."""
    names = set()
    for action in parser._actions:
        for option in action.option_strings:
            if option == "--help" or not option.startswith("--"):
                continue
            if isinstance(action, argparse.BooleanOptionalAction) and option.startswith("--no-"):
                continue
            names.add(option)
    return names


@pytest.mark.parametrize("command", sorted(_commands()))
def test_the_readme_synopsis_lists_every_option(command):
    text = README.read_text(encoding="utf-8")
    found = synopses(text, command)
    assert found, f"README has no synopsis of `prunetune {command}`"
    missing = sorted(o for o in _options(_commands()[command])
                     if not any(re.search(re.escape(o) + r"(?![\w-])", s) for s in found))
    assert not missing, f"README's synopsis of `prunetune {command}` leaves out {missing}"


def test_the_readme_lists_of_criteria_name_every_registered_one():
    from prunetune.pruning.importance import CRITERIA

    text = README.read_text(encoding="utf-8")
    concepts = text[text.index("- **Trial**: prune the trained base model"):text.index("- **Base model**")]
    prune_row = next(line for line in text.splitlines() if line.startswith("| `--importance NAME` |"))
    for where, listed in (("Concepts", concepts), ("prune's --importance row", prune_row)):
        missing = sorted(name for name in CRITERIA if f"`{name}`" not in listed)
        assert not missing, f"README's {where} leaves out the criteria {missing}"


def test_help_texts_that_list_names_or_defaults_match_the_code():
    """What a --help says by hand (it may not import torch or MLflow to ask) is what the code has."""
    from prunetune.pruning.data import dataset_names
    from prunetune.tracking.compare import DEFAULT_BUDGETS

    commands = _commands()
    dataset = next(a for a in commands["space"]._actions if "--dataset" in a.option_strings)
    missing = [name for name in dataset_names() if name not in dataset.help]
    assert not missing, f"space's --dataset help leaves out {missing}"
    budgets = next(a for a in commands["compare"]._actions if "--macs-budgets" in a.option_strings)
    assert budgets.default == ",".join(f"{b:g}" for b in DEFAULT_BUDGETS) and f"(default: {budgets.default})" in budgets.help
