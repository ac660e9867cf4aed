"""`prunetune export RUN_DIR [--trial best|ID] --out FILE [--format state|torchscript]`.

Writes the pruned, fine-tuned model of a trial: ``state`` is prunetune's plain-data format (load it
with ``pruning.surgery.load_pruned``, no pickled modules), ``torchscript`` a traced module that
loads with ``torch.jit.load`` alone. ``--check`` evaluates the exported model on the test split
and compares it with the trial's recorded test accuracy.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from prunetune.pruning.errors import UserError

NAME = "export"
FORMATS = ("state", "torchscript")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help="export a trial's pruned, fine-tuned model")
    parser.add_argument("run_dir", help="the run directory of the search")
    parser.add_argument("--trial", default="best", help="'best' (within the MACs target) or a trial id")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--format", choices=FORMATS, default="state", help="state (default) or torchscript")
    parser.add_argument("--check", action="store_true", help="re-evaluate the test accuracy of the export")
    parser.set_defaults(handler=run)
    return parser


def find_trial(run_dir: Path, trial: str) -> dict:
    """The trials.jsonl record of ``trial`` ('best' or an id), which must have finished."""
    from prunetune.search.config import load_config
    from prunetune.search.summary import best_trial
    from prunetune.tracking.rundir import CONFIG_FILE, TRIALS_FILE, read_meta, read_trials

    read_meta(run_dir)
    records = read_trials(run_dir / TRIALS_FILE)
    if trial == "best":
        cfg = load_config(run_dir / CONFIG_FILE)
        best = best_trial(records, macs_limit=cfg.macs_target + cfg.macs_tolerance)
        if best is None:
            raise UserError(f"no finished trial of {run_dir} meets its MACs target; pass --trial ID")
        trial = best["trial_id"]
    matches = [r for r in records if r["trial_id"] == trial]
    if not matches:
        known = ", ".join(r["trial_id"] for r in records[:6])
        raise UserError(f"no trial '{trial}' in {run_dir}; trials are: {known}{' ...' if len(records) > 6 else ''}")
    record = matches[-1]
    if record["status"] != "finished" or not record.get("checkpoint"):
        raise UserError(f"trial {trial} did not finish ({record['status']}); export a finished trial")
    return record


def run(args: argparse.Namespace) -> int:
    from prunetune.search.trial import CHECKPOINT_MODEL

    run_dir = Path(args.run_dir).expanduser().resolve()
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it first")
    record = find_trial(run_dir, args.trial)
    with tempfile.TemporaryDirectory(prefix="prunetune-export-") as fetched:
        source = _checkpoint_model(run_dir, record, Path(fetched), CHECKPOINT_MODEL)
        from prunetune.pruning.surgery import load_pruned

        model, meta = load_pruned(source)
        model.eval()
        tmp = out.with_name(out.name + ".tmp")
        if args.format == "state":
            shutil.copyfile(source, tmp)
        else:
            import torch

            example = torch.zeros(1, *meta["space"].input_shape)
            torch.jit.trace(model, example).save(str(tmp))
        tmp.replace(out)
    print(f"exported trial {record['trial_id']} ({args.format}) to {out}: MACs ratio "
          f"{record['metrics']['macs_ratio']:.3f}, val accuracy {record['metrics']['val_accuracy']:.4f}, "
          f"test accuracy {_accuracy(record['test_accuracy'], 4)}")
    if args.check:
        accuracy = check_test_accuracy(run_dir, out, args.format)
        print(f"test accuracy of the export: {accuracy:.6f} (recorded {_accuracy(record['test_accuracy'], 6)})")
    return 0


def _checkpoint_model(run_dir: Path, record: dict, fetched: Path, filename: str) -> Path:
    """The trial's saved model: in its checkpoint folder, or fetched into ``fetched`` from ray_storage."""
    from prunetune.search.config import load_config
    from prunetune.tracking.rundir import CONFIG_FILE

    ray_storage = load_config(run_dir / CONFIG_FILE).ray_storage
    if ray_storage:
        from prunetune.search.ray_storage import fetch_checkpoint_file

        return fetch_checkpoint_file(ray_storage, record["checkpoint"], filename, fetched)
    source = Path(record["checkpoint"]) / filename
    if not source.is_file():
        raise UserError(f"the checkpoint of trial {record['trial_id']} is gone ({source}); it cannot be exported")
    return source


def _accuracy(value: float | None, digits: int) -> str:
    """An accuracy to ``digits`` decimals; ``-`` for a trial not evaluated on the test split (a proxy)."""
    return "-" if value is None else f"{value:.{digits}f}"


def check_test_accuracy(run_dir: Path, path: Path, fmt: str) -> float:
    """The exported model's accuracy on the run's test split."""
    import torch

    from prunetune.pruning.data import load_dataset
    from prunetune.pruning.surgery import load_pruned
    from prunetune.pruning.train import evaluate
    from prunetune.search.config import load_config
    from prunetune.tracking.rundir import CONFIG_FILE

    cfg = load_config(run_dir / CONFIG_FILE)
    d = cfg.dataset
    splits = load_dataset(d.name, root=d.root, seed=cfg.seed, val_fraction=d.val_fraction,
                          data_fraction=d.data_fraction, image_size=d.image_size)
    model = load_pruned(path)[0] if fmt == "state" else torch.jit.load(str(path))
    return evaluate(model, splits.test)[0]
