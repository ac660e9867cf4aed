"""What a model costs: MACs, parameters and latency.

MACs are the multiply-accumulates of convolution and linear layers only (activations, norms, pooling
and additions are not counted), for one sample, found by running the model once with forward hooks
so every layer is counted at the spatial size it really sees. Parameters are every parameter of the
model. Latency is measured, never inferred from MACs: on a CPU half the MACs is often far from half
the time.
"""

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prunetune.pruning.errors import UserError


@dataclass(frozen=True)
class Measurement:
    """The cost of one model: MACs and parameters (counts), and median latencies in milliseconds.

    ``latency_ms`` is one forward of a single sample; ``latency_batch_ms`` one forward of a batch
    of ``batch_size`` samples.
    """

    macs: int
    params: int
    latency_ms: float
    latency_batch_ms: float
    batch_size: int


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode, then give each back the train/eval flag it had."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def _example_input(model: nn.Module, input_shape: tuple[int, int, int], batch_size: int) -> torch.Tensor:
    """A zero batch on the model's own device and dtype (CPU float32 for a model without parameters)."""
    if len(input_shape) != 3 or any(int(size) < 1 for size in input_shape):
        raise UserError(
            f"input_shape {input_shape!r} is not (channels, height, width); pass three positive sizes"
        )
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    return torch.zeros((batch_size, *input_shape), device=device, dtype=dtype)


def _module_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one call of a conv or linear layer on one sample, from the size of its output.

    Conv: out_elements * (in_channels / groups) * kh * kw. Linear: out_elements * in_features.
    """
    out_elements = output.numel()
    if isinstance(module, nn.Conv2d):
        kernel_h, kernel_w = module.kernel_size
        return out_elements * (module.in_channels // module.groups) * kernel_h * kernel_w
    return out_elements * module.in_features


def layer_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    """MACs of one sample of shape ``input_shape`` per Conv2d and Linear module, by qualified name.

    Counts what a forward really runs: a module called twice counts twice, and a module never
    called is listed with 0. The model runs once in eval mode without gradients, and every
    module's train/eval flag is restored afterwards.
    """
    counted = {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.Linear)
    }
    totals = dict.fromkeys(counted, 0)

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            totals[name] += _module_macs(module, output)

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in counted.items()]
    try:
        with _eval_mode(model), torch.no_grad():
            model(_example_input(model, input_shape, batch_size=1))
    finally:
        for handle in handles:
            handle.remove()
    return totals


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Total conv and linear MACs of one sample: the sum of :func:`layer_macs`."""
    return sum(layer_macs(model, input_shape).values())


def count_params(model: nn.Module) -> int:
    """Number of parameters (every element of every parameter, trainable or not)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock reads the end of the forward and not of its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 20,
    device: str | torch.device = "cpu",
) -> float:
    """Median milliseconds of one forward of a ``batch_size`` batch on ``device``.

    Runs in eval mode without gradients after ``warmup`` untimed forwards; the median resists the
    odd slow run of a shared machine. The model is moved to ``device`` for the timing and moved
    back, and its train/eval flags are restored.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise UserError(
            f"latency needs batch_size >= 1, repeats >= 1 and warmup >= 0 (got {batch_size}, {repeats}, {warmup}); fix them"
        )
    device = torch.device(device)
    home = next(model.parameters(), torch.empty(0)).device
    model.to(device)
    try:
        with _eval_mode(model), torch.no_grad():
            batch = _example_input(model, input_shape, batch_size).to(device)
            for _ in range(warmup):
                model(batch)
            times_ms = []
            for _ in range(repeats):
                _synchronize(device)
                start = time.perf_counter()
                model(batch)
                _synchronize(device)
                times_ms.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.to(home)
    return statistics.median(times_ms)


def measure(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    repeats: int = 20,
) -> Measurement:
    """MACs, parameters, and latency of a single sample and of a ``batch_size`` batch."""
    return Measurement(
        macs=count_macs(model, input_shape),
        params=count_params(model),
        latency_ms=measure_latency(model, input_shape, batch_size=1, repeats=repeats, device=device),
        latency_batch_ms=measure_latency(
            model, input_shape, batch_size=batch_size, repeats=repeats, device=device
        ),
        batch_size=batch_size,
    )
