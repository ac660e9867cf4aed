"""Ctrl-C during ``tuner.fit()``: stop Ray Tune gracefully and remember that it was pressed.

Ray Tune catches SIGINT itself, saves the experiment state and returns from ``fit()`` as if the
search had ended; trials it had not yet created leave no trace, so the driver cannot tell an
interrupted search from a finished one afterwards. ``CtrlC`` takes SIGINT instead (Ray's own
handler is turned off with ``TUNE_DISABLE_SIGINT_HANDLER``), records it, and hands Ray the same
graceful stop through SIGUSR1, which Ray Tune always handles while ``fit()`` runs. A second Ctrl-C,
or one before Ray has installed its handler, raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import os
import signal


class CtrlC:
    """Context manager around ``tuner.fit()``; ``pressed`` says whether Ctrl-C stopped it."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def __enter__(self) -> CtrlC:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if self.pressed or not tune_listens:
            self.pressed = True
            raise KeyboardInterrupt
        self.pressed = True
        os.kill(os.getpid(), signal.SIGUSR1)
