"""A PostgreSQL server for the tracking server's backend, started only when asked and installed.

``prunetune cluster up --tracking-backend postgresql`` makes a database cluster (``initdb``),
starts ``postgres`` on loopback on a free port with password authentication (a random password in
an owner-only file of the cluster directory), and creates the ``mlflow`` database. The data stays
in the cluster directory, for the next ``cluster up``. PostgreSQL refuses to run as root: started
by root, it runs as the ``postgres`` user, which cannot enter root's directories, so its data then
lives in a directory of its own under /tmp that ``cluster down`` removes. MLflow reaches it through
``psycopg2`` (``pip install "prunetune[postgres]"``).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from prunetune.cluster.processes import ProcessRecord, is_running, spawn, tail
from prunetune.pruning.errors import UserError

DB_USER = "prunetune"
DB_NAME = "mlflow"
SERVICE_USER = "postgres"  # who runs PostgreSQL when we are root
START_TIMEOUT_S = 60.0
DEBIAN_ROOT = Path("/usr/lib/postgresql")  # Debian installs each major version in <root>/<version>/bin


@dataclass(frozen=True)
class PostgresBinaries:
    initdb: str
    postgres: str
    pg_isready: str
    createdb: str


def _version_key(folder: Path) -> tuple[tuple[int, ...], str]:
    """Sort key of a Debian version folder's name, by number: 9.6 < 10 < 15 (as text, "9.6" > "15")."""
    name = folder.name
    parts = name.split(".")
    number = tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()
    return number, name


def find_binaries(debian_root: Path = DEBIAN_ROOT) -> PostgresBinaries | None:
    """PostgreSQL's programs on PATH, else in Debian's ``<debian_root>/<version>/bin`` of the newest
    version (by number) that has them all; None if absent."""
    names = ("initdb", "postgres", "pg_isready", "createdb")
    found = {name: shutil.which(name) for name in names}
    if all(found.values()):
        return PostgresBinaries(**found)
    versions = sorted((p.parent for p in Path(debian_root).glob("*/bin")), key=_version_key, reverse=True)
    for version in versions:
        paths = {name: str(version / "bin" / name) for name in names}
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


def data_directory(cluster_dir: Path) -> tuple[Path, bool]:
    """Where the database lives, and whether it is temporary (removed by ``cluster down``).

    The cluster directory's ``postgres`` folder; as root, a fresh folder under /tmp owned by the
    ``postgres`` user (see the module docstring).
    """
    user = service_user()
    if user is None:
        return cluster_dir / "postgres", False
    folder = Path(tempfile.mkdtemp(prefix="ptc-pg-", dir="/tmp"))
    entry = pwd.getpwnam(user)
    os.chown(folder, entry.pw_uid, entry.pw_gid)
    return folder / "data", True


def init_database_cluster(binaries: PostgresBinaries, data_dir: Path, password_file: Path) -> None:
    """``initdb`` with password (SCRAM) authentication for the one user ``prunetune``."""
    user = service_user()
    password_file.write_text(secrets.token_urlsafe(24))
    password_file.chmod(0o600)
    with tempfile.TemporaryDirectory(prefix="ptc-pw-") as folder:
        pwfile = Path(folder) / "pw"  # initdb reads it as the service user, who cannot enter our directory
        shutil.copyfile(password_file, pwfile)
        if user:
            entry = pwd.getpwnam(user)
            for path in (Path(folder), pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        command = [binaries.initdb, "-D", str(data_dir), "-U", DB_USER, "--auth=scram-sha-256",
                   f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"]
        result = subprocess.run(command, capture_output=True, text=True, user=user, cwd="/")
    if result.returncode != 0:
        raise UserError(f"initdb failed in {data_dir}: {(result.stderr or result.stdout).strip()[-300:]}")


def start_postgres(binaries: PostgresBinaries, data_dir: Path, *, host: str, port: int, log: Path) -> ProcessRecord:
    """Start ``postgres`` on ``host:port`` (its Unix socket in the data directory) and wait for it."""
    command = [binaries.postgres, "-D", str(data_dir), "-h", host, "-p", str(port), "-k", str(data_dir)]
    record = spawn("postgres", command, log=log, user=service_user(), cwd="/")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        ready = subprocess.run([binaries.pg_isready, "-h", host, "-p", str(port), "-q"], capture_output=True)
        if ready.returncode == 0:
            return record
        if not is_running(record):
            raise UserError(f"postgres exited while starting; its log {log} ends: {tail(log)}")
        time.sleep(0.25)
    raise UserError(f"postgres did not accept connections within {START_TIMEOUT_S:.0f} s; see {log}: {tail(log)}")


def create_database(binaries: PostgresBinaries, *, host: str, port: int, password_file: Path) -> None:
    """Create the ``mlflow`` database (MLflow creates its tables in it on first use)."""
    password = password_file.read_text().strip()
    env = {**os.environ, "PGPASSWORD": password}
    result = subprocess.run([binaries.createdb, "-h", host, "-p", str(port), "-U", DB_USER, DB_NAME],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise UserError(f"createdb failed: {(result.stderr or result.stdout).strip()[-300:]}")
