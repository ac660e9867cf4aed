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
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_now(status: int | None) -> NoReturn:
    """End the process with ``status`` (None: 0) once the non-daemon threads ended, the atexit
    handlers ran and stdio is flushed."""
    threading._shutdown()  # what Python's own exit does first: tell thread pools' workers to end, join them
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`prunetune status | head`)
            stream.flush()
    os._exit(0 if status is None else status)
