"""What a model costs: MACs, parameters and latency.

MACs are the multiply-accumulates of convolution and linear layers only (activations, norms, pooling
and additions are not counted), for one sample, found by running the model once with forward hooks
so every layer is counted at the spatial size it really sees. Parameters are every parameter of the
model. Latency is measured, never inferred from MACs: on a CPU half the MACs is often far from half
the time.

Latency on a shared machine swings with its load (the same model measured 0.15 ms idle and 75 ms
under load). Two defences: on a CPU it is timed on a fixed number of torch threads (1 unless told:
a forward split over threads waits for its slowest one, which another process may hold off the
CPU for a whole time slice, and a base and a pruned model timed on different thread counts give
no ratio); and it is timed in several rounds, the figure being the *minimum of the rounds'
medians*: the round least disturbed by other work, still robust to the odd slow forward inside it.
Its spread is kept beside it (:class:`Latency`: the interquartile range of every timing, the number
of timings, the load average when measured), and :func:`latency_warning` says when the spread makes
a ratio of two latencies meaningless.
"""

import math
import os
import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prunetune.pruning.errors import UserError

SPREAD_LIMIT = 0.25  # an IQR above this fraction of the median makes a latency ratio meaningless


@dataclass(frozen=True)
class Latency:
    """A timed forward: the figure to use (``ms``) and how far to trust it.

    ``ms`` is the minimum over ``rounds`` of each round's median; ``median_ms`` and ``iqr_ms`` are
    the median and interquartile range of all ``repeats`` timings; ``load_avg`` is the machine's
    one-minute load average when measured (None where the system has none), ``cpus`` its CPU count.
    """

    ms: float
    median_ms: float
    iqr_ms: float
    repeats: int
    rounds: int
    load_avg: float | None
    cpus: int
    threads: int | None = None  # torch threads on a CPU; None on a GPU

    @property
    def spread(self) -> float:
        """The interquartile range as a fraction of the median."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def loaded(self) -> bool:
        """Whether more work was waiting for the CPUs than there are CPUs."""
        return self.load_avg is not None and self.load_avg > self.cpus

    def to_json(self) -> dict:
        return {"latency_ms": self.ms, "latency_median_ms": self.median_ms, "latency_iqr_ms": self.iqr_ms,
                "latency_repeats": self.repeats, "latency_load_avg": self.load_avg,
                "latency_threads": self.threads, "latency_cpus": self.cpus}

    @classmethod
    def from_json(cls, data: Mapping) -> "Latency | None":
        """The timing a record's ``to_json`` keys describe; None for a record without its spread."""
        if not isinstance(data.get("latency_ms"), int | float) or data.get("latency_iqr_ms") is None:
            return None
        return cls(ms=data["latency_ms"], median_ms=data.get("latency_median_ms") or data["latency_ms"],
                   iqr_ms=data["latency_iqr_ms"], repeats=int(data.get("latency_repeats") or 0), rounds=0,
                   load_avg=data.get("latency_load_avg"), cpus=int(data.get("latency_cpus") or os.cpu_count() or 1),
                   threads=data.get("latency_threads"))


def latency_warning(*latencies: Latency) -> str | None:
    """Why a comparison of these latencies cannot be trusted, or None when it can."""
    wide = [f"IQR {lat.spread:.0%} of the median" for lat in latencies if lat.spread > SPREAD_LIMIT]
    loaded = [lat for lat in latencies if lat.loaded]
    reasons = wide[:1] + ([f"load average {loaded[0].load_avg:.1f} on {loaded[0].cpus} CPUs"] if loaded else [])
    if not reasons:
        return None
    return (f"latency figures are unreliable ({', '.join(reasons)}): other work shared the CPUs, so their "
            f"ratio says little; measure again on an idle machine")


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
    latency: Latency | None = None  # the single-sample timing with its spread


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
    threads: int = 1,
) -> float:
    """Milliseconds of one forward of a ``batch_size`` batch on ``device``: :func:`time_latency`'s figure."""
    return time_latency(model, input_shape, batch_size=batch_size, warmup=warmup, repeats=repeats,
                        device=device, threads=threads).ms


def time_latency(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 20,
    rounds: int = 5,
    device: str | torch.device = "cpu",
    threads: int = 1,
) -> Latency:
    """Time ``repeats`` forwards of a ``batch_size`` batch in ``rounds`` rounds (at least 3 a round).

    Runs in eval mode without gradients after ``warmup`` untimed forwards, on ``threads`` torch
    threads on a CPU (restored afterwards). The model is moved to ``device`` for the timing and
    moved back, and its train/eval flags are restored.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0 or rounds < 1:
        raise UserError(
            f"latency needs batch_size >= 1, repeats >= 1, warmup >= 0 and rounds >= 1 (got {batch_size}, "
            f"{repeats}, {warmup}, {rounds}); fix them"
        )
    per_round = max(3, math.ceil(repeats / rounds))
    device = torch.device(device)
    home = next(model.parameters(), torch.empty(0)).device
    used_threads = max(1, int(threads)) if device.type == "cpu" else None
    previous_threads = torch.get_num_threads()
    model.to(device)
    if used_threads is not None:
        torch.set_num_threads(used_threads)
    try:
        with _eval_mode(model), torch.no_grad():
            batch = _example_input(model, input_shape, batch_size).to(device)
            for _ in range(warmup):
                model(batch)
            load = _load_average()
            medians, times_ms = [], []
            for _ in range(rounds):
                round_ms = []
                for _ in range(per_round):
                    _synchronize(device)
                    start = time.perf_counter()
                    model(batch)
                    _synchronize(device)
                    round_ms.append((time.perf_counter() - start) * 1000.0)
                medians.append(statistics.median(round_ms))
                times_ms += round_ms
            after = _load_average()
    finally:
        torch.set_num_threads(previous_threads)
        model.to(home)
    quartiles = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else [times_ms[0]] * 3
    loads = [value for value in (load, after) if value is not None]
    return Latency(ms=min(medians), median_ms=statistics.median(times_ms), iqr_ms=quartiles[2] - quartiles[0],
                   repeats=len(times_ms), rounds=rounds, load_avg=max(loads) if loads else None,
                   cpus=os.cpu_count() or 1, threads=used_threads)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def measure(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    repeats: int = 20,
    threads: int = 1,
) -> Measurement:
    """MACs, parameters, and latency of a single sample (with its spread) and of a ``batch_size`` batch,
    on ``threads`` torch threads on a CPU."""
    single = time_latency(model, input_shape, batch_size=1, repeats=repeats, device=device, threads=threads)
    return Measurement(
        macs=count_macs(model, input_shape),
        params=count_params(model),
        latency_ms=single.ms,
        latency_batch_ms=measure_latency(
            model, input_shape, batch_size=batch_size, repeats=repeats, device=device, threads=threads
        ),
        batch_size=batch_size,
        latency=single,
    )
