"""A PostgreSQL server for the tracking server's backend, started only when asked and installed.

``prunetune cluster up --tracking-backend postgresql`` makes a database cluster in the cluster's
directory (``initdb``), starts ``postgres`` on loopback on a free port with password
authentication (a random password in an owner-only file), and creates the ``mlflow`` database.
PostgreSQL refuses to run as root: started by root, its processes run as the ``postgres`` user,
which then owns the data directory. MLflow reaches it through ``psycopg2``
(``pip install "prunetune[postgres]"``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.processes import ProcessRecord, is_running, spawn, tail
from pruning.errors import UserError

DB_USER = "prunetune"
DB_NAME = "mlflow"
SERVICE_USER = "postgres"  # who runs PostgreSQL when we are root
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PostgresBinaries:
    initdb: str
    postgres: str
    pg_isready: str
    createdb: str


def find_binaries() -> PostgresBinaries | None:
    """PostgreSQL's programs on PATH, else in Debian's /usr/lib/postgresql/<version>/bin; None if absent."""
    names = ("initdb", "postgres", "pg_isready", "createdb")
    found = {name: shutil.which(name) for name in names}
    if all(found.values()):
        return PostgresBinaries(**found)
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        paths = {name: str(Path(folder) / name) for name in names}
        if all(os.access(p, os.X_OK) for p in paths.values()):
            return PostgresBinaries(**paths)
    return None


def require_postgres() -> PostgresBinaries:
    """The binaries, or a UserError saying what to install; also checks MLflow's driver, psycopg2."""
    binaries = find_binaries()
    if binaries is None:
        raise UserError("--tracking-backend postgresql needs PostgreSQL installed (initdb, postgres, "
                        "pg_isready, createdb; e.g. apt-get install postgresql); or use --tracking-backend sqlite")
    if importlib.util.find_spec("psycopg2") is None:
        raise UserError('--tracking-backend postgresql needs the psycopg2 driver: pip install "prunetune[postgres]"; '
                        "or use --tracking-backend sqlite")
    return binaries


def service_user() -> str | None:
    """The user PostgreSQL runs as: ``postgres`` when we are root (it refuses root), else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise UserError("PostgreSQL refuses to run as root and there is no 'postgres' user to run it as; "
                        "run `prunetune cluster up` as an ordinary user or use --tracking-backend sqlite") from None
    return SERVICE_USER


def init_database_cluster(binaries: PostgresBinaries, data_dir: Path, password_file: Path) -> None:
    """``initdb`` with password (SCRAM) authentication for the one user ``prunetune``."""
    user = service_user()
    data_dir.mkdir(parents=True, exist_ok=True)
    password_file.write_text(secrets.token_urlsafe(24))
    password_file.chmod(0o600)
    if user:
        entry = pwd.getpwnam(user)
        for path in (data_dir, password_file):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    command = [binaries.initdb, "-D", str(data_dir), "-U", DB_USER, "--auth=scram-sha-256",
               f"--pwfile={password_file}", "-E", "UTF8", "--no-instructions"]
    result = subprocess.run(command, capture_output=True, text=True, user=user, cwd="/")
    if result.returncode != 0:
        raise UserError(f"initdb failed in {data_dir}: {(result.stderr or result.stdout).strip()[-300:]}")


def start_postgres(binaries: PostgresBinaries, data_dir: Path, *, host: str, port: int, log: Path) -> ProcessRecord:
    """Start ``postgres`` on ``host:port`` (its Unix socket in the data directory) and wait for it."""
    command = [binaries.postgres, "-D", str(data_dir), "-h", host, "-p", str(port), "-k", str(data_dir)]
    log.touch()
    user = service_user()
    if user:
        entry = pwd.getpwnam(user)
        os.chown(log, entry.pw_uid, entry.pw_gid)
    record = spawn("postgres", command, log=log, user=user)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        ready = subprocess.run([binaries.pg_isready, "-h", host, "-p", str(port), "-q"], capture_output=True)
        if ready.returncode == 0:
            return record
        if not is_running(record):
            raise UserError(f"postgres exited while starting; its log {log} ends: {tail(log)}")
        time.sleep(0.25)
    raise UserError(f"postgres did not accept connections within {START_TIMEOUT_S:.0f} s; see {log}: {tail(log)}")


def create_database(binaries: PostgresBinaries, *, host: str, port: int, password_file: Path) -> str:
    """Create the ``mlflow`` database; return the SQLAlchemy URI MLflow uses for it."""
    password = password_file.read_text().strip()
    env = {**os.environ, "PGPASSWORD": password}
    result = subprocess.run([binaries.createdb, "-h", host, "-p", str(port), "-U", DB_USER, DB_NAME],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise UserError(f"createdb failed: {(result.stderr or result.stdout).strip()[-300:]}")
    return f"postgresql://{DB_USER}:{password}@{host}:{port}/{DB_NAME}"
