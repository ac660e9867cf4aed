"""`prunetune finetune RUN_DIR [--trial best|ID | --candidates N [--heuristics]] --epochs N [--distill]
[--out FILE]`: the final fine-tune of a search's chosen policy, or of its best few candidates keeping
the best by final validation accuracy (``search.final``), resumable: run it again after a kill."""

from __future__ import annotations

import argparse

NAME = "finetune"


def add_parser(subparsers) -> argparse.ArgumentParser:
    from prunetune.search.commands.common import positive_float, positive_int

    parser = subparsers.add_parser(
        NAME, help="fine-tune a search's chosen policy for longer (optionally distilled from the base model)",
        description="Prune the base model to a trial's policy again and fine-tune it for --epochs, "
                    "defaults from the run's `final` config section; with --candidates N (and --heuristics) "
                    "each candidate gets it and the best final validation accuracy is kept (N final "
                    "fine-tunes, plus the heuristics', instead of one); the result goes into summary.json "
                    "(final) and MLflow (a child run tagged final). Run the same command again after an "
                    "interruption and it continues from its last epoch.")
    parser.add_argument("run_dir", help="the run directory of the search")
    parser.add_argument("--trial", default=None,
                        help="'best' (within the MACs target) or a trial id: this trial only [the candidates]")
    parser.add_argument("--candidates", type=positive_int, default=None,
                        help="fine-tune the N best distinct trials within the MACs target and keep the best by "
                             "final validation accuracy [final.candidates]")
    parser.add_argument("--heuristics", action=argparse.BooleanOptionalAction, default=None,
                        help="the warm start's heuristic trials are candidates too [final.heuristics]")
    parser.add_argument("--epochs", type=positive_int, default=None, help="fine-tuning epochs [final.epochs]")
    parser.add_argument("--lr", type=positive_float, default=None, help="initial learning rate [final.lr]")
    parser.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                        help="train against the base model's softened logits [final.distill]")
    parser.add_argument("--distill-weight", type=float, default=None,
                        help="weight w of the distillation term, in [0, 1] [final.distill_weight]")
    parser.add_argument("--temperature", type=positive_float, default=None,
                        help="distillation temperature [final.temperature]")
    parser.add_argument("--out", default=None, help="also save the fine-tuned model here (state format)")
    parser.add_argument("--cache-dir", default=None, help="base model cache")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import shutil
    from dataclasses import replace
    from pathlib import Path

    from prunetune.pruning.errors import UserError
    from prunetune.search.commands.common import check_output_file
    from prunetune.search.commands.run_cmd import cache_dir
    from prunetune.search.config import load_config
    from prunetune.search.final import format_final, record_final, run_finals
    from prunetune.search.prepare import log_to_stderr
    from prunetune.search.trial import CHECKPOINT_MODEL
    from prunetune.tracking.run_lock import run_lock
    from prunetune.tracking.rundir import CONFIG_FILE, read_meta

    run_dir = Path(args.run_dir).expanduser().resolve()
    read_meta(run_dir)  # a one-line error for a folder that is not a run
    out = check_output_file(args.out) if args.out else None
    if args.trial is not None and ((args.candidates or 1) > 1 or args.heuristics):
        raise UserError(f"--trial {args.trial} fine-tunes that trial only, so it cannot go with "
                        f"{'--heuristics' if args.heuristics else f'--candidates {args.candidates}'}; drop one")
    given = {"epochs": args.epochs, "lr": args.lr, "distill": args.distill, "distill_weight": args.distill_weight,
             "temperature": args.temperature, "candidates": args.candidates, "heuristics": args.heuristics}
    configured = load_config(run_dir / CONFIG_FILE, saved=True).final
    final = replace(configured, **{key: value for key, value in given.items() if value is not None})  # checked
    with run_lock(run_dir, "finetune"):  # one writer at a time: a search's resume, or another finetune
        result = run_finals(run_dir, trial=args.trial, final=final, cache_dir=cache_dir(args.cache_dir),
                            log=log_to_stderr)
        record_final(run_dir, result, log_to_stderr)
    print(format_final(result), flush=True)
    if out is not None:
        tmp = out.with_name(out.name + ".tmp")
        shutil.copyfile(run_dir / result["checkpoint"] / CHECKPOINT_MODEL, tmp)
        tmp.replace(out)
        print(f"saved the fine-tuned model to {out} (load it with `model, info = prunetune.load_pruned("
              f"{str(out)!r})`: info holds its arch, space, policy and extra)")
    return 0
