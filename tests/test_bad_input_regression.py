"""Bad input, table-driven: each row runs the real CLI once and checks what a user sees.

A refusal exits 2 with one ``prunetune: error:`` line on stderr and no traceback, and leaves
nothing half-written (the row's ``absent`` paths do not exist afterwards). A row that must work
exits 0 and says ``says`` somewhere in its output.

Rows that need a run directory get one made without Ray or training (``fake_run``): a real config,
space, trial records and a real pruned checkpoint of small_cnn on digits at 8x8, so export, status,
resume and sync read exactly what a search writes.

Add rows to ``CASES``: ``argv(ws)`` builds the arguments from the workspace ``ws`` (a ``Workspace``),
``prepare(ws)`` arranges files first.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.search_helpers import QUICK as SEARCH_QUICK
from tests.search_helpers import assert_user_error, run_cli

QUICK = ["--model", "small_cnn", "--dataset", "digits", "--image-size", "8", "--pretrain-epochs", "1"]
RUN_NAME = "r"
TRIAL = "t1"  # recorded as this version records: relative checkpoint path and its SHA-256
OLD_TRIAL = "t0"  # recorded as older versions did: an absolute checkpoint path, no digest


@dataclass(frozen=True)
class Workspace:
    root: Path  # the test's own folder (the CLI's working directory)
    run: Path  # a finished run directory, fresh for each test

    def path(self, name: str) -> str:
        return str(self.root / name)


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Workspace], list[str]]
    says: str | Callable[[Workspace], str]  # the error line's fragment (exit 2), or text in the output (exit 0)
    exit: int = 2
    prepare: Callable[[Workspace], None] = lambda ws: None
    absent: tuple[str, ...] = field(default=())  # paths under ws.root that must not exist afterwards
    timeout: float = 300
    in_process: bool = False  # run ``cli.main`` in the test's process (a refusal before Ray: no import cost)
    search: bool = False  # a row that runs a real search: the session's base-model cache, a migrated store
    cache: str | None = None  # $PRUNETUNE_CACHE, where not the test's own folder's cache/
    unsaid: tuple[str, ...] = field(default=())  # text that must not be in the output: work that should not start


# ----------------------------------------------------------------------------------------------
# A run directory without Ray
# ----------------------------------------------------------------------------------------------


def fake_run(run_dir: Path) -> None:
    """A finished run of two trials, each with a real pruned checkpoint in Ray's layout."""
    import torch

    from prunetune.pruning.dependency import build_space
    from prunetune.pruning.models import create_model
    from prunetune.pruning.policy import Policy
    from prunetune.pruning.surgery import prune, save_pruned
    from prunetune.search.config import dump_config, load_config
    from prunetune.tracking.rundir import file_sha256, new_meta, write_meta

    torch.manual_seed(0)
    cfg = load_config(None, overrides={"model": "small_cnn", "dataset.name": "digits", "dataset.image_size": 8,
                                       "name": RUN_NAME})
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    space = build_space(model, "small_cnn", (1, 8, 8))
    run_dir.mkdir(parents=True)
    dump_config(cfg, run_dir / "config.yaml")
    (run_dir / "space.json").write_text(json.dumps(space.to_json()))
    arch = {"name": "small_cnn", "num_classes": 10, "in_channels": 1}
    records = []
    for trial, ratio in ((OLD_TRIAL, 0.75), (TRIAL, 0.5)):
        policy = Policy.uniform(space, ratio)
        checkpoint = run_dir / f"trial_{trial}" / "checkpoint_000001"
        checkpoint.mkdir(parents=True)
        torch.manual_seed(0)
        base = create_model("small_cnn", num_classes=10, in_channels=1)
        save_pruned(checkpoint / "model.pt", prune(base, space, policy, importance="l1"), arch=arch,
                    space=space, policy=policy)
        records.append({
            "trial_id": trial, "trial_key": f"uid:{trial}", "status": "finished", "policy": policy.to_json(),
            "params": {}, "metrics": {"val_accuracy": 0.5, "macs_ratio": ratio ** 2, "macs": 1000},
            "test_accuracy": 0.5, "history": [],
            **({"checkpoint": str(checkpoint)} if trial == OLD_TRIAL else
               {"checkpoint": f"trial_{trial}/checkpoint_000001",
                "checkpoint_sha256": file_sha256(checkpoint / "model.pt")}),
        })
    (run_dir / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = new_meta(name=RUN_NAME, method="random", tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}",
                    experiment="prunetune")
    write_meta(run_dir, meta)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("template") / "runs" / RUN_NAME
    fake_run(run_dir)
    return run_dir


def model_file(run_dir: Path, trial: str) -> Path:
    return run_dir / f"trial_{trial}" / "checkpoint_000001" / "model.pt"


def moved(ws: Workspace) -> Path:
    """The run folder moved elsewhere: its original place no longer exists."""
    target = ws.root / "elsewhere" / "moved-run"
    target.parent.mkdir()
    shutil.move(str(ws.run), target)
    return target


def corrupt_copy(ws: Workspace, trial: str) -> None:
    """A copy of the run beside the intact original, with the trial's checkpoint overwritten."""
    copy = ws.root / "copy"
    shutil.copytree(ws.run, copy)
    model_file(copy, trial).write_bytes(b"\0garbage" * 40)


def _as_proxy(ws: Workspace, trial: str) -> None:
    """The trial recorded as a proxy (a searcher's short score), as ARPruning's neighbours are."""
    path = ws.run / "trials.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "fidelity": "proxy"} if r["trial_id"] == trial else r) + "\n"
                            for r in records))


def other_model(ws: Workspace) -> None:
    """The old-format trial's checkpoint replaced by the other trial's model (another policy)."""
    shutil.copyfile(model_file(ws.run, TRIAL), model_file(ws.run, OLD_TRIAL))


OWN_MODEL = """
from torch import nn


class MyNet(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))
"""


def own_model_moved_away(ws: Workspace) -> None:
    """The run's model made the user's own file (``nets/mynet.py:MyNet``), trial t1's checkpoint one of
    it, then the file moved elsewhere (``mv nets/mynet.py elsewhere``): the checkpoint itself is intact."""
    from prunetune.pruning.dependency import build_space
    from prunetune.pruning.models import create_model
    from prunetune.pruning.policy import Policy
    from prunetune.pruning.surgery import prune, save_pruned
    from prunetune.search.config import dump_config, load_config
    from prunetune.tracking.rundir import file_sha256

    (ws.root / "nets").mkdir()
    source = ws.root / "nets" / "mynet.py"
    source.write_text(OWN_MODEL)
    ref = f"{source}:MyNet"
    dump_config(load_config(None, overrides={"model": ref, "dataset.name": "digits", "dataset.image_size": 8,
                                             "name": RUN_NAME}), ws.run / "config.yaml")
    model = create_model(ref, num_classes=10, in_channels=1)
    space = build_space(model, ref, (1, 8, 8))
    (ws.run / "space.json").write_text(json.dumps(space.to_json()))
    policy = Policy.uniform(space, 0.5)
    save_pruned(model_file(ws.run, TRIAL), prune(model, space, policy, importance="l1"),
                arch={"name": ref, "num_classes": 10, "in_channels": 1}, space=space, policy=policy)
    records = [json.loads(line) for line in (ws.run / "trials.jsonl").read_text().splitlines()]
    for record in records:
        if record["trial_id"] == TRIAL:
            record.update(policy=policy.to_json(), checkpoint_sha256=file_sha256(model_file(ws.run, TRIAL)))
    (ws.run / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    source.rename(ws.root / "mynet-elsewhere.py")


def every_trial_failed(ws: Workspace) -> None:
    """The run's trials all failed, as a search records them: failed records, the first failure in
    summary.json."""
    records = [{"trial_id": trial, "trial_key": f"uid:{trial}", "status": "failed", "policy": None, "params": {},
                "metrics": {}, "test_accuracy": None, "history": []} for trial in (OLD_TRIAL, TRIAL)]
    (ws.run / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    failure = {"trial_id": OLD_TRIAL, "cause": "ValueError: bad", "log": str(ws.run / f"trial_{OLD_TRIAL}/error.txt")}
    (ws.run / "summary.json").write_text(json.dumps({"name": RUN_NAME, "best": None, "first_failure": failure}))


# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------


def _export(run: Callable[[Workspace], object], trial: str, out: str = "out.pt"):
    return lambda ws: ["export", str(run(ws)), "--trial", trial, "--out", ws.path(out)]


CASES = [
    # a run folder can be moved or copied (issue 17, item 6)
    Case("export-moved-run", lambda ws: ["export", str(moved(ws)), "--trial", TRIAL, "--out", ws.path("out.pt")],
         f"exported trial {TRIAL}", exit=0),
    Case("export-of-a-proxy-trial-warns", lambda ws: ["export", str(ws.run), "--trial", TRIAL, "--out", ws.path("out.pt")],
         f"warning: trial {TRIAL} is a proxy trial", exit=0, prepare=lambda ws: _as_proxy(ws, TRIAL)),
    Case("export-moved-run-old-absolute-record",
         lambda ws: ["export", str(moved(ws)), "--trial", OLD_TRIAL, "--out", ws.path("out.pt")],
         f"exported trial {OLD_TRIAL}", exit=0),
    Case("export-corrupted-copy-is-refused", _export(lambda ws: ws.root / "copy", TRIAL),
         "is not the one recorded when the trial ended", prepare=lambda ws: corrupt_copy(ws, TRIAL),
         absent=("out.pt", "out.pt.tmp")),
    Case("export-corrupt-checkpoint-without-digest", _export(lambda ws: ws.root / "copy", OLD_TRIAL),
         "cannot be read: it is damaged", prepare=lambda ws: corrupt_copy(ws, OLD_TRIAL),
         absent=("out.pt", "out.pt.tmp")),
    Case("export-checkpoint-of-another-policy", _export(lambda ws: ws.run, OLD_TRIAL),
         "holds another model than the trial record", prepare=other_model, absent=("out.pt", "out.pt.tmp")),
    Case("export-unknown-trial", _export(lambda ws: ws.run, "nosuch"), "no trial 'nosuch'", absent=("out.pt",)),
    # the model's own file moved away: finetune's error (the file does not exist), not "damaged"
    Case("export-own-model-file-moved-away", _export(lambda ws: ws.run, TRIAL),
         "nets/mynet.py does not exist", prepare=own_model_moved_away, absent=("out.pt", "out.pt.tmp")),
    Case("finetune-own-model-file-moved-away", lambda ws: ["finetune", str(ws.run), "--trial", TRIAL, "--epochs", "1"],
         "nets/mynet.py does not exist", prepare=own_model_moved_away, absent=(f"runs/{RUN_NAME}/final",)),
    # every trial failed: no --trial ID would do; status and the traceback say why
    Case("export-every-trial-failed", lambda ws: ["export", str(ws.run), "--out", ws.path("out.pt")],
         lambda ws: f"no trial of {ws.run} finished (2 ended, 2 of them failed), so no --trial ID would do; see "
                    f"why with `prunetune status {ws.run}`, and trial {OLD_TRIAL}'s traceback in "
                    f"{ws.run}/trial_{OLD_TRIAL}/error.txt",
         prepare=every_trial_failed, absent=("out.pt",), in_process=True),
    Case("export-out-in-missing-folder", _export(lambda ws: ws.run, TRIAL, "missing/out.pt"),
         "does not exist", absent=("missing",)),
    # missing folders, and folders that are not runs
    *[Case(f"{command}-missing-folder", lambda ws, c=command, e=extra: [c, ws.path("nosuch"), *e],
           "does not exist or is not a folder", absent=("nosuch",))
      for command, extra in (("status", []), ("export", ["--out", "x.pt"]), ("resume", []), ("sync", []))],
    *[Case(f"{command}-not-a-run", lambda ws, c=command, e=extra: [c, ws.path("plain"), *e], "prunetune.json",
           prepare=lambda ws: (ws.root / "plain").mkdir() or (ws.root / "plain" / "notes.txt").write_text("hi"),
           absent=("x.pt", "plain/prunetune.json", "plain/trials.jsonl"), in_process=True)
      for command, extra in (("status", []), ("export", ["--out", "x.pt"]), ("resume", []), ("sync", []))],
    # messages name what exists (issue 17, item 9)
    Case("run-storage-is-a-file", lambda ws: ["run", *QUICK, "--storage", ws.path("afile"), "--name", "x"],
         "is a file", prepare=lambda ws: (ws.root / "afile").write_text(""), absent=("afile/x", "cache")),
    *[Case(f"{command}-cifar10-without-files-names-download", lambda ws, a=argv: a, "--download",
           absent=("cache",))
      for command, argv in (("run", ["run", "--dataset", "cifar10", "--trials", "1", "--storage", "runs"]),
                            ("prune", ["prune", "--model", "small_cnn", "--dataset", "cifar10", "--uniform", "0.5"]),
                            ("space", ["space", "--model", "small_cnn", "--dataset", "cifar10"]))],
    Case("uniform-with-three-trials-says-it-proposes-one-policy",
         lambda ws: ["run", *SEARCH_QUICK, "--method", "uniform", "--trials", "3", "--finetune-epochs", "0",
                     "--storage", ws.path("runs"), "--name", "u"],
         "uniform proposes 1 policy, so 1 trial will run, not the 3 of --trials", exit=0, search=True),
]


# ----------------------------------------------------------------------------------------------
# `prunetune run` and `resume`: the driver's checks (issue 17, items 2-5, 8 and 12)
# ----------------------------------------------------------------------------------------------

NOTHING = ("runs/x", "runs/mlflow.db", "cache")  # no run folder, no tracking store, no base model


def _run(*extra: str, name: str = "x"):
    return lambda ws: ["run", *QUICK, "--storage", ws.path("runs"), "--name", name, *extra]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write(name: str, text: str):
    return lambda ws: (ws.root / name).write_text(text)


def _corrupt_cached_base_model(ws: Workspace) -> None:
    """The cache file the run would load, as garbage (the same key and recipe as the driver's)."""
    from prunetune.pruning.train import dataset_cache_key, pretrain_path
    from prunetune.search.config import load_config

    cfg = load_config(None, overrides={"model": "small_cnn", "dataset.name": "digits", "dataset.image_size": 8,
                                       "pretrain.epochs": 1})
    d = cfg.dataset
    key = dataset_cache_key(d.name, 8, d.data_fraction, d.val_fraction, d.root)
    path = pretrain_path("small_cnn", key, cfg.pretrain.recipe(), cfg.seed, ws.root / "cache")
    path.parent.mkdir()
    path.write_bytes(b"not a checkpoint")


def _finished(ws: Workspace) -> None:
    (ws.run / "summary.json").write_text(json.dumps({"name": RUN_NAME, "trials": {"finished": 2}}))


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _fewer_cores_than(count: int) -> bool:
    return (os.cpu_count() or 1) < count


DRIVER_CASES = [
    Case("run-unknown-model", _run("--model", "resnet21"), "unknown model 'resnet21'", absent=NOTHING, in_process=True),
    Case("run-unknown-dataset", _run("--dataset", "mnist"), "unknown dataset 'mnist'", absent=NOTHING, in_process=True),
    Case("run-unknown-method", _run("--method", "anneal"), "unknown method 'anneal'", absent=NOTHING, in_process=True),
    Case("run-unknown-criterion", _run("--importance", "magic"), "unknown importance criterion 'magic'",
         absent=NOTHING, in_process=True),
    Case("run-target-above-one", _run("--macs-target", "1.5"), "macs_target", absent=NOTHING, in_process=True),
    Case("run-target-below-reach", _run("--macs-target", "0.001"), "MACs ratios from", absent=NOTHING, in_process=True),
    Case("run-optuna-floor-above-the-target", _run("--macs-target", "0.2", "--set", "optuna.min_keep_ratio=0.9"),
         "the lowest MACs ratio optuna reaches on small_cnn with optuna.min_keep_ratio 0.9", absent=NOTHING,
         in_process=True),  # before Ray or the base model: no search none of whose trials can meet it
    Case("run-dcm-floor-above-the-target", _run("--method", "dcm", "--macs-target", "0.2", "--set", "dcm.floor=0.9"),
         "raise --macs-target to at least", absent=NOTHING, in_process=True),  # a learner's own check, as early
    Case("run-target-not-a-number", _run("--macs-target", "half"), "'half' is not a number", absent=NOTHING, in_process=True),
    Case("run-no-trials", _run("--trials", "0"), "--trials: 0 is not a positive integer", absent=NOTHING, in_process=True),
    Case("run-fractional-trials", _run("--trials", "3.5"), "'3.5' is not an integer", absent=NOTHING, in_process=True),
    Case("run-negative-concurrency", _run("--concurrency", "-1"), "-1 is not a positive integer", absent=NOTHING, in_process=True),
    Case("run-malformed-yaml", lambda ws: [*_run()(ws), ws.path("bad.yaml")], "fix the YAML there",
         prepare=_write("bad.yaml", "model: [small_cnn\n"), absent=NOTHING, in_process=True),
    Case("run-unknown-set-key", _run("--set", "finetune.epoch=2"), "did you mean 'finetune.epochs'",
         absent=NOTHING, in_process=True),
    Case("run-bad-sampler-pair", _run("--set", "optuna.sampler=nsga2"), "nsga2", absent=NOTHING, in_process=True),
    Case("run-unreachable-tracking-server", lambda ws: _run("--tracking-uri", f"http://127.0.0.1:{_closed_port()}")(ws),
         "no MLflow tracking server answers", absent=NOTHING, in_process=True),
    Case("run-unknown-uri-scheme", _run("--tracking-uri", "ftp://example.org/x"), "unsupported scheme 'ftp'",
         absent=NOTHING, in_process=True),
    Case("run-sqlite-folder-missing", lambda ws: _run("--tracking-uri", f"sqlite:///{ws.root}/no/such/m.db")(ws),
         "does not exist; create it first", absent=(*NOTHING, "no"), in_process=True),
    Case("run-unreachable-address", lambda ws: _run("--address", f"127.0.0.1:{_closed_port()}")(ws),
         "nothing answers there", absent=NOTHING, in_process=True),
    Case("run-read-only-storage", lambda ws: ["run", *QUICK, "--storage", "/proc/prunetune-runs", "--name", "x"],
         "cannot be written", absent=("cache",), in_process=True),
    Case("run-name-already-used", _run(name=RUN_NAME), "resume it with `prunetune resume",
         absent=("runs/mlflow.db", "cache"), in_process=True),
    *([Case("run-cuda-without-a-gpu", _run("--set", "resources.device=cuda", "--gpus-per-trial", "1"),
            "no CUDA device is available", absent=NOTHING, in_process=True)] if _no_gpu() else []),
    Case("resume-a-finished-run", lambda ws: ["resume", str(ws.run)], "has already finished", exit=0,
         prepare=_finished, absent=("runs/mlflow.db", "cache"), in_process=True),
    # a local Ray's resources are judged, and the cached base model loaded, before Ray starts
    *([Case("run-gpus-per-trial-without-a-gpu", _run("--gpus-per-trial", "1"),
            "--gpus-per-trial 1: no trial could start", absent=NOTHING, in_process=True)] if _no_gpu() else []),
    *([Case("run-more-cpus-per-trial-than-cores", _run("--cpus-per-trial", "4"),
            "--cpus-per-trial 4: no trial could start", absent=NOTHING, in_process=True)]
      if _fewer_cores_than(4) else []),
    Case("run-corrupt-cached-base-model", _run(), "delete it", prepare=_corrupt_cached_base_model,
         absent=("runs/x", "runs/mlflow.db"), in_process=True),
]
CASES += DRIVER_CASES


# ----------------------------------------------------------------------------------------------
# Flags that every command checks against the config's declaration of the same value
# ----------------------------------------------------------------------------------------------

PRUNE = ["prune", "--model", "small_cnn", "--dataset", "digits", "--uniform", "0.5"]
SEED_RULE = "argument --seed: must be in [0, 4294967295]"
EPOCHS_RULE = "argument --pretrain-epochs: must be >= 1"
SIZE_RULE = "argument --image-size: must be in [1, 1024] (image side in pixels), got"

FLAG_CASES = [
    Case("prune-negative-seed", lambda ws: [*PRUNE, "--seed", "-1"], SEED_RULE, absent=("cache",), in_process=True),
    Case("run-negative-seed", _run("--seed", "-1"), SEED_RULE, absent=NOTHING, in_process=True),
    Case("prune-no-pretrain-epochs", lambda ws: [*PRUNE, "--pretrain-epochs", "0"], EPOCHS_RULE, absent=("cache",),
         in_process=True),
    Case("run-no-pretrain-epochs", _run("--pretrain-epochs", "0"), EPOCHS_RULE, absent=NOTHING, in_process=True),
    Case("run-no-pretrain-epochs-set", _run("--set", "pretrain.epochs=0"), "config key 'pretrain.epochs' must be >= 1",
         absent=NOTHING, in_process=True),
    *[Case(f"{name}-huge-image-size", lambda ws, a=argv: [*a(ws), "--image-size", "100000"], SIZE_RULE,
           absent=("cache", "runs/x"), in_process=True)
      for name, argv in (("prune", lambda ws: PRUNE), ("space", lambda ws: ["space", *PRUNE[1:5]]),
                         ("run", _run()))],
]
CASES += FLAG_CASES


# ----------------------------------------------------------------------------------------------
# A base-model cache that cannot be written is said before the base model is trained
# ----------------------------------------------------------------------------------------------

UNWRITABLE = "/proc/prunetune-cache"  # not even root can make a folder in /proc
CACHE_RULE = f"the base-model cache {UNWRITABLE} cannot be created"
CACHE_CASES = [
    Case("run-unwritable-cache-dir", _run("--cache-dir", UNWRITABLE), CACHE_RULE, absent=NOTHING, in_process=True),
    Case("run-unwritable-cache-env", _run(), CACHE_RULE, cache=UNWRITABLE, absent=NOTHING, in_process=True),
    Case("prune-unwritable-cache-dir", lambda ws: [*PRUNE, "--cache-dir", UNWRITABLE], CACHE_RULE, in_process=True),
    Case("prune-unwritable-cache-env", lambda ws: PRUNE, CACHE_RULE, cache=UNWRITABLE, in_process=True),
    Case("prune-cache-under-a-file", lambda ws: [*PRUNE, "--cache-dir", ws.path("afile/cache")],
         "afile/cache cannot be created (Not a directory); pass a writable folder with --cache-dir DIR or "
         "$PRUNETUNE_CACHE", prepare=_write("afile", ""), in_process=True),
]
CASES += CACHE_CASES


# ----------------------------------------------------------------------------------------------
# Image folders torchvision refuses, or whose files PIL cannot read
# ----------------------------------------------------------------------------------------------


def _image_folder(ws: Workspace, *, classes=("cat", "dog"), only_val=(), empty=(), corrupt: str | None = None) -> None:
    """``ws.root/imgs`` with train/ and val/ folders of 8x8 PNGs per class; ``only_val`` classes in val/
    only, ``empty`` class folders without an image in both, ``corrupt`` a file that is no image."""
    from PIL import Image

    for part in ("train", "val"):
        for label in (*classes, *(only_val if part == "val" else ())):
            folder = ws.root / "imgs" / part / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 90, 200 if label == classes[0] else 20)).save(folder / f"{i}.png")
        for label in empty:
            (ws.root / "imgs" / part / label).mkdir()
    if corrupt:
        (ws.root / "imgs" / corrupt).write_bytes(b"\x89PNG but not really" * 8)


FOLDER = [*PRUNE[:3], "--dataset", "imagefolder", "--uniform", "0.5", "--image-size", "8", "--pretrain-epochs", "1"]

FOLDER_CASES = [
    Case("imagefolder-empty-class-folder", lambda ws: [*FOLDER, "--data-root", ws.path("imgs")],
         "Found no valid file for the classes odd", prepare=lambda ws: _image_folder(ws, empty=("odd",)),
         absent=("cache",), in_process=True),
    Case("imagefolder-empty-class-folder-in-train-only", lambda ws: [*FOLDER, "--data-root", ws.path("imgs")],
         "have different class folders (only in train/: odd)",
         prepare=lambda ws: _image_folder(ws) or (ws.root / "imgs" / "train" / "odd").mkdir(), absent=("cache",),
         in_process=True),
    Case("imagefolder-class-only-in-val", lambda ws: [*FOLDER, "--data-root", ws.path("imgs")],
         "have different class folders (only in val/: odd)", prepare=lambda ws: _image_folder(ws, only_val=("odd",)),
         absent=("cache",), in_process=True),
    Case("imagefolder-corrupt-image", lambda ws: [*FOLDER, "--data-root", ws.path("imgs")],
         "imgs/train/dog/broken.png cannot be read (cannot identify image file",
         prepare=lambda ws: _image_folder(ws, corrupt="train/dog/broken.png"), absent=("cache",), in_process=True),
    # a file of val/ is read first at an evaluation, after a training epoch: it is refused before any
    Case("imagefolder-corrupt-image-in-val", lambda ws: [*FOLDER, "--data-root", ws.path("imgs")],
         "imgs/val/cat/broken.png cannot be read (cannot identify image file",
         prepare=lambda ws: _image_folder(ws, corrupt="val/cat/broken.png"), absent=("cache",), in_process=True,
         unsaid=("pretrain epoch",)),
]
CASES += FOLDER_CASES


def test_the_cache_check_creates_nothing_where_the_cache_can_be_made(tmp_path):
    from prunetune.search.commands.common import check_cache_writable

    check_cache_writable(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []  # neither the cache nor the probe is left behind


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, template: Path, tmp_path: Path, capsys, monkeypatch, request):
    ws = Workspace(tmp_path, tmp_path / "runs" / RUN_NAME)
    shutil.copytree(template.parent, ws.run.parent)
    case.prepare(ws)
    cache = Path(case.cache) if case.cache else tmp_path / "cache"
    if case.search:  # conftest: the base models other searches trained, a migrated MLflow store
        request.getfixturevalue("tracking_store")(ws.run.parent)
        cache = request.getfixturevalue("base_model_cache")
    if case.in_process:
        result = _main_in_process(case.argv(ws), cache=cache, cwd=tmp_path, capsys=capsys,
                                  monkeypatch=monkeypatch)
    else:
        result = run_cli(case.argv(ws), cache=cache, cwd=tmp_path, timeout=case.timeout)
    says = case.says(ws) if callable(case.says) else case.says
    if case.exit == 2:
        assert_user_error(result, says)
    else:
        assert result.returncode == case.exit, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        output = result.stdout + result.stderr
        assert output.count(says) == 1, output[-3000:]
    for name in case.absent:
        assert not (tmp_path / name).exists(), name
    for text in case.unsaid:
        assert text not in result.stdout + result.stderr, result.stderr[-3000:]


def _main_in_process(argv: list[str], *, cache: Path, cwd: Path, capsys, monkeypatch):
    """``prunetune ARGV`` through ``cli.main`` here, as ``run_cli`` runs it in a subprocess."""
    import subprocess

    from prunetune.search.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PRUNETUNE_CACHE", str(cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, status, out, err)
