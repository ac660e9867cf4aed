"""Failed trials, in one line each: the cause (exception type and message) and where the traceback is.

Ray Tune keeps a failed trial's last exception (``error.pkl``) and its full traceback
(``error.txt``) in the trial's directory inside the run directory. A search names the first failure
in its summary, and a search whose trials all failed ends with that line and exit status 1
instead of an empty Pareto table. So does a search (objective ``constrained``) whose trials ended but
none within the MACs target: it did not do its job (``no_best_message``); everything it ran is kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

EXIT_ALL_FAILED = 1
EXIT_NO_BEST = 1  # trials ended, none within the MACs target


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
    if isinstance(error, str):  # an error.txt: its traceback ends with the exception's `Type: message` line
        raised = [line.strip() for line in error.splitlines() if re.match(r"^\s*[A-Za-z_][\w.]*(Error|Exception): ", line)]
        if raised:
            return raised[-1][:300]
        text, name = error, "Error"
    else:
        text, name = str(error), type(error).__name__
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{name}: {first[:300]}" if first else name


def trial_cause(trial) -> str:
    """:func:`root_cause` of the last error Ray kept for ``trial`` (its ``error.pkl``, else its ``error.txt``).

    Ray writes both into the driver's staging folder of the trial and reads them back from the
    trial's storage, where they arrive only with the next sync: read at once (the progress line of a
    trial that just failed), the storage has nothing yet, so the staging copy is read first."""
    for source in (_staged_pickle, _staged_text, lambda t: t.get_pickled_error(), lambda t: t.get_error()):
        try:
            error = source(trial)
        except Exception:  # noqa: BLE001 - an unreadable error file: the next source, or the log to point at
            continue
        if error:
            return root_cause(error)
    return root_cause(None)


def _staged_pickle(trial) -> BaseException | None:
    """The exception Ray pickled (with its own cloudpickle) into the driver's staging folder."""
    import ray.cloudpickle as cloudpickle

    path = getattr(trial, "pickled_error_file", None)
    if path and Path(path).is_file():
        with open(path, "rb") as file:
            return cloudpickle.load(file)
    return None


def _staged_text(trial) -> str | None:
    """The error text Ray wrote into the driver's staging folder."""
    path = getattr(trial, "error_file", None)
    return Path(path).read_text() if path and Path(path).is_file() else None


def first_failure(results, run_dir: Path) -> TrialFailure | None:
    """The first errored trial of a Ray Tune ``ResultGrid``, or None when no trial failed."""
    analysis = getattr(results, "_experiment_analysis", None)
    for trial in getattr(analysis, "trials", None) or []:
        if trial.status == "ERROR":
            return TrialFailure(trial.trial_id, trial_cause(trial), _error_log(trial, run_dir))
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


def closest_trial(records: Sequence[Mapping]) -> Mapping | None:
    """The trial nearest the MACs target from above: the smallest MACs ratio of the finished
    full-fidelity trials, else of any trial that measured one; None when none did."""
    from prunetune.tracking.names import fidelity_of
    from prunetune.tracking.rundir import STATUS_FINISHED

    measured = [r for r in records if (r.get("metrics") or {}).get("macs_ratio") is not None]
    full = [r for r in measured if r["status"] == STATUS_FINISHED and fidelity_of(r.get("params") or {}) == "full"]
    return min(full or measured, key=lambda r: r["metrics"]["macs_ratio"], default=None)


def cut_deeper_hint(cfg) -> str:
    """How the config's method could reach lower MACs: its floor option, a learner's ranges, or the space."""
    from prunetune.methods.reach import floor_key
    from prunetune.methods.registry import get_method

    spec = get_method(cfg.method)
    options = cfg.methods.get(spec.section) if spec.section else None
    key = floor_key(options)
    if key is not None:
        return f"let {cfg.method} cut deeper (lower --set {spec.section}.{key}, now {getattr(options, key):g})"
    if spec.kind == "learner":
        return f"let {cfg.method} cut deeper (its {spec.section}.* hyperparameters: README, 'Config reference')"
    return "widen the space (--set space.min_channels=1, --set space.search_depth=true)"


def no_best_message(records: Sequence[Mapping], cfg) -> str:
    """The one line of a search none of whose trials met the MACs target (``cfg``: its SearchConfig)."""
    closest = closest_trial(records)
    near = ("no trial measured its MACs" if closest is None else
            f"the closest: trial {closest['trial_id']} at MACs ratio {closest['metrics']['macs_ratio']:.3f}")
    return (f"no finished trial met the MACs target {cfg.macs_target:g} (a MACs ratio of at most "
            f"{cfg.macs_target + cfg.macs_tolerance:g} with macs_tolerance {cfg.macs_tolerance:g}; {near}); "
            f"raise --macs-target, or {cut_deeper_hint(cfg)}")


def next_steps(summary: Mapping, run_dir: Path, tracking_uri: str, *, final: bool,
               experiment_id: str | None = None) -> str:
    """The closing ``next:`` line of a search: the MLflow view, ``prunetune status`` and an export
    that works: ``--trial final`` after a final fine-tune, ``--trial best`` where a trial met the
    MACs target; where none did (objective pareto exits 0), ``--trial ID`` of the front's trial
    with the fewest MACs (the closest to the target), as ``--trial best`` would be refused. A
    tracking server's link is to the experiment's trials view in model-training mode
    (``tracking.experiment_view``), where its ``experiment_id`` is known."""
    from prunetune.tracking.experiment_view import trials_url
    from prunetune.tracking.uri import HTTP_SCHEMES, uri_scheme

    if uri_scheme(tracking_uri) in HTTP_SCHEMES:
        ui = f"open {trials_url(tracking_uri, experiment_id) if experiment_id else tracking_uri}"
    else:  # sqlite, postgresql, mysql: a store mlflow ui serves; a password stays out of the terminal
        shown = re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", tracking_uri)
        ui = f"mlflow ui --backend-store-uri {shown}"
    steps = [ui, f"prunetune status {run_dir}"]
    if final or summary.get("best") is not None:
        steps.append(f"prunetune export {run_dir} --trial {'final' if final else 'best'} --out pruned.pt")
    else:
        front = [p for p in summary.get("pareto") or [] if p.get("macs") is not None]
        if front:
            fewest = min(front, key=lambda p: p["macs"])
            steps.append(f"prunetune export {run_dir} --trial {fewest['trial_id']} --out pruned.pt "
                         f"(the front's fewest MACs, ratio {fewest['macs_ratio']:.3f}; none met the target)")
    return "next: " + "   |   ".join(steps)
