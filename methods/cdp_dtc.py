"""CDP + DTC: a texture-distribution penalty on filter skeletons, pruned by per-filter dynamic thresholds.

Li, Wang, Wu, Kang. *AI Communications* 36(4) (2023) 311-323, after "Pruning Filter in Filter"
(SWP, NeurIPS 2020). METHODS.md (CDP + DTC) describes it; this is our own implementation:

- Filter skeleton (``Skeleton``): every convolution whose output channels belong to a group of the
  space computes with ``W * FS_n``, FS (N x K x K) a learnable skeleton initialised to 1, through
  ``torch.nn.utils.parametrize`` (``attach_skeletons``), so the weights W and the skeletons train
  together and ``fold_skeletons`` writes ``W * FS`` back into an ordinary ``weight``.
- CDP penalty (``CdpPenalty``), each term weighted, any weight 0 (METHODS.md, CDP penalty):
  ``similarity * sum_l S(W_l) + similarity_skeleton * sum_l S(FS_l) + group * sum_l G(FS_l)
  + frobenius * sum_l ||FS_l||_F + sum_l (a_G,l * G(FS_l) + a_1,l * ||FS_l||_1)`` with the angular
  similarity ``S(X) = sum_n 1 - arccos(cos(X_n, mean_m X_m)) / pi`` (``angular_similarity``) and the
  group term ``G(FS) = sqrt(sum_n ||FS_n||_1^2)`` (``group_term``). The adaptive pair
  (``AdaptiveWeights``) keeps every layer's skeleton similarity of the previous step: when it rose,
  filters grow alike, so the group term (whole filters) gets ``adaptive * (1 + spread)`` and the L1
  term (stripes) ``adaptive * (1 - spread)``; when it fell they trade places; unchanged keeps the
  last assignment; before any change both get ``adaptive``. The sum stays ``2 * adaptive``, the
  public code's constant ``2 * prop * ||FS||_1``, which rebuilds this state every batch.
- DTC (``apply_dtc``), after each backward pass and before the optimiser steps: per filter
  ``tau_n = delta * mean_m(||FS_m||_1) / ||FS_n||_1`` (``dtc_thresholds``); entries with
  ``|FS| <= tau_n`` are zeroed with their gradients and momentum, so they stay zero; a filter with no
  entry left (dead) has its following BatchNorm's scale and shift zeroed the same way, so its
  channel outputs exactly 0. By default (``threshold: relative``) tau_n is measured in units of the
  layer's mean skeleton entry, which makes it blind to a layer's skeleton shrinking as a whole (see
  ``dtc_thresholds`` for why: with the formula as it is, whole layers died at once); it never
  empties a layer, so it prunes width only. ``threshold: model`` measures it in units of the mean
  entry over every layer: a layer that shrank more than the others can die whole (depth).
- Result (``survival``, ``learned_policy``): a channel of a group dies when its filter is dead in
  every convolution of the group (a residual sum adds the group's members: one live member carries
  the channel); groups with a member that has no skeleton (a Linear) never die. The policy keeps
  the surviving channels of every group (at least its ``min_channels``; the space rounds up to its
  unit) and drops every droppable block one of whose own groups (the channels living only inside
  its residual branch) has no survivor: that branch's convolution is empty, its output a constant,
  and the block is replaced by its shortcut (the constant, its last BatchNorm's shift, is lost; the
  fine-tune absorbs it). The stripe sparsity of the surviving filters (zero
  skeleton entries among them) is reported. ``remove_dead`` cuts the folded model to the policy
  with the ``texture`` criterion, which ranks dead filters last (they score 0).

The MACs reached follow from delta and the weights, not from the target: the target only bounds
what ``check`` accepts (see there), and the search keeps the trials under it (``constrained``) or
trades accuracy against MACs (``pareto``). The trial prunes the *base* model to the policy with the
search's criterion (``texture`` by default), as for every learner; the learned weights, and which
filters died, are not carried over.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from prunetune.methods.batch_stream import BatchStream
from prunetune.methods.cdp_dtc_options import CdpDtcOptions
from prunetune.methods.learner import (
    LearnData,
    Learned,
    Learner,
    LearnProgress,
    LearnReport,
)
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace

COSINE_LIMIT = 1 - 1e-6  # arccos has an infinite slope at +-1: cosines are clamped inside
CHANGE_TOLERANCE = 1e-7  # a similarity change smaller than this (relative) counts as no change
RECALIBRATION_BATCHES = 4  # BatchNorm statistics re-estimated before each progress report's evaluation


# --- the filter skeleton -----------------------------------------------------------------------


class Skeleton(nn.Module):
    """A parametrization of a conv weight: ``W -> W * FS_n`` with FS (N x K x K) initialised to 1."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        n, _, kh, kw = weight.shape
        self.skeleton = nn.Parameter(torch.ones(n, kh, kw, dtype=weight.dtype, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.skeleton[:, None]


@dataclass(frozen=True)
class SkeletonLayer:
    """A convolution with its skeleton, the BatchNorm its output feeds (if any) and its group."""

    name: str
    conv: nn.Conv2d
    norm: nn.modules.batchnorm._BatchNorm | None
    group: str

    @property
    def skeleton(self) -> nn.Parameter:
        return self.conv.parametrizations.weight[0].skeleton

    @property
    def raw_weight(self) -> nn.Parameter:
        return self.conv.parametrizations.weight.original


def following_norms(model: nn.Module, convs: Sequence[str], input_shape: tuple[int, ...]) -> dict[str, str]:
    """``{conv name: BatchNorm name}`` for every conv whose output goes straight into a BatchNorm
    (seen on one forward pass: the norm's input is the conv's output tensor)."""
    names = {module: name for name, module in model.named_modules()}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    found: dict[str, str] = {}
    wanted = set(convs)

    def keep_output(module, _inputs, output):
        if names[module] in wanted:
            outputs[id(output)] = (names[module], output)  # the tensor is kept, so its id is not reused

    def match_input(module, inputs):
        seen = outputs.get(id(inputs[0]))
        if seen is not None and seen[1] is inputs[0]:
            found.setdefault(seen[0], names[module])

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(keep_output))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            hooks.append(module.register_forward_pre_hook(match_input))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return found


def attach_skeletons(model: nn.Module, space: SearchSpace) -> list[SkeletonLayer]:
    """Give every Conv2d that is a member of a group of ``space`` a skeleton (in module order)."""
    member_of = {m: g.name for g in space.groups for m in g.members}
    convs = [name for name, module in model.named_modules()
             if isinstance(module, nn.Conv2d) and name in member_of]
    norms = following_norms(model, convs, space.input_shape)
    layers = []
    for name in convs:
        conv = model.get_submodule(name)
        parametrize.register_parametrization(conv, "weight", Skeleton(conv.weight))
        norm = model.get_submodule(norms[name]) if name in norms else None
        layers.append(SkeletonLayer(name, conv, norm, member_of[name]))
    return layers


def fold_skeletons(model: nn.Module) -> None:
    """Write ``W * FS`` into every skeleton conv's ``weight`` and remove the skeletons: the model is an
    ordinary one again and computes exactly what it computed with them."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


# --- the CDP penalty ---------------------------------------------------------------------------


def angular_similarity(x: torch.Tensor) -> torch.Tensor:
    """``sum_n 1 - arccos(cos(X_n, mean_m X_m)) / pi`` over the rows of ``x`` (one row per filter;
    METHODS.md, CDP penalty). All-zero rows (dead filters) are left out of the sum."""
    rows = x.flatten(1)
    mean = rows.mean(dim=0, keepdim=True)
    cosine = (rows * mean).sum(1) / (rows.norm(dim=1) * mean.norm(dim=1)).clamp_min(1e-12)
    similarity = 1 - torch.arccos(cosine.clamp(-COSINE_LIMIT, COSINE_LIMIT)) / math.pi
    live = (rows.detach().abs().sum(1) > 0).to(similarity.dtype)
    return (similarity * live).sum()


def filter_l1(skeleton: torch.Tensor) -> torch.Tensor:
    """``||FS_n||_1`` for every filter n (a vector of N)."""
    return skeleton.abs().flatten(1).sum(1)


def group_term(skeleton: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum_n ||FS_n||_1^2)``: the group lasso over the layer's filters (METHODS.md)."""
    return (filter_l1(skeleton).pow(2).sum() + 1e-12).sqrt()


def frobenius_term(skeleton: torch.Tensor) -> torch.Tensor:
    """``||FS||_F``."""
    return torch.linalg.vector_norm(skeleton)


class AdaptiveWeights:
    """The adaptive group + L1 term's two weights per layer, from the change of its skeleton similarity.

    ``update(similarities)`` takes this step's ``S(FS_l)`` of every layer and returns the
    ``(a_G, a_1)`` multipliers of ``adaptive``: ``(1 + spread, 1 - spread)`` where it rose since the
    previous step, swapped where it fell, unchanged where it did not move, ``(1, 1)`` at first.
    """

    def __init__(self, layers: int, spread: float):
        self.spread = spread
        self.previous = torch.full((layers,), math.nan, dtype=torch.float64)
        self.direction = torch.zeros(layers, dtype=torch.float64)  # +1 rose, -1 fell, 0 not yet known

    def update(self, similarities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        now = similarities.detach().to(torch.float64).cpu()
        change = now - self.previous
        moved = torch.isfinite(change) & (change.abs() > CHANGE_TOLERANCE * now.abs().clamp_min(1.0))
        self.direction = torch.where(moved, torch.sign(change), self.direction)
        self.previous = now
        return 1 + self.spread * self.direction, 1 - self.spread * self.direction

    def state_dict(self) -> dict:
        return {"previous": self.previous.clone(), "direction": self.direction.clone()}

    def load_state_dict(self, state: Mapping) -> None:
        self.previous = state["previous"].to(torch.float64).cpu().clone()
        self.direction = state["direction"].to(torch.float64).cpu().clone()


class CdpPenalty:
    """The weighted CDP penalty of the module doc over ``layers``; ``last`` holds its parts' values."""

    def __init__(self, layers: Sequence[SkeletonLayer], hp: Mapping[str, float], spread: float):
        self.layers, self.hp = list(layers), dict(hp)
        self.adaptive = AdaptiveWeights(len(self.layers), spread)
        self.last: dict[str, float] = {}

    def __call__(self) -> torch.Tensor:
        hp = self.hp
        skeletons = [layer.skeleton for layer in self.layers]
        similarity_skeleton = torch.stack([angular_similarity(s) for s in skeletons])
        groups = torch.stack([group_term(s) for s in skeletons])
        l1 = torch.stack([s.abs().sum() for s in skeletons])
        a_group, a_l1 = (w.to(groups) for w in self.adaptive.update(similarity_skeleton))
        parts = {
            "similarity": hp["similarity"] * sum(angular_similarity(layer.raw_weight) for layer in self.layers)
            if hp["similarity"] else groups.new_zeros(()),
            "similarity_skeleton": hp["similarity_skeleton"] * similarity_skeleton.sum(),
            "group": hp["group"] * groups.sum(),
            "frobenius": hp["frobenius"] * torch.stack([frobenius_term(s) for s in skeletons]).sum(),
            "adaptive": hp["adaptive"] * (a_group * groups + a_l1 * l1).sum(),
        }
        self.last = {f"penalty.{name}": float(value.detach()) for name, value in parts.items()}
        self.last["adaptive_group_share"] = float(a_group.mean() / 2)
        return sum(parts.values())


# --- DTC ---------------------------------------------------------------------------------------


def dtc_thresholds(skeleton: torch.Tensor, delta: float, *, unit: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``tau_n = delta * mean_m(||FS_m||_1) / ||FS_n||_1`` per filter (METHODS.md, DTC), times ``unit``;
    a filter with nothing left has an infinite threshold.

    ``unit`` is 1 for the formula as it is (``threshold: absolute``). A BatchNorm after the conv makes
    each filter's scale irrelevant to the loss, so nothing resists the penalties shrinking every entry
    alike, and with the absolute threshold whole layers die at once when the entries reach delta
    (measured on digits: MACs ratios of 1.0 or about 0, nothing between). ``threshold: relative``
    measures tau_n in units of the layer's mean skeleton entry (1 at the start, where all agree): an
    entry dies when it is small against its layer's, and a layer never empties while delta < 1 (its
    largest filter keeps its largest entry). ``threshold: model`` uses the mean entry over every
    layer, so a layer dies whole only when it shrank more than the others: depth can be pruned.
    """
    norms = filter_l1(skeleton.detach())
    safe = norms.clamp_min(torch.finfo(norms.dtype).tiny)
    tau = delta * norms.mean() / safe * unit
    return torch.where(norms > 0, tau, torch.full_like(norms, math.inf))


def threshold_units(layers: Sequence[SkeletonLayer], threshold: str) -> list[float | torch.Tensor]:
    """Each layer's unit of tau_n: 1 (``absolute``), its mean |FS| (``relative``) or every layer's (``model``)."""
    if threshold == "absolute":
        return [1.0] * len(layers)
    if threshold == "relative":
        return [layer.skeleton.detach().abs().mean() for layer in layers]
    entries = sum(layer.skeleton.numel() for layer in layers)
    mean = sum(layer.skeleton.detach().abs().sum() for layer in layers) / entries
    return [mean] * len(layers)


def _zero_where(parameter: torch.Tensor, keep: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Zero ``parameter`` outside ``keep``, with its gradient and every optimiser's momentum there."""
    parameter.mul_(keep)
    if parameter.grad is not None:
        parameter.grad.mul_(keep)
    for optimizer in optimizers:
        buffer = optimizer.state.get(parameter, {}).get("momentum_buffer")
        if buffer is not None:
            buffer.mul_(keep)


@torch.no_grad()
def apply_dtc(layers: Sequence[SkeletonLayer], delta: float, optimizers: Sequence[torch.optim.Optimizer], *,
              threshold: str = "absolute") -> None:
    """DTC, between backward and the optimiser steps: entries with ``|FS| <= tau_n`` are zeroed with
    their gradients (and momentum), and a dead filter's following BatchNorm scale and shift too
    (``threshold``: the unit of tau_n, see ``dtc_thresholds``)."""
    for layer, unit in zip(layers, threshold_units(layers, threshold), strict=True):
        skeleton = layer.skeleton
        tau = dtc_thresholds(skeleton, delta, unit=unit)
        keep = (skeleton.abs() > tau[:, None, None]).to(skeleton.dtype)
        _zero_where(skeleton, keep, optimizers)
        norm = layer.norm
        if norm is not None and norm.affine:
            live = (keep.flatten(1).sum(1) > 0).to(norm.weight.dtype)
            _zero_where(norm.weight, live, optimizers)
            _zero_where(norm.bias, live, optimizers)


# --- the result --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Survival:
    """What survives: live filters per skeleton conv, live channels per group, the empty blocks."""

    live_filters: Mapping[str, torch.Tensor]  # conv name -> bool per filter
    live_entries: Mapping[str, int]  # conv name -> nonzero skeleton entries
    entries: Mapping[str, int]  # conv name -> all skeleton entries (N * K * K)
    live_channels: Mapping[str, int]  # group name -> channels alive in at least one member
    empty_blocks: tuple[str, ...]

    def filters_fraction(self, conv: str) -> float:
        return float(self.live_filters[conv].float().mean())

    def stripes_fraction(self, conv: str) -> float:
        return self.live_entries[conv] / self.entries[conv]

    def stripe_sparsity(self) -> float:
        """Zero skeleton entries (stripes of W) among the surviving filters, over all layers."""
        live_total = sum(int(alive.sum()) * self.entries[c] // len(alive) for c, alive in self.live_filters.items())
        return 1 - sum(self.live_entries.values()) / live_total if live_total else 0.0


def survival(space: SearchSpace, layers: Sequence[SkeletonLayer], carried: Sequence[str] = ()) -> Survival:
    """Live filters and stripes from the skeletons, and the groups' live channels (see the module doc).

    ``carried`` names the groups with a member that has no skeleton (a Linear): they never die."""
    live_filters = {layer.name: filter_l1(layer.skeleton.detach()).cpu() > 0 for layer in layers}
    live_entries = {layer.name: int((layer.skeleton.detach() != 0).sum()) for layer in layers}
    entries = {layer.name: layer.skeleton.numel() for layer in layers}
    by_group: dict[str, list[torch.Tensor]] = {}
    for layer in layers:
        by_group.setdefault(layer.group, []).append(live_filters[layer.name])
    live_channels = {}
    for g in space.groups:
        members = by_group.get(g.name, [])
        if members and g.name not in carried and all(len(m) == g.channels for m in members):
            live_channels[g.name] = int(torch.stack(members).any(0).sum())
        else:
            live_channels[g.name] = g.channels
    empty = tuple(b for b in space.droppable_blocks
                  if any(live_channels[name] == 0 for name in space.block(b).groups))
    return Survival(live_filters, live_entries, entries, live_channels, empty)


def carried_groups(model: nn.Module, space: SearchSpace) -> tuple[str, ...]:
    """The groups with a Linear among their members: no skeleton decides their channels."""
    return tuple(g.name for g in space.groups
                 if any(isinstance(model.get_submodule(m), nn.Linear) for m in g.members))


def learned_policy(space: SearchSpace, alive: Survival) -> Policy:
    """Every group keeps its surviving channels (at least ``min_channels``); the empty blocks are dropped
    and the groups inside them left out (``SearchSpace.canonical``)."""
    dropped = alive.empty_blocks
    gone = space.omittable_groups(dropped)
    ratios = {g.name: max(g.min_channels, alive.live_channels[g.name]) / g.channels
              for g in space.groups if g.name not in gone}
    return Policy(ratios, dropped, space.space_id)


def remove_dead(model: nn.Module, space: SearchSpace, policy: Policy) -> nn.Module:
    """The folded ``model`` cut to ``policy``: its dead filters (texture 0) go first, its empty blocks
    are replaced by their shortcuts. The outputs are unchanged up to the dropped blocks' constants."""
    from prunetune.pruning.surgery import prune

    return prune(model, space, policy, "texture")


# --- the learner -------------------------------------------------------------------------------


class CdpDtcLearner(Learner):
    """CDP + DTC as a learner (see the module doc): ``learn`` trains with the penalty and DTC."""

    name = "cdp-dtc"
    meets_target = False  # its MACs follow from delta and the weights; the search keeps those under the target

    def drops_blocks(self) -> bool:
        """Whether a layer can empty, so blocks drop: not with ``threshold: relative`` and delta < 1 (the
        largest filter's largest entry is at least the layer's mean entry, above tau; ``dtc_thresholds``)."""
        return self.options.threshold != "relative" or self.options.delta_max >= 1

    def check(self, space: SearchSpace, target: float) -> None:
        """Refuse a target below the smallest MACs ratio any policy this learner can give reaches (every
        group at its minimum; every droppable block dropped too where a layer can empty,
        ``drops_blocks``): no delta can get there. Targets above it are accepted; whether a trial gets
        under one depends on what dies, and the search keeps those that do."""
        drops = self.drops_blocks()
        lowest = space.min_macs_ratio(drop_blocks=drops)
        if target < lowest:
            how = ("every droppable block dropped" if drops else
                   "no block dropped: with threshold relative and delta below 1 no layer empties")
            raise UserError(f"cdp-dtc reaches MACs ratios in [{lowest:.3f}, 1] on this model (every group at its "
                            f"minimum channels, {how}); the target {target:g} is below that: raise "
                            f"macs_target to at least {lowest:.3f}"
                            + ("" if drops else " or set cdp_dtc.threshold=model"))

    def run(self, model: nn.Module, data: LearnData, target: float, hparams: dict, report: LearnReport, *,
            state: Mapping | None = None) -> Learned:
        run = CdpDtcRun(self.options, model, data, hparams)
        if state is not None:
            run.load_state_dict(state)
        return run.train(report, resumed=state is not None)


class CdpDtcRun:
    """One learning run: the model with its skeletons, both optimisers, the penalty and the batches."""

    def __init__(self, options: CdpDtcOptions, model: nn.Module, data: LearnData, hp: dict):
        from prunetune.pruning.train import epoch_seed

        self.options, self.data, self.hp = options, data, hp
        self.model = model.to(data.device)
        self.carried = carried_groups(self.model, data.space)
        self.layers = attach_skeletons(self.model, data.space)
        if not self.layers:
            raise UserError(f"model '{data.space.model_name}' has no prunable convolution for cdp-dtc's skeletons")
        self.batches = BatchStream(data.train, data.recipe.batch_size, seed=epoch_seed(data.seed, 1),
                                   augment=data.augment, device=data.device)
        self.total_steps = options.steps  # counted in steps, so the penalties' reach is the dataset size's
        skeletons = [layer.skeleton for layer in self.layers]
        ids = {id(s) for s in skeletons}
        weights = [p for p in self.model.parameters() if id(p) not in ids]
        recipe = data.recipe
        self.weight_optimizer = torch.optim.SGD(weights, lr=recipe.lr, momentum=recipe.momentum,
                                                weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
        self.skeleton_optimizer = torch.optim.SGD(skeletons, lr=options.skeleton_lr, momentum=recipe.momentum)
        self.penalty = CdpPenalty(self.layers, hp, options.adaptive_spread)
        self.step, self.seconds = 0, 0.0
        self.trajectory: list[dict] = []

    def train(self, report: LearnReport, *, resumed: bool) -> Learned:
        started, ran = time.perf_counter(), 0
        if not self.trajectory:
            self.trajectory.append(self.row())  # step 0: everything alive
        while self.step < self.total_steps:
            self.train_step(*self.batches.next())
            ran += 1
            epoch_end = self.step % self.batches.per_epoch == 0
            checkpoint = self.step % self.options.checkpoint_every == 0
            if epoch_end or checkpoint or self.step == self.total_steps:
                self.trajectory.append(self.row())
            if checkpoint and self.step < self.total_steps:  # a report scores validation: not every short epoch
                self.seconds += time.perf_counter() - started
                started = time.perf_counter()
                report(self.progress(), self.state_dict())
        self.seconds += time.perf_counter() - started
        if not resumed or ran:
            report(self.progress(), self.state_dict())
        return self.result()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """CE + CDP penalty, backward, DTC, then one SGD step on the weights and one on the skeletons."""
        from prunetune.pruning.train import epoch_seed

        self.model.train()
        torch.manual_seed(epoch_seed(self.data.seed, 1000 + self.step))  # dropout, resumably
        cross_entropy = F.cross_entropy(self.model(x), y, label_smoothing=self.data.recipe.label_smoothing)
        loss = cross_entropy + self.penalty()
        self.weight_optimizer.zero_grad(set_to_none=True)
        self.skeleton_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        apply_dtc(self.layers, self.hp["delta"], [self.weight_optimizer, self.skeleton_optimizer],
                  threshold=self.options.threshold)
        self.weight_optimizer.step()
        self.skeleton_optimizer.step()
        self.step += 1
        self.last_loss = {"cross_entropy": float(cross_entropy.detach()), **self.penalty.last}

    def row(self) -> dict:
        """A trajectory row: live filters and stripes per conv, live channels per group, the MACs ratio."""
        space = self.data.space
        alive = survival(space, self.layers, self.carried)
        row = {"step": self.step, "epoch": self.step / self.batches.per_epoch,
               "macs_ratio": space.macs_ratio(learned_policy(space, alive)),
               "stripe_sparsity": alive.stripe_sparsity(), "dropped_blocks": len(alive.empty_blocks)}
        row.update(getattr(self, "last_loss", {}))
        row.update({f"keep.{g.name}": alive.live_channels[g.name] / g.channels for g in space.groups})
        for layer in self.layers:
            row[f"filters.{layer.name}"] = alive.filters_fraction(layer.name)
            row[f"stripes.{layer.name}"] = alive.stripes_fraction(layer.name)
        return row

    def progress(self) -> LearnProgress:
        """Learning progress with the skeleton model's validation accuracy (reported, never used), after
        re-estimating its BatchNorm statistics: the skeletons shrink faster than the running
        statistics follow, and with stale ones the model scored chance while it was at 0.97 (digits).
        Training normalises by batch statistics, so this changes nothing it learns."""
        from prunetune.pruning.train import evaluate, recalibrate_bn

        recalibrate_bn(self.model, self.data.train, batches=RECALIBRATION_BATCHES,
                       batch_size=self.data.recipe.batch_size, seed=self.data.seed, device=self.data.device)
        val_accuracy, val_loss = evaluate(self.model, self.data.val, device=self.data.device)
        last = self.trajectory[-1]
        metrics = {"val_accuracy": val_accuracy, "val_loss": val_loss, "macs_ratio": last["macs_ratio"],
                   "stripe_sparsity": last["stripe_sparsity"], "learn_seconds": self.seconds}
        metrics.update({k: v for k, v in last.items() if k.startswith("keep.")})
        return LearnProgress(self.step, self.total_steps, metrics)

    def result(self) -> Learned:
        space = self.data.space
        alive = survival(space, self.layers, self.carried)
        policy = learned_policy(space, alive)
        per_layer = {layer.name: {"filters": alive.filters_fraction(layer.name),
                                  "stripes": alive.stripes_fraction(layer.name)} for layer in self.layers}
        info = {"learned_macs_ratio": space.macs_ratio(policy), "stripe_sparsity": alive.stripe_sparsity(),
                "dropped_blocks": list(policy.dropped_blocks), "survival": per_layer,
                "steps": self.step, "seconds": self.seconds}
        fold_skeletons(self.model)  # the learned model is an ordinary one again
        return Learned(policy, tuple(self.trajectory), info)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: tensors and plain data (``weights_only`` loads it);
        ``Learner.learn`` adds the header (method, space, hyperparameters)."""
        return {
            "total_steps": self.total_steps, "step": self.step,
            "seconds": self.seconds, "model": self.model.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "skeleton_optimizer": self.skeleton_optimizer.state_dict(),
            "adaptive": self.penalty.adaptive.state_dict(), "trajectory": list(self.trajectory),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["total_steps"]) != self.total_steps:  # the header (method, space, hparams) is checked
            raise UserError("the learning checkpoint was taken with other options; "
                            "resume with the ones it started with")
        self.model.load_state_dict(state["model"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.skeleton_optimizer.load_state_dict(state["skeleton_optimizer"])
        self.penalty.adaptive.load_state_dict(state["adaptive"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        self.batches.seek(self.step)
        self.trajectory = [dict(row) for row in state["trajectory"]]
        if self.trajectory:
            self.last_loss = {k: v for k, v in self.trajectory[-1].items()
                              if k == "cross_entropy" or k.startswith("penalty.") or k == "adaptive_group_share"}


def make_cdp_dtc_learner(options: CdpDtcOptions) -> CdpDtcLearner:
    return CdpDtcLearner(options)
