"""Processes the cluster starts: each in a session of its own, found again and stopped by PID.

Every server of a local cluster (a Ray node's ``ray start --block``, the MLflow server, PostgreSQL)
is started as the leader of a new session, so everything it spawns (a Ray node's GCS, raylet,
agents and workers) carries the leader's PID as its session id. ``ProcessRecord`` keeps the PID with
the kernel's start time of the process, so a PID that the system has since given to an unrelated
process is never mistaken for ours. Stopping is by PID only: SIGTERM to every member of the
session, then SIGKILL to what is left; never by name (``ray stop`` would end every Ray process on
the machine, other users' included). Linux ``/proc`` only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from prunetune.pruning.errors import UserError

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessRecord:
    """A process the cluster started: its PID, its start time (clock ticks after boot) and its log."""

    name: str
    pid: int
    start_time: int
    log: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> ProcessRecord:
        return cls(name=str(data["name"]), pid=int(data["pid"]), start_time=int(data["start_time"]),
                   log=str(data["log"]))


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after ``pid (comm)``: state, ppid, pgrp, session, ..."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When ``pid`` started (field 22 of /proc/PID/stat), or None if no such process runs."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_running(record: ProcessRecord) -> bool:
    """Whether the recorded process itself still runs (and is not a zombie)."""
    fields = _stat_fields(record.pid)
    return bool(fields) and fields[0] != "Z" and int(fields[19]) == record.start_time


def session_members(record: ProcessRecord) -> list[int]:
    """Live PIDs in the recorded process's session: it and everything it spawned, even orphans.

    Nothing if the recorded PID now belongs to another process (its session is not ours); a member must
    have started no earlier than the leader, so a reused session id is never matched.
    """
    leader = _stat_fields(record.pid)
    if leader and leader[0] != "Z" and int(leader[19]) != record.start_time:
        return []
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[0] != "Z" and int(fields[3]) == record.pid and int(fields[19]) >= record.start_time:
            members.append(int(entry.name))
    return sorted(members)


def spawn(name: str, command: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None,
          user: str | None = None, cwd: str | None = None) -> ProcessRecord:
    """Start ``command`` as the leader of a new session, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        try:
            process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=handle,
                                       stderr=subprocess.STDOUT, env=dict(env) if env is not None else None,
                                       start_new_session=True, close_fds=True, user=user,
                                       cwd=cwd)
        except OSError as error:
            raise UserError(f"cannot start {name} ({command[0]}: {error.strerror or error}); "
                            f"check that it is installed") from None
    started = start_time(process.pid)
    # The Popen object is dropped on purpose: the process outlives this command, and `cluster down`
    # (another process) stops it by PID. Its exit status is read by whoever reaps it (init).
    process.returncode = 0  # tell Popen.__del__ not to warn about a child still running
    return ProcessRecord(name=name, pid=process.pid, start_time=started or 0, log=str(log))


def signal_session(record: ProcessRecord, sig: int) -> list[int]:
    """Send ``sig`` to every live member of the record's session; return their PIDs."""
    pids = session_members(record)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return pids


def stop(records: Iterable[ProcessRecord], *, grace_s: float = 15.0) -> list[int]:
    """Stop every session of ``records``: SIGTERM, wait up to ``grace_s``, then SIGKILL what is left.

    Returns the PIDs that were signalled. Afterwards none of them runs (zombies aside, which only
    their parent can reap).
    """
    records = list(records)
    signalled = sorted({pid for r in records for pid in signal_session(r, signal.SIGTERM)})
    if not wait_gone(records, timeout_s=grace_s):
        for record in records:
            signal_session(record, signal.SIGKILL)
        wait_gone(records, timeout_s=10.0)
    return signalled


def wait_gone(records: Sequence[ProcessRecord], *, timeout_s: float) -> bool:
    """Wait until no member of any of the records' sessions runs; return whether that happened."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not any(session_members(r) for r in records):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def wait_for_line(record: ProcessRecord, text: str, *, timeout_s: float, what: str) -> None:
    """Wait until the record's log holds ``text``; a process that exits first is a UserError."""
    deadline = time.monotonic() + timeout_s
    log = Path(record.log)
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if not is_running(record):
            raise UserError(f"{what} exited while starting; its log {log} ends: {tail(log)}")
        time.sleep(0.2)
    raise UserError(f"{what} did not start within {timeout_s:.0f} s; see its log {log}: {tail(log)}")


def tail(log: Path, lines: int = 3) -> str:
    """The last lines of a log, joined on one line (for one-line errors)."""
    try:
        text = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:])[-400:] or "(empty)"


def child_with_argument(record: ProcessRecord, argument_prefix: str) -> str | None:
    """The value of the first ``argument_prefix...`` argument of any process in the record's session."""
    for pid in session_members(record):
        try:
            arguments = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for argument in arguments:
            text = argument.decode(errors="replace")
            if text.startswith(argument_prefix):
                return text[len(argument_prefix):]
    return None
