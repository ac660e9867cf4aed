"""prunetune: layer-wise channel-pruning policy search for CNNs on Ray Tune, Optuna and MLflow.

The repository's top-level folders install under this one namespace (pyproject.toml's
``package-dir``): ``prunetune.pruning`` (the core), ``prunetune.methods``, ``prunetune.search``,
``prunetune.cluster`` and ``prunetune.tracking``. A user's own ``search.py`` or ``methods/`` in the
working directory therefore never shadows them, in the driver or in a Ray worker.

The Python API (``prunetune.api``, README "Python API"): :class:`Search` runs the search of
``prunetune run`` on your own model and returns a :class:`SearchResult`; :func:`prune` prunes a
model to a policy; :func:`load_pruned` rebuilds a saved pruned model as ``(model, info)``. Importing it loads no torch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prunetune")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from prunetune.api import Search, SearchResult, load_pruned, prune  # noqa: E402  (after __version__)

__all__ = ["Search", "SearchResult", "__version__", "load_pruned", "prune"]
