"""`--ray-storage` is checked before anything starts, and the check itself never hangs.

A GCS URI whose endpoint does not answer is what a machine without a network sees: pyarrow's GCS
client retries for 15 minutes inside C++, deaf to signals. Here the endpoint is a closed loopback
port, so the test behaves alike with or without a network. A ``file://`` URI names a local folder,
not a bucket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from prunetune.pruning.errors import UserError
from prunetune.search.ray_storage import PROBE_SECONDS, check_ray_storage
from tests.search_helpers import QUICK, assert_user_error, run_cli, start_cli

STARTUP_SECONDS = 20  # the CLI's imports and the digits data before the check, on a loaded 2-core machine


def _unanswered_gcs_uri() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"gs://prunetune-test-bucket/ray?endpoint_override=127.0.0.1:{port}&scheme=http"


def _run_args(tmp_path, ray_storage: str) -> list[str]:
    return ["run", *QUICK, "--trials", "2", "--name", "g", "--storage", str(tmp_path / "runs"),
            "--ray-storage", ray_storage]


def test_an_unreachable_gcs_storage_fails_within_the_limit_with_one_line(tmp_path):
    started = time.monotonic()
    result = run_cli(_run_args(tmp_path, _unanswered_gcs_uri()), cache=tmp_path / "cache", cwd=tmp_path,
                     timeout=PROBE_SECONDS + STARTUP_SECONDS + 60)
    elapsed = time.monotonic() - started
    assert_user_error(result, f"could not be reached in {PROBE_SECONDS:g} s")
    assert elapsed < PROBE_SECONDS + STARTUP_SECONDS, elapsed
    assert not (tmp_path / "runs" / "g").exists() and not (tmp_path / "cache").exists()


def test_the_wait_for_an_unreachable_storage_stops_at_sigterm(tmp_path):
    driver = start_cli(_run_args(tmp_path, _unanswered_gcs_uri()), cache=tmp_path / "cache", cwd=tmp_path,
                       log=tmp_path / "log")
    try:
        time.sleep(7)  # inside the check by now (it gives up 10 s after it starts)
        assert driver.poll() is None, (tmp_path / "log").read_text()
        os.killpg(driver.pid, signal.SIGTERM)
        status = driver.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("the driver did not stop within 5 s of SIGTERM")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    log = (tmp_path / "log").read_text()
    assert status == 128 + signal.SIGTERM, log
    assert "interrupted (SIGTERM)" in log and "Traceback" not in log


def test_a_local_file_uri_of_an_existing_folder_is_accepted(tmp_path):
    check_ray_storage(f"file://{tmp_path}")
    check_ray_storage(tmp_path.as_uri())


@pytest.mark.parametrize("name, says", [("missing", "does not exist; create the folder first"),
                                        ("a-file", "is not a folder")])
def test_a_local_file_uri_names_the_folder_not_a_bucket(tmp_path, name, says):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError) as error:
        check_ray_storage((tmp_path / name).as_uri())
    assert f"{tmp_path / name} {says}" in str(error.value)
    assert "bucket" not in str(error.value)
