"""`prunetune resume RUN_DIR`: continue an interrupted search (after Ctrl-C or a killed driver)."""

from __future__ import annotations

import argparse

NAME = "resume"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help="continue an interrupted search from its run directory",
        description="Restore the tuner, the searcher and the parent MLflow run of RUN_DIR: finished "
                    "trials are not run again, unfinished ones continue from their checkpoints.")
    parser.add_argument("run_dir", help="the run directory of the search")
    parser.add_argument("--cache-dir", default=None, help="base model cache")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from prunetune.search.commands.run_cmd import cache_dir
    from prunetune.search.driver import resume_search

    return resume_search(args.run_dir, cache_dir=cache_dir(args.cache_dir))
