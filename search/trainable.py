"""The function Ray Tune runs for each trial: a thin shell around ``search.trial.run_trial``.

Ray hands it the trial's config (``{"policy": ..., "seed": ...}``) and, through
``tune.with_parameters``, the search's shared ``TrialSetup`` (base model, data, space), which Ray
stores once in its object store and each node fetches once. Reports go through
``ray.tune.report`` with a checkpoint directory; a retried trial finds its last checkpoint with
``ray.tune.get_checkpoint`` and continues from it.

A config may set the trial's own fine-tune length, ``finetune_epochs`` (a searcher's proxy trial,
``methods.proxy``: 0 = BatchNorm recalibration only); without it the search's ``finetune.epochs``.
``evaluate_test: false`` skips the test split (a proxy trial is scored on validation only); without
it, ``setup.evaluate_test`` decides (``test_eval``: a search scores its reportable trials at its end).
An intermediate report carries a checkpoint only after ``setup.checkpoint_min_s`` seconds of work
since the last one (``search.trial.CheckpointSchedule``); the last report always does.
``data_fraction`` (a two-stage search's proxy, ``search.two_stage``) fine-tunes on that fraction of
the training split, the same subset for every trial of the search (:func:`train_fraction`); the
pruning's calibration batches and BatchNorm recalibration still read the whole split, so a proxy
and its promoted trial prune alike.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from prunetune.search.trial import TrialSetup


def policy_trainable(config: dict, setup: TrialSetup) -> None:
    """Ray Tune function trainable: prune, fine-tune and measure the policy in ``config``."""
    import torch
    from ray import tune

    from prunetune.pruning.policy import Policy
    from prunetune.search.trial import run_trial

    if _report_recorded(config, setup):
        return
    torch.set_num_threads(max(1, setup.threads))
    policy = Policy.from_json(config["policy"])
    if config.get("finetune_epochs") is not None:
        setup = replace(setup, finetune=replace(setup.finetune, epochs=int(config["finetune_epochs"])))
    if float(config.get("data_fraction", 1.0)) < 1.0:
        setup = replace(setup, finetune_splits=train_fraction(setup.splits, float(config["data_fraction"]),
                                                              seed=setup.seed))

    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as restored:
        run_trial(setup, policy, seed=int(config.get("seed", setup.seed)), report=report_to_tune,
                  checkpoint_dir=Path(restored) if restored else None,
                  evaluate_test=bool(config.get("evaluate_test", setup.evaluate_test)),
                  checkpoint_min_s=setup.checkpoint_min_s)


def learner_trainable(config: dict, setup: TrialSetup, job) -> None:
    """Ray Tune function trainable for a learner (``job``: a ``search.learner_trial.LearnerJob``):
    learn the policy with the hyperparameters in ``config``, then prune, fine-tune and measure it."""
    import torch
    from ray import tune

    from prunetune.search.learner_trial import run_learner_trial

    if _report_recorded(config, setup):
        return
    torch.set_num_threads(max(1, setup.threads))
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as restored:
        run_learner_trial(setup, job, config, seed=int(config.get("seed", setup.seed)), report=report_to_tune,
                          checkpoint_dir=Path(restored) if restored else None)


def train_fraction(splits, fraction: float, *, seed: int):
    """``splits`` with ``fraction`` of its training split (at least one sample), drawn for ``seed``:
    the dataset's own ``subset`` where it has one (in-memory images keep their batched loader),
    else a ``torch.utils.data.Subset`` (indices only)."""
    import numpy as np
    import torch
    from torch.utils.data import Subset

    size = len(splits.train)
    count = min(max(round(size * fraction), 1), size)
    indices = torch.from_numpy(np.random.default_rng([seed, 3]).permutation(size)[:count]).sort().values
    subset = getattr(splits.train, "subset", None)
    return replace(splits, train=subset(indices) if callable(subset) else Subset(splits.train, indices.tolist()))


def config_key(config: dict) -> str:
    """What makes two trials the same work: the config less the searcher's bookkeeping."""
    kept = {k: v for k, v in (config or {}).items() if k not in ("proposal_id", "estimated_macs_ratio")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _report_recorded(config: dict, setup: TrialSetup) -> bool:
    """On resume: report the result ``trials.jsonl`` holds for this trial (by id, else by config), if any.

    A trial that ended just before the driver was killed is in ``trials.jsonl`` but may be running,
    or not yet created, in Ray's last experiment snapshot; Ray then runs it again. Its recorded
    result is handed back instead, so its compute is not spent twice.
    """
    if not setup.recorded:
        return False
    from ray import tune

    result = (setup.recorded.get("by_id", {}).get(tune.get_context().get_trial_id())
              or setup.recorded.get("by_config", {}).get(config_key(config)))
    if result is None:
        return False
    tune.report({**result, "node": _node_id(), "device": _device()})
    return True


def report_to_tune(metrics: dict, write_checkpoint) -> None:
    """``ray.tune.report`` the trial's metrics (with its node and device), with a checkpoint if a writer is given."""
    from ray import tune

    metrics = {**metrics, "node": _node_id(), "device": _device()}
    if write_checkpoint is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="prunetune-ckpt-") as directory:
        write_checkpoint(Path(directory))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def _node_id() -> str:
    """The Ray node this trial runs on, as its IP and the first characters of its id."""
    import ray

    context = ray.get_runtime_context()
    node = context.get_node_id()
    return f"{ray.util.get_node_ip_address()}/{node[:8]}"


def _device() -> str:
    """'cpu', or 'cuda:' and the GPU ids Ray gave this trial (its share of them when fractional)."""
    import ray

    gpus = ray.get_gpu_ids()
    return "cuda:" + ",".join(str(g) for g in gpus) if gpus else "cpu"
