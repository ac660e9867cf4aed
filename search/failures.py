"""Failed trials, in one line each: the cause (exception type and message) and where the traceback is.

Ray Tune keeps a failed trial's last exception (``error.pkl``) and its full traceback
(``error.txt``) in the trial's directory inside the run directory. A search names the first failure
in its summary, and a search whose trials all failed ends with that line and exit status 1
instead of an empty Pareto table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXIT_ALL_FAILED = 1


@dataclass(frozen=True)
class TrialFailure:
    """Why a trial failed: its id, ``Type: message`` of the root exception, the traceback's file."""

    trial_id: str
    cause: str
    log: str

    def to_json(self) -> dict:
        return {"trial_id": self.trial_id, "cause": self.cause, "log": self.log}


def root_cause(error: BaseException | str | None) -> str:
    """``Type: first line of the message`` of the exception under Ray's wrappers."""
    from ray.exceptions import RaySystemError, RayTaskError

    for _ in range(10):  # RayTaskError(RaySystemError(RuntimeError)): unwrap to the user's exception
        if isinstance(error, RayTaskError) and error.cause is not None:
            error = error.cause
        elif isinstance(error, RaySystemError) and not isinstance(error.client_exc, str):
            error = error.client_exc
        else:
            break
    if error is None:
        return "unknown error (no exception was recorded)"
    if isinstance(error, str):
        text, name = error, "Error"
    else:
        text, name = str(error), type(error).__name__
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{name}: {first[:300]}" if first else name


def first_failure(results, run_dir: Path) -> TrialFailure | None:
    """The first errored trial of a Ray Tune ``ResultGrid``, or None when no trial failed."""
    analysis = getattr(results, "_experiment_analysis", None)
    for trial in getattr(analysis, "trials", None) or []:
        if trial.status != "ERROR":
            continue
        try:
            error = trial.get_pickled_error() or trial.get_error()
        except Exception:  # noqa: BLE001 - an unreadable error file still leaves the log to point at
            error = None
        return TrialFailure(trial.trial_id, root_cause(error), _error_log(trial, run_dir))
    return None


def _error_log(trial, run_dir: Path) -> str:
    """The trial's ``error.txt``: in the run directory, else wherever Ray keeps the trial."""
    from prunetune.search.tuner import trial_dirname

    local = Path(run_dir) / trial_dirname(trial) / "error.txt"
    if local.exists():
        return str(local)
    return str(trial.error_file or trial.path or local)


def all_failed_message(failed: int, failure: TrialFailure) -> str:
    """The one line of a search whose every trial failed."""
    every = "the only trial" if failed == 1 else f"all {failed} trials"
    return (f"{every} failed; the first (trial {failure.trial_id}) with {failure.cause}; its full traceback "
            f"is in {failure.log}")
