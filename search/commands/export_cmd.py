"""`prunetune export RUN_DIR [--trial best|ID] --out FILE [--format state|torchscript|onnx]`.

Writes the pruned, fine-tuned model of a trial: ``state`` is prunetune's plain-data format (load it
with ``pruning.surgery.load_pruned``, no pickled modules), ``torchscript`` a traced module that
loads with ``torch.jit.load`` alone, ``onnx`` an ONNX graph (``pruning.onnx_export``) with a
dynamic batch axis. ``--check`` evaluates the exported model on the test split and compares it
with the trial's recorded test accuracy; for ONNX it runs the file with onnxruntime and compares
its outputs with PyTorch's too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from prunetune.pruning.errors import UserError

NAME = "export"
FINAL = "final"  # --trial final: the final fine-tune of the best policy
FORMATS = ("state", "torchscript", "onnx")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(NAME, help="export a trial's pruned, fine-tuned model")
    parser.add_argument("run_dir", help="the run directory of the search")
    parser.add_argument("--trial", default="best",
                        help="'best' (within the MACs target; the default), 'final' (the final fine-tune) or a trial id")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--format", choices=FORMATS, default="state", help="state (default), torchscript or onnx (needs the onnx extra to check)")
    parser.add_argument("--check", action="store_true", help="re-evaluate the test accuracy of the export")
    parser.set_defaults(handler=run)
    return parser


def find_trial(run_dir: Path, trial: str) -> dict:
    """The trials.jsonl record of ``trial`` ('best' or an id), which must have finished; 'final'
    gives the final fine-tune's (summary.json's ``final``, ``search.final``) in the same shape."""
    from prunetune.search.config import load_config
    from prunetune.search.summary import best_trial
    from prunetune.tracking.rundir import CONFIG_FILE, STATUS_FINISHED, TRIALS_FILE, read_meta, read_trials

    read_meta(run_dir)
    if trial == FINAL:
        return _final_record(run_dir)
    records = read_trials(run_dir / TRIALS_FILE)
    if trial == "best":
        cfg = load_config(run_dir / CONFIG_FILE, saved=True)
        best = best_trial(records, macs_limit=cfg.macs_target + cfg.macs_tolerance)
        if best is None and not any(r["status"] == STATUS_FINISHED for r in records):
            raise _nothing_finished(run_dir, records)
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


def _nothing_finished(run_dir: Path, records: list[dict]) -> UserError:
    """The error of a search none of whose trials finished: no --trial ID would do, so it points to
    ``prunetune status`` and to the first failure's traceback (``summary.json``'s ``first_failure``)."""
    from prunetune.tracking.rundir import STATUS_FAILED, SUMMARY_FILE

    failed = sum(r["status"] == STATUS_FAILED for r in records)
    summary_file = run_dir / SUMMARY_FILE
    failure = (json.loads(summary_file.read_text()).get("first_failure") if summary_file.is_file() else None) or {}
    where = f", and trial {failure['trial_id']}'s traceback in {failure['log']}" if failure.get("log") else ""
    ended = f"{len(records)} ended, {failed} of them failed" if records else "none has ended"
    return UserError(f"no trial of {run_dir} finished ({ended}), so no --trial ID would do; see why with "
                     f"`prunetune status {run_dir}`{where}")


def _final_record(run_dir: Path) -> dict:
    """The final fine-tune as a trial record: its policy, metrics and checkpoint (relative to the run)."""
    import json

    from prunetune.tracking.rundir import SUMMARY_FILE

    summary = json.loads((run_dir / SUMMARY_FILE).read_text()) if (run_dir / SUMMARY_FILE).exists() else {}
    final = summary.get("final")
    if not final:
        raise UserError(f"the search in {run_dir} has no final fine-tune; run `prunetune finetune {run_dir} "
                        f"--epochs N` first, or export --trial best")
    metrics = {key: final.get(key) for key in ("val_accuracy", "macs", "params", "macs_ratio", "params_ratio")}
    return {"trial_id": f"final-{final['trial_id']}", "status": "finished", "checkpoint": final["checkpoint"],
            "policy": final["policy"], "metrics": metrics, "test_accuracy": final.get("test_accuracy"),
            FINAL: True}


def run(args: argparse.Namespace) -> int:
    from prunetune.search.trial import CHECKPOINT_MODEL

    run_dir = Path(args.run_dir).expanduser().resolve()
    from prunetune.search.commands.common import check_output_file, progress

    out = check_output_file(args.out)
    record = find_trial(run_dir, args.trial)
    with tempfile.TemporaryDirectory(prefix="prunetune-export-") as fetched:
        source = _checkpoint_model(run_dir, record, Path(fetched), CHECKPOINT_MODEL)
        model, meta = load_checked(run_dir, record, source)
        model.eval()
        tmp = out.with_name(out.name + ".tmp")
        if args.format == "state":
            shutil.copyfile(source, tmp)
        elif args.format == "onnx":
            from prunetune.pruning.onnx_export import export_onnx

            export_onnx(model, meta["space"].input_shape, tmp)
        else:
            import torch

            example = torch.zeros(1, *meta["space"].input_shape)
            torch.jit.trace(model, example).save(str(tmp))
        tmp.replace(out)
    print(f"exported trial {record['trial_id']} ({args.format}) to {out}: MACs ratio "
          f"{record['metrics']['macs_ratio']:.3f}, val accuracy {record['metrics']['val_accuracy']:.4f}, "
          f"test accuracy {_accuracy(record['test_accuracy'], 4)}")
    if record.get("fidelity") == "proxy":
        progress(f"prunetune: warning: trial {record['trial_id']} is a proxy trial (a searcher's or a "
                 f"two-stage search's short score, not fine-tuned as a full trial); fine-tune it first: "
                 f"`prunetune finetune {run_dir} --trial {record['trial_id']} --epochs N`")
    if args.check and args.format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        print('not checked: onnxruntime is not installed, so the ONNX export was not run (pip install "prunetune[onnx]")')
    elif args.check and args.format == "onnx":
        accuracy, gap = check_onnx(run_dir, out, model)
        print(f"test accuracy of the ONNX export (onnxruntime): {accuracy:.6f} (recorded "
              f"{_accuracy(record['test_accuracy'], 6)}); largest difference from PyTorch's logits {gap:.2e}")
    elif args.check:
        accuracy = check_test_accuracy(run_dir, out, args.format)
        print(f"test accuracy of the export: {accuracy:.6f} (recorded {_accuracy(record['test_accuracy'], 6)})")
    return 0


def _checkpoint_model(run_dir: Path, record: dict, fetched: Path, filename: str) -> Path:
    """The trial's saved model: in its checkpoint folder under the run directory (wherever that now
    is: records name it relative to it), or fetched into ``fetched`` from ray_storage."""
    from prunetune.search.config import load_config
    from prunetune.tracking.rundir import CONFIG_FILE, local_checkpoint, relative_checkpoint

    if record.get(FINAL):  # written by this machine's driver or `prunetune finetune`, in the run directory
        source = run_dir / record["checkpoint"] / filename
        if not source.is_file():
            raise UserError(f"the final fine-tune's checkpoint is gone ({source}); run `prunetune finetune "
                            f"{run_dir}` again")
        return source
    ray_storage = load_config(run_dir / CONFIG_FILE, saved=True).ray_storage
    if ray_storage:
        import pyarrow.fs

        from prunetune.search.ray_storage import experiment_location, fetch_checkpoint_file

        _, experiment = pyarrow.fs.FileSystem.from_uri(experiment_location(ray_storage, run_dir))
        remote = f"{experiment.rstrip('/')}/{relative_checkpoint(record['checkpoint'])}"
        return fetch_checkpoint_file(ray_storage, remote, filename, fetched)
    source = local_checkpoint(run_dir, record["checkpoint"]) / filename
    if not source.is_file():
        raise UserError(f"the checkpoint of trial {record['trial_id']} is gone ({source}); it cannot be exported")
    return source


def load_checked(run_dir: Path, record: dict, source: Path):
    """The trial's pruned model, refused unless it is the one the trial record describes.

    The checkpoint's SHA-256 must match the one recorded when the trial ended (records of older
    versions have none), and the model's own policy and space must be the trial's.
    """
    from prunetune.pruning.policy import Policy
    from prunetune.pruning.surgery import load_pruned
    from prunetune.tracking.rundir import SPACE_FILE, file_sha256

    trial = record["trial_id"]
    digest = record.get("checkpoint_sha256")
    if digest and file_sha256(source) != digest:
        raise UserError(f"the checkpoint of trial {trial} ({source}) is not the one recorded when the trial "
                        f"ended (its SHA-256 differs): it was changed or damaged; it cannot be exported")
    _check_model_code(run_dir)  # a missing model file is not a damaged checkpoint
    try:
        model, meta = load_pruned(source)
    except UserError:
        raise UserError(f"the checkpoint of trial {trial} ({source}) cannot be read: it is damaged; "
                        f"it cannot be exported") from None
    space_file = run_dir / SPACE_FILE
    space_id = json.loads(space_file.read_text(encoding="utf-8")).get("space_id") if space_file.is_file() else None
    saved = meta["policy"]
    recorded = Policy.from_json(record["policy"]) if record.get("policy") else None
    same_policy = recorded is None or Policy(recorded.keep_ratios, recorded.dropped_blocks,
                                             saved.space_id).key() == saved.key()
    if not same_policy or (space_id and meta["space"].space_id != space_id):
        raise UserError(f"the checkpoint of trial {trial} ({source}) holds another model than the trial "
                        f"record (policy or space differ); it cannot be exported")
    return model, meta


def _check_model_code(run_dir: Path) -> None:
    """The one-line error ``prunetune finetune`` gives (``pruning.user_models.resolve_factory``: the
    model file does not exist, or its module does not import) when the run's own model can no longer
    be imported here; registry and ``torchvision:`` models have nothing to check."""
    from prunetune.pruning.user_models import TORCHVISION_PREFIX, is_reference, resolve_factory
    from prunetune.search.config import load_config
    from prunetune.tracking.rundir import CONFIG_FILE

    model = load_config(run_dir / CONFIG_FILE, saved=True).model
    if is_reference(model) and not model.startswith(TORCHVISION_PREFIX):
        resolve_factory(model)


def _accuracy(value: float | None, digits: int) -> str:
    """An accuracy to ``digits`` decimals; ``-`` for a trial not evaluated on the test split (a proxy)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _test_split(run_dir: Path):
    from prunetune.pruning.data import load_dataset
    from prunetune.search.config import load_config
    from prunetune.tracking.rundir import CONFIG_FILE

    cfg = load_config(run_dir / CONFIG_FILE, saved=True)
    d = cfg.dataset
    return load_dataset(d.name, root=d.root, seed=cfg.seed, val_fraction=d.val_fraction,
                        data_fraction=d.data_fraction, image_size=d.image_size).test


def check_test_accuracy(run_dir: Path, path: Path, fmt: str) -> float:
    """The exported model's accuracy on the run's test split."""
    import torch

    from prunetune.pruning.surgery import load_pruned
    from prunetune.pruning.train import evaluate

    model = load_pruned(path)[0] if fmt == "state" else torch.jit.load(str(path))
    return evaluate(model, _test_split(run_dir))[0]


def check_onnx(run_dir: Path, path: Path, model) -> tuple[float, float]:
    """The ONNX file's test accuracy through onnxruntime, and the largest absolute difference of its
    logits from the PyTorch model's on the test split."""
    import torch

    from prunetune.pruning.loader import make_loader
    from prunetune.pruning.onnx_export import onnx_outputs, onnx_session

    session = onnx_session(path)
    model = model.cpu().eval()
    correct, total, gap = 0, 0, 0.0
    with torch.no_grad():
        for images, labels in make_loader(_test_split(run_dir), 256, shuffle=False):
            logits = onnx_outputs(session, images)
            gap = max(gap, float((logits - model(images)).abs().max()))
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
    return correct / max(total, 1), gap
