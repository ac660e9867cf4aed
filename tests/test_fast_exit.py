"""The `prunetune` process ends without the interpreter's finalization, but only after the atexit
handlers ran and stdout and stderr were flushed; its exit status is main()'s, also for argparse's
own exits (--help, --version) and a user's mistake."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXITING = """
import atexit, sys, threading, time
threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", end=""))).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1)  # never shut down: its idle worker must be told to end, not waited for forever
pool.submit(lambda: None).result()
class Finalised:
    def __del__(self):
        print("finalised", flush=True)
kept = Finalised()  # a module global: only the interpreter's finalization would delete it
atexit.register(lambda: print("handler ran"))
print("buffered", end="")
print("to stderr", file=sys.stderr, end="")
from prunetune.search.fast_exit import exit_now
exit_now(STATUS)
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_exit_now_ends_threads_as_python_does_runs_the_atexit_handlers_flushes_stdio_skips_finalization():
    done = _python(EXITING.replace("STATUS", "3"))
    assert done.returncode == 3
    # a non-daemon thread is waited for, then the handlers run; piped stdout is block-buffered: nothing lost
    assert done.stdout == "bufferedthread donehandler ran\n"
    assert done.stderr == "to stderr"


def test_exit_now_with_none_exits_0():
    assert _python(EXITING.replace("STATUS", "None")).returncode == 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunetune.search.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_the_command_line_keeps_its_exit_statuses_and_output():
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("prunetune ")
    helped = _cli("--help")
    assert helped.returncode == 0 and "commands:" in helped.stdout
    wrong = _cli("status", str(ROOT / "no-such-run"))
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("prunetune: error: ") and len(wrong.stderr.strip().splitlines()) == 1


def test_the_console_script_is_the_fast_exiting_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"prunetune": "prunetune.search.cli:console"}


def _into_closed_pipe(*args: str) -> tuple[int, str]:
    """Run the CLI with stdout a pipe whose reader closed it at once, as ``| true`` does: the
    command's first write meets a pipe nobody reads. Returns the exit status and stderr."""
    child = subprocess.Popen([sys.executable, "-m", "prunetune.search.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    child.stdout.close()  # before the child has imported anything, let alone printed
    err = child.stderr.read()
    return child.wait(timeout=120), err


def test_a_reader_that_closes_stdout_early_ends_the_command_quietly_with_141(tmp_path):
    from tests.test_bad_input_regression import RUN_NAME, fake_run

    fake_run(tmp_path / RUN_NAME)
    for args in (["status", str(tmp_path / RUN_NAME), "--json"], ["space", "--model", "small_cnn", "--dataset", "digits"]):
        status, err = _into_closed_pipe(*args)
        assert (status, err) == (141, ""), (args, err[-2000:])


def test_a_broken_pipe_that_is_not_stdout_keeps_its_traceback():
    code = ("import sys; from prunetune.search import cli\n"
            "def main():\n    raise BrokenPipeError(32, 'a socket of ours broke')\n"
            "cli.main = main; print('ok', flush=True); cli.console()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stdout == "ok\n" and done.returncode == 1
    assert "Traceback" in done.stderr and "a socket of ours broke" in done.stderr
