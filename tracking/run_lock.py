"""One writer per run directory: an exclusive lock that ``run``, ``resume`` and ``finetune`` hold while they work.

Two commands writing one run directory at once corrupt it: two resumes of one killed search both ran its
remaining trials (six trials recorded for a budget of four, duplicate policies, two different summaries), and two
``run --name X`` at once wrote into one folder and left a parent MLflow run RUNNING for good. ``driver.json``
cannot prevent that: it is written once the tuner starts, minutes after the checks.

The lock is ``fcntl.flock`` on ``.<name>.lock`` beside the run directory (so ``run`` takes it before the
directory exists, before any training). The kernel drops it when its process ends, however it ends (``kill -9``
included), so it is never stale; the holder removes the file when it is done. The file says who holds it, for
the error of the one refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from prunetune.pruning.errors import UserError


def lock_path(run_dir: Path) -> Path:
    """``<storage>/.<name>.lock`` for run directory ``<storage>/<name>``."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str) -> Iterator[None]:
    """Hold the run directory's lock for ``prunetune COMMAND``, or refuse at once (UserError) while another holds it."""
    path = lock_path(run_dir)
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        descriptor = _acquire(path, run_dir)
        try:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, json.dumps({"pid": os.getpid(), "command": command}).encode())
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()  # before the lock is released: a waiter then finds the file gone and opens a new one
            os.close(descriptor)
    finally:
        for folder in made:  # a refused or failed run leaves no storage folder of its own behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # only while empty


def _acquire(path: Path, run_dir: Path) -> int:
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(f"cannot write the lock file {path} beside the run ({error.strerror or error}); "
                            f"a run directory is written to, so give one in a writable folder") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise UserError(f"{run_dir} is in use by {holder}; wait for it to end, or stop it (Ctrl-C), "
                            f"then run this again") from None
        if _still_at(descriptor, path):
            return descriptor
        os.close(descriptor)  # the holder removed the file between our open and our lock: take the new one


def _still_at(descriptor: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False


def _holder(descriptor: int) -> str:
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
        return f"`prunetune {holder['command']}` (PID {int(holder['pid'])})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another prunetune command"
