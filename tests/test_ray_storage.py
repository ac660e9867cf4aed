"""Ray's experiment state and checkpoints in an S3 bucket (`--ray-storage`), for clusters without a
shared file system: a real S3 HTTP server on loopback (moto's server, which speaks S3's API to
pyarrow's S3 file system as any S3-compatible store does), real Ray, a real sqlite MLflow store."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from prunetune.search.ray_session import kill_leftover_ray
from prunetune.search.ray_storage import join_uri
from tests.search_helpers import (
    QUICK,
    as_ended,
    assert_user_error,
    read_jsonl,
    run_cli,
    start_cli,
    wait_for_records,
)

pytestmark = pytest.mark.slow

BUCKET = "prunetune-runs"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on 127.0.0.1 with one bucket; credentials in the environment every process inherits."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client, f"?endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_uri_mistakes_are_one_line_errors_and_create_nothing(s3, tmp_path):
    _, endpoint = s3
    storage = tmp_path / "runs"
    for ray_storage, fragment in [(f"s3://no-such-bucket/ray{endpoint}", "does not exist"),
                                  (str(tmp_path / "dir"), "not a URI")]:
        result = run_cli(["run", *QUICK, "--trials", "1", "--name", "bad", "--storage", str(storage),
                          "--ray-storage", ray_storage], cache=tmp_path / "cache", cwd=tmp_path)
        assert_user_error(result, fragment)
        assert not (storage / "bad").exists() and not (storage / "mlflow.db").exists()
    result = run_cli(["run", *QUICK, "--trials", "1", "--name", "bad", "--storage", f"s3://{BUCKET}/runs"],
                     cache=tmp_path / "cache", cwd=tmp_path)
    assert_user_error(result, "--ray-storage")


def test_a_search_keeps_its_checkpoints_in_the_bucket_resumes_and_exports_from_it(s3, tmp_path, base_model_cache,
                                                                                   tracking_store):
    """SIGKILL the driver after its first trial, resume: Ray's state comes back from the bucket, the
    budget completes with each trial once, and the best trial exports from its checkpoint there."""
    client, endpoint = s3
    storage, cache = tracking_store(tmp_path / "runs"), base_model_cache
    run_dir = storage / "in-s3"
    ray_storage = f"s3://{BUCKET}/ray{endpoint}"
    args = ["run", *QUICK, "--finetune-epochs", "2", "--trials", "3", "--concurrency", "1", "--name", "in-s3",
            "--storage", str(storage), "--ray-storage", ray_storage]
    first = start_cli(args, cache=cache, cwd=tmp_path, log=tmp_path / "first.log")
    temp_dirs: list[str] = []
    try:
        before_kill = wait_for_records(run_dir, 1, first, tmp_path / "first.log")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        temp_dirs = json.loads((run_dir / "prunetune.json").read_text())["ray_temp_dirs"]
        assert any(key.startswith("ray/in-s3/experiment_state") for key in _keys(client, "ray/in-s3/"))

        resumed = run_cli(["resume", str(run_dir)], cache=cache, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        records = read_jsonl(run_dir / "trials.jsonl")
        assert len({r["trial_key"] for r in records}) == len(records) == 3
        assert as_ended(records[: len(before_kill)]) == as_ended(before_kill)  # not rerun
        assert json.loads((run_dir / "summary.json").read_text())["trials"]["finished"] == 3

        keys = _keys(client, "ray/in-s3/")
        for record in records:  # every trial's checkpoint is in the bucket, none on the driver's disk
            assert record["checkpoint"].startswith(f"trial_{record['trial_id']}/")  # relative to the experiment
            assert any(key.startswith(f"ray/in-s3/{record['checkpoint']}/") for key in keys)
        assert not list(run_dir.glob("trial_*")) and not list(run_dir.glob("experiment_state*"))

        out = tmp_path / "best.pt"
        exported = run_cli(["export", str(run_dir), "--trial", "best", "--out", str(out), "--check"],
                           cache=cache, cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr[-2000:]
        line = [x for x in exported.stdout.splitlines() if x.startswith("test accuracy of the export")][0]
        best = json.loads((run_dir / "summary.json").read_text())["best"]
        assert float(line.split()[5]) == pytest.approx(best["test_accuracy"], abs=1e-6)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        kill_leftover_ray(temp_dirs)


def test_the_run_name_goes_into_the_uri_path_before_its_query():
    assert join_uri("s3://b/p?endpoint_override=h:1&scheme=http", "run") == "s3://b/p/run?endpoint_override=h:1&scheme=http"
    assert join_uri("s3://b/p/", "run") == "s3://b/p/run"
