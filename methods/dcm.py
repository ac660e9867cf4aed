"""DCM: remaining-ratio optimisation with dynamic channel masking and alternating updates.

Li, Fan, Pan, Zhang. arXiv:2010.12021 (2020). Known from the paper: a searchable remaining ratio
per layer, a dynamic masking process, alternating optimisation of weights and channel numbers, and
a loss trading accuracy against the FLOPs ratio. The rest is our design (METHODS.md, DCM):

- Ratios: ``r_l = r_min + (1 - r_min) * sigmoid(theta_l)`` (``keep_ratios``), one per group,
  starting at ``start_keep_ratio`` or, by default, all equal where MACs(r) meets the loss target
  (``uniform_start``), so that a short learning budget is spent on moving channels between groups.
- Dynamic mask: channels ranked by a criterion (``bn_scale`` by default), re-ranked every
  ``rank_every`` weight steps; ``m_lc = sigmoid((r_l C_l - rank_lc + 0.5) / T)`` with T annealed
  geometrically from ``temperature_start`` to ``temperature_end`` (methods/channel_mask.py).
- Loss: ``CE + lambda * (MACs(r) / MACs_0 - t)^2`` (``penalty``), MACs(r) differentiable
  (methods/macs_term.py); ``one_sided`` penalises only the excess. t is the search's MACs target
  less ``target_margin``.
- Alternation: ``k`` SGD steps on the weights with r fixed, then one SGD step on theta with the
  weights fixed, on a held-out part of the training split (``alternate``). Plain SGD, so the step
  follows the gradient and lambda sets how hard the MACs term pulls (Adam's normalised steps move
  the ratios as far with lambda 0 as with lambda large); each theta gradient is clipped to
  ``THETA_STEP_LIMIT`` and its learning rate decays by cosine (``ratio_learning_rate``), so a large
  lambda cannot throw the ratios about and they settle by the end.
- Result: r rounded to channel counts; if that is over the target, every ratio moves towards its
  floor by the smallest common fraction that meets it (``policy_meeting_target``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.methods.batch_stream import BatchStream
from prunetune.methods.channel_mask import ChannelMasks
from prunetune.methods.dcm_options import DcmOptions
from prunetune.methods.learner import (
    LearnData,
    Learned,
    Learner,
    LearnProgress,
    LearnReport,
)
from prunetune.methods.macs_term import MacsTerm
from prunetune.pruning.errors import UserError
from prunetune.pruning.policy import Policy
from prunetune.pruning.space import SearchSpace

HARD_TEMPERATURE = 1e-4  # evaluation and the final policy use the hard mask
THETA_STEP_LIMIT = 1.0  # |d loss / d theta_l| is clipped here: a ratio step moves theta_l by at most ratio_lr


def floors(space: SearchSpace, floor: float) -> torch.Tensor:
    """r_min per group: the option's floor, or the group's minimum channels if that is more."""
    return torch.tensor([max(floor, g.min_channels / g.channels) for g in space.groups])


def keep_ratios(theta: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """``r_l = r_min + (1 - r_min) * sigmoid(theta_l)`` (METHODS.md, DCM: Ratios)."""
    return floor + (1 - floor) * torch.sigmoid(theta)


def initial_theta(floor: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """theta such that the keep ratios start at ``start`` (kept a little inside (floor, 1))."""
    fraction = ((start - floor) / (1 - floor)).clamp(0.05, 0.95)
    return torch.log(fraction / (1 - fraction))


def uniform_start(macs: MacsTerm, floor: torch.Tensor, target: float) -> torch.Tensor:
    """Keep ratios ``max(floor_l, u)`` with u found by bisection so that MACs(r) / MACs_0 = ``target``."""
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if float(macs.ratio(torch.maximum(floor, torch.full_like(floor, middle)))) <= target:
            low = middle
        else:
            high = middle
    return torch.maximum(floor, torch.full_like(floor, low))


def temperature(step: int, total: int, start: float, end: float) -> float:
    """Geometric annealing from ``start`` at step 0 to ``end`` at the last step."""
    return start * (end / start) ** (step / max(total - 1, 1))


def ratio_learning_rate(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` towards 0 over the learning: a large lambda's steps, which overshoot
    the target by up to ``base`` in theta, shrink, so the ratios settle instead of oscillating."""
    return 0.5 * base * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def macs_penalty(macs_ratio: torch.Tensor, target: float, kind: str) -> torch.Tensor:
    """``(MACs(r)/MACs_0 - t)^2``; ``one_sided`` only above t (METHODS.md, DCM: Loss)."""
    gap = macs_ratio - target
    return (gap.clamp_min(0.0) if kind == "one_sided" else gap).pow(2)


def rounded_policy(space: SearchSpace, ratios: torch.Tensor) -> Policy:
    """Each group keeps ``round(r_l * C_l)`` channels (to its rounding unit, within its limits)."""
    keep = {}
    for g, r in zip(space.groups, ratios.tolist(), strict=True):
        kept = round(r * g.channels / g.round_to) * g.round_to
        keep[g.name] = max(g.min_channels, min(g.channels, kept)) / g.channels
    return Policy(keep, (), space.space_id)


def policy_meeting_target(space: SearchSpace, ratios: torch.Tensor, floor: torch.Tensor, target: float) -> Policy:
    """The rounded policy of ``ratios``; if over ``target``, ``floor + s (r - floor)`` for the
    largest s in [0, 1] whose rounded policy meets it (bisection: MACs grow with s)."""
    policy = rounded_policy(space, ratios)
    if space.macs_ratio(policy) <= target:
        return policy
    low, high = 0.0, 1.0
    if space.macs_ratio(rounded_policy(space, floor)) > target:
        raise UserError(f"every group at its dcm floor keeps more than {target:g} of the MACs; lower dcm.floor")
    for _ in range(40):
        middle = (low + high) / 2
        if space.macs_ratio(rounded_policy(space, floor + middle * (ratios - floor))) <= target:
            low = middle
        else:
            high = middle
    return rounded_policy(space, floor + low * (ratios - floor))


def split_held_out(dataset, fraction: float, seed: int):
    """(weight part, held-out part) of the training split: a seeded, disjoint split."""
    size = len(dataset)
    held = max(1, min(size - 1, round(size * fraction)))
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    if hasattr(dataset, "subset"):
        return dataset.subset(order[held:]), dataset.subset(order[:held])
    from torch.utils.data import Subset

    return Subset(dataset, order[held:].tolist()), Subset(dataset, order[:held].tolist())


class DcmLearner(Learner):
    """DCM as a learner (see the module doc); ``learn`` runs ``alternate`` and reports progress."""

    name = "dcm"

    def check(self, space: SearchSpace, target: float) -> None:
        lowest = target - self.options.target_margin_max
        floor_ratio = space.macs_ratio(rounded_policy(space, floors(space, self.options.floor)))
        if floor_ratio > target:
            raise UserError(f"with every group at dcm.floor {self.options.floor:g} the model keeps "
                            f"{floor_ratio:.3f} of its MACs, over the target {target:g}; raise --macs-target "
                            f"to at least {floor_ratio:.3f}, or lower --set dcm.floor")
        if lowest <= 0:
            raise UserError(f"dcm.target_margin_max {self.options.target_margin_max:g} leaves no MACs target "
                            f"below {target:g}; lower it")

    def run(self, model: nn.Module, data: LearnData, target: float, hparams: dict, report: LearnReport, *,
            state: Mapping | None = None) -> Learned:
        run = DcmRun(self.options, model, data, hparams, target)
        try:
            if state is not None:
                run.load_state_dict(state)
            return run.alternate(report, resumed=state is not None)
        finally:
            run.masks.remove()


class DcmRun:
    """One learning run: the model with its masks, theta, both optimisers and the two batch streams."""

    def __init__(self, options: DcmOptions, model: nn.Module, data: LearnData, hp: dict, target: float):
        from prunetune.pruning.train import epoch_seed

        self.options, self.data, self.hp, self.target = options, data, hp, target
        self.loss_target = target - hp["target_margin"]
        device = data.device
        self.model = model.to(device)
        weight_part, held_part = split_held_out(data.train, options.held_out_fraction, data.seed)
        augment = data.augment if hasattr(weight_part, "subset") else "none"
        self.weights = BatchStream(weight_part, data.recipe.batch_size, seed=epoch_seed(data.seed, 1),
                                   augment=augment, device=device)
        self.held_out = BatchStream(held_part, data.recipe.batch_size, seed=epoch_seed(data.seed, 2),
                                    device=device)
        self.total_steps = options.epochs * self.weights.per_epoch
        self.masks = ChannelMasks(self.model, data.space, options.criterion)
        self.macs = MacsTerm(data.space).to(device)
        self.floor = floors(data.space, options.floor).to(device)
        if options.start_keep_ratio is None:
            start = uniform_start(self.macs, self.floor, self.loss_target)
        else:
            start = torch.full_like(self.floor, options.start_keep_ratio)
        self.theta = nn.Parameter(initial_theta(self.floor, start))
        recipe = data.recipe
        self.weight_optimizer = torch.optim.SGD(self.model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                                weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
        self.ratio_optimizer = torch.optim.SGD([self.theta], lr=options.ratio_lr)
        self.step, self.reranks, self.seconds = 0, 0, 0.0
        self.trajectory: list[dict] = []

    def ratios(self) -> torch.Tensor:
        return keep_ratios(self.theta, self.floor)

    def alternate(self, report: LearnReport, *, resumed: bool) -> Learned:
        """k weight steps with r fixed, then one ratio step with the weights fixed (METHODS.md, DCM)."""
        started, ran = time.perf_counter(), 0
        k, every = self.hp["k"], self.options.checkpoint_every
        while self.step < self.total_steps:
            x, y = self.weights.next()
            if self.step % self.options.rank_every == 0:
                self.masks.rerank([(x, y)])
                self.reranks += 1
            self.weight_step(x, y)
            ran += 1
            if self.step % k == 0 or self.step == self.total_steps:
                self.ratio_step()
            if self.step % every == 0 and self.step < self.total_steps:
                self.seconds += time.perf_counter() - started
                started = time.perf_counter()
                report(self.progress(), self.state_dict())
        self.seconds += time.perf_counter() - started
        learned = self.result()
        if not resumed or ran:
            report(self.progress(), self.state_dict())
        return learned

    def temperature(self) -> float:
        return temperature(self.step, self.total_steps, self.hp["temperature_start"], self.hp["temperature_end"])

    def weight_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One SGD step on the weights under the masks of the current, fixed ratios."""
        from prunetune.pruning.train import epoch_seed

        self.masks.set(self.ratios().detach(), self.temperature())
        self.model.train()
        torch.manual_seed(epoch_seed(self.data.seed, 1000 + self.step))  # dropout, resumably
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.data.recipe.label_smoothing)
        self.weight_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.weight_optimizer.step()
        self.step += 1

    def ratio_step(self) -> None:
        """One SGD step on theta, weights fixed, on a held-out batch: CE + lambda * MACs penalty."""
        x, y = self.held_out.next()
        ratios = self.ratios()
        temperature_now = self.temperature()
        masks = self.masks.set(ratios, temperature_now)
        self.model.train()
        cross_entropy = F.cross_entropy(self.model(x), y)
        macs_ratio = self.macs.ratio(ratios)
        penalty = macs_penalty(macs_ratio, self.loss_target, self.options.penalty)
        loss = cross_entropy + self.hp["lambda"] * penalty
        (gradient,) = torch.autograd.grad(loss, [self.theta])  # no weight gradients: weights are fixed
        self.ratio_optimizer.zero_grad(set_to_none=True)
        self.theta.grad = gradient.clamp(-THETA_STEP_LIMIT, THETA_STEP_LIMIT)
        for group in self.ratio_optimizer.param_groups:
            group["lr"] = ratio_learning_rate(self.options.ratio_lr, self.step, self.total_steps)
        self.ratio_optimizer.step()
        softness = torch.cat([2 * torch.minimum(m, 1 - m).detach().flatten() for m in masks]).mean()
        after = self.ratios().detach()  # the row: this step's losses, and where the ratios went
        row = {"step": self.step, "cross_entropy": cross_entropy.item(), "penalty": penalty.item(),
               "macs_ratio": float(self.macs.ratio(after)), "temperature": temperature_now,
               "mask_softness": float(softness)}
        row.update({f"keep.{g.name}": float(r) for g, r in zip(self.data.space.groups, after, strict=True)})
        self.trajectory.append(row)

    def progress(self) -> LearnProgress:
        """Learning progress with the hard-masked model's validation accuracy (reported, never used)."""
        from prunetune.pruning.train import evaluate

        ratios = self.ratios().detach()
        self.masks.set(ratios, HARD_TEMPERATURE)
        val_accuracy, val_loss = evaluate(self.model, self.data.val, device=self.data.device)
        metrics = {"val_accuracy": val_accuracy, "val_loss": val_loss,
                   "macs_ratio": float(self.macs.ratio(ratios)), "learn_temperature": self.temperature(),
                   "learn_reranks": self.reranks, "learn_seconds": self.seconds}
        metrics.update({f"keep.{g.name}": float(r) for g, r in zip(self.data.space.groups, ratios, strict=True)})
        return LearnProgress(self.step, self.total_steps, metrics)

    def result(self) -> Learned:
        ratios = self.ratios().detach().cpu()
        policy = policy_meeting_target(self.data.space, ratios, self.floor.cpu(), self.target)
        info = {"learned_macs_ratio": float(self.macs.ratio(ratios.to(self.floor.device))),
                "loss_target": self.loss_target, "steps": self.step, "reranks": self.reranks,
                "seconds": self.seconds}
        return Learned(policy, tuple(self.trajectory), info)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: tensors and plain data (``weights_only`` loads it)."""
        return {
            "step": self.step, "reranks": self.reranks, "seconds": self.seconds,
            "theta": self.theta.detach().clone(), "model": self.model.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "ratio_optimizer": self.ratio_optimizer.state_dict(),
            "ranks": [r.clone() for r in self.masks.ranks], "held_out_position": self.held_out.position,
            "trajectory": list(self.trajectory),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if not 0 <= int(state["step"]) <= self.total_steps:  # the header is Learner.learn's to check
            raise UserError("the learning checkpoint was taken with other hyperparameters or options; "
                            "resume with the ones it started with")
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            self.theta.copy_(state["theta"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.ratio_optimizer.load_state_dict(state["ratio_optimizer"])
        self.masks.ranks = [r.to(self.floor.device) for r in state["ranks"]]
        self.step, self.reranks = int(state["step"]), int(state["reranks"])
        self.seconds = float(state["seconds"])
        self.weights.seek(self.step)
        self.held_out.seek(int(state["held_out_position"]))
        self.trajectory = [dict(row) for row in state["trajectory"]]


def make_dcm_learner(options: DcmOptions) -> DcmLearner:
    return DcmLearner(options)

