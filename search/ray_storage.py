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

import shutil
from pathlib import Path

from prunetune.pruning.errors import UserError


def join_uri(uri: str, name: str) -> str:
    """``uri`` with ``name`` appended to its path, its query (``?endpoint_override=...``) kept."""
    path, sep, query = uri.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


def experiment_location(ray_storage: str | None, run_dir: Path) -> str:
    """Where Ray Tune's experiment of this run lives: the run directory, or ``<ray_storage>/<name>``."""
    return join_uri(ray_storage, run_dir.name) if ray_storage else str(run_dir)


def check_ray_storage(uri: str | None) -> None:
    """Fail before anything starts when ``uri`` (a URI: the config checks that) cannot be opened or its
    bucket does not exist; nothing to check when it is null (the run directory)."""
    if uri is None:
        return
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        bucket = path.split("/", 1)[0]
        found = fs.get_file_info(bucket).type
    except (OSError, ValueError) as exc:
        raise UserError(f"ray_storage {uri} cannot be opened ({_first_line(exc)}); check the URI, the "
                        f"endpoint and the credentials") from None
    if found != pyarrow.fs.FileType.Directory:
        raise UserError(f"ray_storage {uri}: bucket {bucket!r} does not exist; create it first")


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
