"""`prunetune cluster up --tracking-backend postgresql`: the tracking server over a PostgreSQL the cluster
starts (where PostgreSQL and psycopg2 are installed: CI installs both, Debian's `postgresql` in .ci/run
and psycopg2-binary with the `dev` extra), on loopback, password-protected, and stopped with the rest by
`cluster down`. Run as root (as CI runs), PostgreSQL runs as the `postgres` user."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

import pytest

from prunetune.cluster.postgres import find_binaries
from tests.cluster_helpers import all_members, base_env, cli, listening_sockets, still_running

PROGRAMS = ("initdb", "postgres", "pg_isready", "createdb")
DEBIAN_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda f: int(Path(f).parent.name.split(".")[0]),
                    reverse=True)  # Debian's layout, newest (by major version number) first


def test_find_binaries_prefers_path_and_says_none_without_postgres(tmp_path, monkeypatch):
    for name in PROGRAMS:
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    found = find_binaries()
    assert found is not None and {getattr(found, n) for n in PROGRAMS} == {str(tmp_path / n) for n in PROGRAMS}
    if not DEBIAN_BIN:
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        assert find_binaries() is None


def test_find_binaries_takes_debians_newest_version_by_number_not_as_text(tmp_path, monkeypatch):
    root = tmp_path / "postgresql"
    for version in ("9.6", "15", "10", "16"):  # as text "9.6" sorts last, above "16"
        (root / version / "bin").mkdir(parents=True)
        for name in PROGRAMS if version != "16" else PROGRAMS[:2]:  # 16 lacks pg_isready: skipped
            (root / version / "bin" / name).write_text("#!/bin/sh\n")
            (root / version / "bin" / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    found = find_binaries(root)
    assert found is not None and Path(found.initdb) == root / "15" / "bin" / "initdb"
    assert {Path(getattr(found, n)).parent for n in PROGRAMS} == {root / "15" / "bin"}


@pytest.mark.skipif(not DEBIAN_BIN, reason="Debian's postgresql package is not installed")
def test_find_binaries_finds_debians_layout_when_postgres_is_not_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # initdb and postgres are never on PATH after apt-get install
    found = find_binaries()
    assert found is not None, f"PostgreSQL's programs not found in {DEBIAN_BIN}"
    assert {Path(getattr(found, n)).parent for n in PROGRAMS} == {Path(DEBIAN_BIN[0])}
    assert all(os.access(getattr(found, n), os.X_OK) for n in PROGRAMS)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.skipif(find_binaries() is None or importlib.util.find_spec("psycopg2") is None,
                    reason="PostgreSQL or psycopg2 is not installed")
def test_a_postgres_backed_cluster_keeps_runs_in_postgres_and_stops_whole(tmp_path):
    import psycopg2

    from prunetune.tracking import Tracker

    directory = tmp_path / "cluster"
    env = {**base_env(tmp_path / "cache"), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
    up = cli(["cluster", "up", "--local", "--workers", "1", "--tracking-backend", "postgresql",
              "--dir", str(directory)], env=env, cwd=tmp_path, timeout=400)
    assert up.returncode == 0, up.stderr[-3000:]
    state = json.loads((directory / "state.json").read_text())
    members = all_members(state)
    try:
        tracking = state["tracking"]
        assert f"tracking URI:  {tracking['uri']}" in up.stdout and "RAY_AUTH_MODE=token" in up.stdout
        assert tracking["backend"] == "postgresql" and tracking["postgres"]["pid"] in members
        password = (directory / "postgres.password").read_text().strip()
        assert password and password not in (directory / "state.json").read_text()
        assert tracking["backend_store"].startswith("postgresql+psycopg2://prunetune@127.0.0.1:")
        assert {address for address, _ in listening_sockets(list(members))} == {"127.0.0.1"}

        parent = Tracker(tracking["uri"], "on-postgres").start_parent("uid-pg", "pg", {"model": "small_cnn"})
        with psycopg2.connect(host="127.0.0.1", port=tracking["postgres_port"], user="prunetune",
                              password=password, dbname="mlflow") as connection, connection.cursor() as cursor:
            cursor.execute("SELECT run_uuid FROM runs")
            assert cursor.fetchall() == [(parent,)]
        with pytest.raises(psycopg2.OperationalError, match="password"):
            psycopg2.connect(host="127.0.0.1", port=tracking["postgres_port"], user="prunetune",
                             password="wrong", dbname="mlflow")
        status = json.loads(cli(["cluster", "status", "--dir", str(directory), "--json"], env=env, cwd=tmp_path).stdout)
        assert status["state"] == "running" and status["tracking_healthy"]
        assert {s["name"] for s in status["services"]} == {"mlflow server", "postgres"}
    finally:
        down = cli(["cluster", "down", "--dir", str(directory)], env=env, cwd=tmp_path)
    assert down.returncode == 0, down.stderr[-2000:]
    assert still_running(members) == []
