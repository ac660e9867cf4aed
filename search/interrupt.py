"""Ctrl-C (SIGINT) and a scheduler's ``kill`` (SIGTERM): one clean stop for the whole driver.

``StopSignals`` takes both signals for as long as a search's driver runs. Before the trials start
(checks, the base model) a signal raises ``Interrupted`` at once; what the driver made is removed
on the way out. During ``tuner.fit()`` (``graceful()``) the first signal is recorded and handed to
Ray Tune as SIGUSR1, its graceful stop, which it always handles while ``fit()`` runs: Ray saves the
experiment state and ``fit()`` returns, so the finished trials are kept and the search can resume.
Ray Tune's own SIGINT handler is turned off (``TUNE_DISABLE_SIGINT_HANDLER``): after it, the driver
could not tell an interrupted search from a finished one. A second signal raises ``Interrupted``.

``ray.init`` installs its own SIGTERM handler (a bare ``sys.exit``, with a C++ stack dump on the way
out), so the driver calls ``install()`` again once Ray is up. The exit status is 128 + the signal's
number, as a shell reports a process ended by it: 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The driver was stopped by ``signum``; ``exit_status`` is what the command returns."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def exit_status(error: KeyboardInterrupt) -> int:
    """130 for a plain KeyboardInterrupt, 128 + signal for ``Interrupted``."""
    return getattr(error, "exit_status", 128 + signal.SIGINT)


class StopSignals:
    """Context manager for a driver: SIGINT and SIGTERM stop it cleanly (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._graceful = False
        self._previous: dict[int, object] = {}

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def install(self) -> None:
        """Take SIGINT and SIGTERM (again: call it after ``ray.init``, which sets its own)."""
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    @contextmanager
    def graceful(self):
        """Around ``tuner.fit()``: a first signal stops Ray Tune gracefully instead of raising."""
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self.install()
        self._graceful = True
        try:
            yield self
        finally:
            self._graceful = False

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if self._graceful and first and tune_listens:
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        raise Interrupted(self.signum)
