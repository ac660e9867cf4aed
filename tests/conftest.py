"""Shared test setup: one torch thread per test process, so parallel work never oversubscribes; and two
session-wide savings for the end-to-end searches (each costs seconds per search, nothing in what is tested):

- ``base_model_cache``: one base-model cache (``PRUNETUNE_CACHE``) for the session's searches. A cached
  model is found by its model, data and training recipe (``pruning.train.pretrain_path``), so a test
  loads the base model an earlier test trained with the same flags, never another one. Tests that
  check what the cache holds, or that nothing was cached, keep a cache of their own.
- ``tracking_store``: a new storage folder holding a copy of an empty MLflow sqlite store with every
  schema migration applied (made once per session), so a search there does not run MLflow's
  migrations again. Tests that check that a store is created, or never created, do not use it.

And one search several files only read: ``optuna_search``, the 4-trial Optuna search on digits
(test_search_e2e checks its trials, summary, MLflow runs, status, export and sync; test_heuristics
its warm start; test_namespace that the user's own ``search.py``, ``methods/``... in its working
directory, where it and those commands run, changed nothing).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def base_model_cache(tmp_path_factory) -> Path:
    """The session's base-model cache folder (created by the first search that trains one)."""
    return tmp_path_factory.mktemp("base-models") / "cache"


@pytest.fixture(scope="session")
def _migrated_tracking_store(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow sqlite store: what a first search in a storage folder creates."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates and migrates the tables
    assert path.stat().st_size > 0
    return path


@pytest.fixture(scope="session")
def tracking_store(_migrated_tracking_store) -> Callable[[Path], Path]:
    """``tracking_store(folder)``: ``folder`` created as a search's ``--storage``, holding a copy of the
    migrated empty store as its ``mlflow.db`` (the default tracking store there); returns ``folder``."""

    def new_storage(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        assert not (folder / "mlflow.db").exists(), f"{folder} already has a tracking store"
        shutil.copyfile(_migrated_tracking_store, folder / "mlflow.db")
        return folder

    return new_storage


@pytest.fixture(scope="session")
def optuna_search(tmp_path_factory, base_model_cache, tracking_store):
    """A 4-trial Optuna search on digits (warm-started with the heuristics), run once for the session
    in a working folder holding the user's own modules named like prunetune's (``SHADOWS``):
    (work folder, run directory, the completed ``prunetune run``). Tests only read it."""
    from tests.search_helpers import QUICK, run_cli, write_shadows

    work = tmp_path_factory.mktemp("search")
    write_shadows(work)
    result = run_cli(["run", *QUICK, "--trials", "4", "--concurrency", "2", "--name", "s4",
                      "--storage", str(tracking_store(work / "runs"))], cache=base_model_cache, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, work / "runs" / "s4", result
