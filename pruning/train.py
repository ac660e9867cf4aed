"""Training, evaluation, BatchNorm recalibration and the cached pretrained base model.

Training is SGD with a learning-rate schedule that is a pure function of the position in the run
(epoch and batch), and every epoch's shuffling, augmentation and dropout are seeded from
``(seed, epoch)``. So the state to resume a run is just the model, the optimizer and the number of
epochs done: a run interrupted after epoch k and resumed from its checkpoint trains exactly as one
that was never interrupted. :class:`Trainer` runs epoch by epoch for callers that checkpoint;
:func:`train` runs them all.

Two speed options, both off by default: ``amp="bf16"`` runs forward passes (training, evaluation,
recalibration) under ``torch.autocast`` in bfloat16, which keeps BatchNorm, softmax and the losses
in float32 and needs no loss scaling (bfloat16 has float32's exponent range); on a CPU it works, and
is faster only where the CPU has bfloat16 instructions (AMX or AVX512-BF16), slower than float32
elsewhere. ``channels_last`` keeps the model's weights and the inputs in NHWC
memory order, which cuDNN's convolutions prefer (with bfloat16 above all). Neither changes what is
computed beyond rounding. A step reads nothing back from the device: the epoch's loss and hits
are summed where the model runs and read once at its end.
"""

import hashlib
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from prunetune.pruning.data import Splits
from prunetune.pruning.distill import Distillation
from prunetune.pruning.errors import UserError
from prunetune.pruning.loader import make_loader
from prunetune.pruning.models import create_model
from prunetune.pruning.recipe import AMP_MODES, SCHEDULES, TrainRecipe  # noqa: F401 - re-exported: the recipe trains here


@dataclass(frozen=True)
class EpochReport:
    """What one epoch did. ``epoch`` is its 0-based index, so ``epoch + 1`` epochs are done."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    val_loss: float
    seconds: float
    val_seconds: float = 0.0  # of ``seconds``, the validation pass's


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's on every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffling, augmentation and dropout, derived from the run's seed."""
    return int(np.random.SeedSequence([seed % 2**32, epoch]).generate_state(1)[0])


def autocast(device: str | torch.device, amp: str = "none"):
    """The context of a forward pass: bfloat16 autocast on ``device``'s type for ``amp="bf16"``, else none."""
    if amp not in AMP_MODES:
        raise UserError(f"unknown amp {amp!r}; choose one of: {', '.join(AMP_MODES)}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16")


def model_input(inputs: torch.Tensor, device: str | torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch on ``device`` (a no-op for device-resident data), NHWC in memory for ``channels_last``."""
    if channels_last and inputs.dim() == 4:
        return inputs.to(device, memory_format=torch.channels_last)
    return inputs.to(device)


def _training_batches(n_samples: int, batch_size: int) -> tuple[bool, int]:
    """Whether training drops the last partial batch, and the batches per epoch that follow.

    The last partial batch is dropped (a batch of one breaks BatchNorm after pooling) unless it is
    the only batch.
    """
    drop_last = n_samples > batch_size
    batches = n_samples // batch_size if drop_last else math.ceil(n_samples / batch_size)
    return drop_last, batches


class Trainer:
    """Trains ``model`` on ``splits`` with ``recipe`` one epoch at a time, resumably.

    The batches are made where the splits' images are: pass ``splits.on_device(device)`` to make
    them on a GPU (``pruning.data``); the same batches either way.

    ``state_dict()`` after any epoch, loaded into a new Trainer (same model architecture, splits,
    recipe and seed), continues exactly where the first left off.
    """

    def __init__(
        self,
        model: nn.Module,
        splits: Splits,
        recipe: TrainRecipe,
        *,
        seed: int,
        device: str | torch.device = "cpu",
        distillation: Distillation | None = None,
        amp: str = "none",
        channels_last: bool = False,
    ) -> None:
        autocast(device, amp)  # refuses an unknown amp before anything runs
        self.model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
        self.distillation = distillation.to(device) if distillation is not None else None
        self.splits = splits
        self.recipe = recipe
        self.seed = seed
        self.device = torch.device(device)
        self.amp, self.channels_last = amp, channels_last
        self.epochs_done = 0
        self.optimizer = torch.optim.SGD(
            model.parameters(),
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            nesterov=recipe.nesterov,
        )

    def run_epoch(self, epoch: int) -> EpochReport:
        """Train 0-based ``epoch``, then evaluate on the validation split.

        Seeds torch's global generator for the epoch (dropout draws from it), so a resumed run
        draws what an uninterrupted one would.
        """
        if not 0 <= epoch < self.recipe.epochs:
            raise UserError(
                f"epoch {epoch} is outside the recipe's {self.recipe.epochs} epochs; check start_epoch"
            )
        started = time.perf_counter()
        drop_last, batches = _training_batches(len(self.splits.train), self.recipe.batch_size)
        loader = make_loader(
            self.splits.train,
            self.recipe.batch_size,
            shuffle=True,
            seed=epoch_seed(self.seed, epoch),
            augment=self.splits.info.augment,
            drop_last=drop_last,
        )
        torch.manual_seed(epoch_seed(self.seed, epoch))  # dropout and any other global-RNG draw
        self.model.train()
        # Summed on the device in float64, as Python would sum loss.item() * n: read once, at the end.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        for index, (inputs, targets) in enumerate(loader):
            for group in self.optimizer.param_groups:
                group["lr"] = self.recipe.learning_rate(epoch, min(index / batches, 1.0))
            targets = targets.to(self.device)
            loss, hits = self._step(model_input(inputs, self.device, self.channels_last), targets)
            loss_sum += loss.double() * len(targets)
            correct += hits
            seen += len(targets)
        loss_sum, correct = float(loss_sum), int(correct)
        self.epochs_done = epoch + 1
        validating = time.perf_counter()
        val_accuracy, val_loss = evaluate(self.model, self.splits.val, device=self.device, amp=self.amp,
                                          channels_last=self.channels_last)
        return EpochReport(
            epoch=epoch,
            train_loss=loss_sum / max(seen, 1),
            train_accuracy=correct / max(seen, 1),
            val_accuracy=val_accuracy,
            val_loss=val_loss,
            seconds=time.perf_counter() - started,
            val_seconds=time.perf_counter() - validating,
        )

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step; returns the batch's mean loss and its number of correct predictions, as
        tensors on the device (reading them would wait for the step)."""
        with autocast(self.device, self.amp):
            logits = self.model(inputs)
            if self.distillation is not None:  # against the teacher's softened logits (pruning/distill.py)
                loss = self.distillation.loss(logits, inputs, targets)
            else:
                loss = F.cross_entropy(logits, targets, label_smoothing=self.recipe.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.argmax(dim=1) == targets).sum()

    def remaining_epochs(self) -> Iterator[EpochReport]:
        """Run the epochs not yet done, yielding each report (checkpoint between them)."""
        for epoch in range(self.epochs_done, self.recipe.epochs):
            yield self.run_epoch(epoch)

    def state_dict(self) -> dict:
        """Model, optimizer and progress: all a resume needs (the schedule follows the epoch)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epochs_done": self.epochs_done,
            "recipe_key": self.recipe.key(),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` taken with the same recipe and seed."""
        if state["recipe_key"] != self.recipe.key() or state["seed"] != self.seed:
            raise UserError("the checkpoint was taken with another recipe or seed; resume with the same ones")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epochs_done = int(state["epochs_done"])


def train(
    model: nn.Module,
    splits: Splits,
    recipe: TrainRecipe,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[EpochReport], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
) -> list[EpochReport]:
    """Train ``model`` in place for the recipe's epochs from ``start_epoch``; a report per epoch.

    To resume after epoch k, pass the model with its weights from then, ``start_epoch=k`` and the
    optimizer's state from then: the schedule and the batches continue as if never stopped.
    """
    if not 0 <= start_epoch <= recipe.epochs:
        raise UserError(
            f"start_epoch {start_epoch} is outside 0..{recipe.epochs}; resume from a matching checkpoint"
        )
    trainer = Trainer(model, splits, recipe, seed=seed, device=device)
    trainer.epochs_done = start_epoch
    if optimizer_state is not None:
        trainer.optimizer.load_state_dict(optimizer_state)
    reports = []
    for report in trainer.remaining_epochs():
        reports.append(report)
        if on_epoch is not None:
            on_epoch(report)
    return reports


def evaluate(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu",
    amp: str = "none", channels_last: bool = False,
) -> tuple[float, float]:
    """Accuracy in [0, 1] and mean cross-entropy of ``model`` on ``dataset``, in eval mode.

    ``amp`` and ``channels_last`` apply to the forward passes and the inputs (the model's own memory
    format is its owner's, e.g. the :class:`Trainer`'s). The model's train/eval flags are restored
    afterwards.
    """
    if len(dataset) == 0:
        raise UserError("cannot evaluate on an empty dataset; use a larger data_fraction or val_fraction")
    flags = {module: module.training for module in model.modules()}
    model.eval()
    # Summed on the device in float64, as Python would sum the batches' .item(): read once, at the end.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    try:
        with torch.no_grad():
            for inputs, targets in make_loader(dataset, batch_size, shuffle=False):
                inputs, targets = model_input(inputs, device, channels_last), targets.to(device)
                with autocast(device, amp):
                    logits = model(inputs)
                    loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
                correct += (logits.argmax(dim=1) == targets).sum()
                seen += len(targets)
    finally:
        for module, training in flags.items():
            module.training = training
    return int(correct) / seen, float(loss_sum) / seen


def recalibrate_bn(
    model: nn.Module,
    dataset: Dataset,
    *,
    batches: int = 20,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: str = "none",
    amp: str = "none",
    channels_last: bool = False,
) -> None:
    """Re-estimate every BatchNorm's running statistics from ``batches`` batches of ``dataset``.

    Pruning changes what each BatchNorm sees, and its stale statistics alone can drop a pruned
    model to chance. The statistics are reset and re-averaged cumulatively (momentum None) over
    the batches, without gradients and with only the BatchNorms in train mode (dropout stays
    off, as at test time); momentum and train/eval flags are restored afterwards.
    """
    if batches < 1:
        raise UserError(f"recalibrating BatchNorm needs batches >= 1, got {batches}; pass e.g. 20")
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return
    flags = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in norms}
    model.eval()
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        with torch.no_grad():
            loader = make_loader(dataset, batch_size, shuffle=True, seed=seed, augment=augment)
            for index, (inputs, _) in enumerate(loader):
                if index == batches:
                    break
                with autocast(device, amp):
                    model(model_input(inputs, device, channels_last))
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in flags.items():
            module.training = training


def dataset_cache_key(name: str, image_size: int, data_fraction: float, val_fraction: float,
                      data_root: str | Path | None) -> str:
    """Names the training data in a cache file: dataset, image size, fractions (and data root).

    The one spelling of it: ``prunetune prune`` and ``prunetune run`` share a base model exactly
    when they train on the same data, so neither trains it again.
    """
    from prunetune.pruning.user_models import is_reference, reference_key

    if is_reference(name):  # the user's dataset factory: a key of its reference (and file)
        name = reference_key(name, None)
    key = f"{name}-{image_size}px-f{data_fraction:g}-v{val_fraction:g}"
    if data_root is not None:
        key += "-" + hashlib.sha1(str(Path(data_root).expanduser().resolve()).encode()).hexdigest()[:8]
    return key


def pretrain_path(
    model_name: str, dataset_key: str, recipe: TrainRecipe, seed: int, cache_dir: str | Path,
    model_args: dict | None = None,
) -> Path:
    """Where :func:`pretrain` caches ``model_name`` trained on ``dataset_key`` (:func:`dataset_cache_key`)
    with ``recipe`` and ``seed`` (a user's model is named by a key of its reference, arguments and file)."""
    from prunetune.pruning.user_models import is_reference, reference_key

    name = reference_key(model_name, model_args) if is_reference(model_name) else model_name
    return Path(cache_dir) / f"{name}-{dataset_key}-{recipe.key()}-s{seed}.pt"


def _save_atomically(payload: dict, path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, device: str | torch.device) -> tuple[nn.Module, dict]:
    """The model and metrics of a :func:`pretrain` cache file; UserError if it cannot be used."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = create_model(
            payload["model_name"], num_classes=payload["num_classes"], in_channels=payload["in_channels"],
            model_args=payload.get("model_args") or None,
        )
        model.load_state_dict(payload["state_dict"])
        metrics = dict(payload["metrics"])
    except Exception as error:
        raise UserError(
            f"cached model {path} is unreadable ({type(error).__name__}); delete it to retrain"
        ) from error
    return model.to(device).eval(), metrics


def pretrain(
    model_name: str,
    splits: Splits,
    recipe: TrainRecipe,
    *,
    seed: int,
    cache_dir: str | Path,
    dataset_key: str,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[EpochReport], None] | None = None,
    model_args: dict | None = None,
) -> tuple[nn.Module, dict]:
    """The base model trained with ``recipe`` and ``seed``, and its val/test metrics, cached on disk.

    The cache file is named by model, dataset, recipe and seed, so a second call with the same
    ones loads it and trains nothing. Returns the model in eval mode on ``device`` and
    ``{"val_accuracy", "test_accuracy", "val_loss"}``.
    """
    path = pretrain_path(model_name, dataset_key, recipe, seed, cache_dir, model_args)
    if path.exists():
        return _load_cached(path, device)
    info = splits.info
    splits = splits.on_device(device)  # batches made on a GPU where the data fits there (pruning.data)
    seed_everything(seed)  # the initial weights follow the seed too
    model = create_model(model_name, num_classes=info.num_classes, in_channels=info.in_channels,
                         model_args=model_args)
    train(model, splits, recipe, seed=seed, device=device, on_epoch=on_epoch)
    val_accuracy, val_loss = evaluate(model, splits.val, device=device)
    test_accuracy, _ = evaluate(model, splits.test, device=device)
    metrics = {"val_accuracy": val_accuracy, "test_accuracy": test_accuracy, "val_loss": val_loss}
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    _save_atomically(
        {
            "model_name": model_name,
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "model_args": dict(model_args or {}),
            "state_dict": state,
            "metrics": metrics,
            "recipe": asdict(recipe),
        },
        path,
    )
    return model.eval(), metrics
