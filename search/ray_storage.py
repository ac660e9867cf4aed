"""Where Ray Tune keeps a search's experiment state and trial checkpoints.

By default that is the run directory itself (``<storage>/<name>``), on a local disk or on a file
system every node of a cluster shares. The config key ``ray_storage`` moves it to a URI instead
(``s3://bucket/prefix``, with ``?endpoint_override=host:port&scheme=http`` for an S3-compatible
server; any URI pyarrow's file systems open), for clusters without a shared file system: every node
writes its trials' checkpoints there, and the run directory keeps the driver's own files
(config, trials.jsonl, summary.json, the tracking store). The experiment of run ``name`` is
``<ray_storage>/<name>``.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from prunetune.pruning.errors import UserError


def join_uri(uri: str, name: str) -> str:
    """``uri`` with ``name`` appended to its path, its query (``?endpoint_override=...``) kept."""
    path, sep, query = uri.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


def experiment_location(ray_storage: str | None, run_dir: Path) -> str:
    """Where Ray Tune's experiment of this run lives: the run directory, or ``<ray_storage>/<name>``."""
    return join_uri(ray_storage, run_dir.name) if ray_storage else str(run_dir)


PROBE_SECONDS = 10.0  # how long the check waits for the storage to answer (GCS retries for 15 minutes)


def check_ray_storage(uri: str | None, *, limit: float = PROBE_SECONDS) -> None:
    """Fail before anything starts when ``uri`` (a URI: the config checks that) cannot be opened, does
    not answer within ``limit`` seconds, or its bucket (its folder, for ``file://``) does not exist;
    nothing to check when it is null (the run directory).

    The file system is probed in a daemon thread the caller waits for with a time limit: pyarrow's
    calls (GCS's above all, without a network) block in C++ for minutes, and a signal handler runs
    only once the main thread is back in Python. The waiting stays interruptible; a probe still
    running when the check gives up is left behind and ends with the process.
    """
    if uri is None:
        return
    outcome: list = []

    def probe_into_outcome() -> None:
        try:
            outcome.append(_probe(uri))
        except Exception as error:  # noqa: BLE001 - raised in the caller's thread below, not lost with this one
            outcome.append(error)

    probe = threading.Thread(target=probe_into_outcome, name="ray-storage-probe", daemon=True)
    probe.start()
    probe.join(limit)
    if not outcome:
        raise UserError(f"ray_storage {uri} could not be reached in {limit:g} s; check the network, the endpoint "
                        f"and the credentials, or leave ray_storage unset to keep checkpoints in the run directory")
    if isinstance(outcome[0], Exception):
        raise outcome[0]


def _probe(uri: str) -> UserError | None:
    """What is wrong with ``uri``, as the UserError to raise, or None when it can be used."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        local = isinstance(fs, pyarrow.fs.LocalFileSystem)
        where = path if local else path.split("/", 1)[0]  # a local folder itself, else the bucket
        found = fs.get_file_info(where).type
    except (OSError, ValueError) as exc:
        return UserError(f"ray_storage {uri} cannot be opened ({_first_line(exc)}); check the URI, the "
                         f"endpoint and the credentials")
    if found == pyarrow.fs.FileType.Directory:
        if local and not os.access(where, os.W_OK | os.X_OK):
            return UserError(f"ray_storage {uri}: folder {where} cannot be written; choose a writable folder")
        return None
    if local:
        state = ("does not exist; create the folder first" if found == pyarrow.fs.FileType.NotFound
                 else "is not a folder; give a folder's file:// URI")
        return UserError(f"ray_storage {uri}: {where} {state}")
    return UserError(f"ray_storage {uri}: bucket {where!r} does not exist; create it first")


def fetch_checkpoint_file(ray_storage: str, checkpoint: str, filename: str, dest: Path) -> Path:
    """Copy ``filename`` of a trial checkpoint kept under ``ray_storage`` into the folder ``dest``.

    ``checkpoint`` is the path Ray recorded for it (the file system's path, without the scheme).
    """
    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri(ray_storage)
    target = Path(dest) / filename
    try:
        with fs.open_input_stream(f"{checkpoint.rstrip('/')}/{filename}") as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out)
    except OSError as exc:  # FileNotFoundError among them
        raise UserError(f"the checkpoint {checkpoint}/{filename} in {ray_storage} cannot be read "
                        f"({_first_line(exc)})") from None
    return target


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
