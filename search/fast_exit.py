"""Ending the `prunetune` process without the interpreter's finalization.

After a search's ``main`` has returned, Python's own shutdown (tearing down torch's, Ray's and
MLflow's modules and the C++ objects behind them) takes 1.5 to 2.4 s of a short command
(BENCHMARKS.md, "Throughput", the teardown figures) and does nothing a user needs: every run, file
and Ray session is closed by then. ``exit_now`` runs what a normal exit runs that matters (the
``atexit`` handlers: logging's flush, MLflow's and Ray's own, in their order, after
``threading._shutdown``, which ends idle thread-pool workers and waits for non-daemon threads,
as Python's own exit does first), flushes stdout and stderr, and ends the process with
``os._exit``. Only the console script and ``python -m
prunetune.search.cli`` use it; ``main()`` called from Python returns as before.

A reader that stops reading (``prunetune status RUN | head -1``) closes stdout under the command:
its next write or the exit's flush raises ``BrokenPipeError`` (Python ignores SIGPIPE). The
process then ends quietly, as a Unix tool ended by SIGPIPE does, with the status a shell reports
for one (141), stdout pointed at /dev/null so that nothing buffered raises again (Python's docs,
"Note on SIGPIPE"). A BrokenPipeError while stdout is still read (a socket's, a child's pipe) is
no closed stdout and keeps its traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import sys
import threading
from typing import NoReturn

EXIT_CLOSED_STDOUT = 128 + signal.SIGPIPE  # 141, what a shell reports for a process SIGPIPE ended


def exit_now(status: int | None) -> NoReturn:
    """End the process with ``status`` (None: 0) once the non-daemon threads ended, the atexit
    handlers ran and stdio is flushed."""
    threading._shutdown()  # what Python's own exit does first: tell thread pools' workers to end, join them
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # `prunetune status | head`: the reader left before the last output was written
        silence_stdout()
        status = status or EXIT_CLOSED_STDOUT
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(0 if status is None else status)


def stdout_closed() -> bool:
    """Whether nobody reads stdout any more: the read end of its pipe (or socket) is closed."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no stdout, or one without a file descriptor
        return False


def silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null: what is still buffered is then flushed there."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
