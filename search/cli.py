"""The `prunetune` command line: one dispatcher, one module per subcommand.

``COMMANDS`` lists the command modules (see ``search.commands``): each registers its parser with
``add_parser(subparsers)`` and handles its arguments with ``run(args) -> int``. Adding a command is
one module and one entry here.

A user's mistake (``UserError``, or a bad argument) prints ``prunetune: error: <message>`` on one
line to stderr and exits 2; Ctrl-C exits 130 with one line. Anything else is a bug and keeps its
traceback. Nothing heavy is imported here, so ``prunetune --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from prunetune.pruning.errors import UserError
from prunetune.search.commands import (
    cluster_cmd,
    compare_cmd,
    export_cmd,
    finetune_cmd,
    prune_cmd,
    resume_cmd,
    run_cmd,
    space_cmd,
    status_cmd,
    sync_cmd,
)
from prunetune.search.fast_exit import EXIT_CLOSED_STDOUT, exit_now, silence_stdout, stdout_closed

PROG = "prunetune"
COMMANDS = (run_cmd, resume_cmd, status_cmd, compare_cmd, finetune_cmd, export_cmd, sync_cmd, space_cmd,
            prune_cmd, cluster_cmd)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UserErrors, so they print as one line like every other."""

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command in ``COMMANDS`` registered."""
    parser = OneLineErrorParser(
        prog=PROG, description="Search layer-wise channel-pruning policies for CNNs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subparsers.required = True
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PROG)
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the command, return its exit status."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UserError as error:
        message = " ".join(str(error).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as stop:  # search.interrupt.Interrupted carries SIGTERM's 143
        print(f"{PROG}: interrupted", file=sys.stderr)
        return getattr(stop, "exit_status", EXIT_INTERRUPTED)


def console() -> None:
    """The `prunetune` console script: ``main()``, then the process ends without the interpreter's
    finalization (``search.fast_exit``), since nothing is left to close. A reader that closed stdout
    early (``| head -1``) ends the command quietly with status 141, as SIGPIPE ends a Unix tool."""
    try:
        status = main()
    except SystemExit as stop:  # --help and --version end inside argparse
        if stop.code is not None and not isinstance(stop.code, int):
            raise
        status = stop.code
    except BrokenPipeError:
        if not stdout_closed():  # another pipe's: a bug, with its traceback
            raise
        silence_stdout()
        status = EXIT_CLOSED_STDOUT
    exit_now(status)


if __name__ == "__main__":
    console()
