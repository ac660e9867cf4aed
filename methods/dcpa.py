"""DCP-A: differentiable channel pruning guided by attention, over widths and depths.

Cheng, Wang, Ma, Wei, Alsaadi, Liu. *Complex & Intelligent Systems* 9 (2023) 5611-5624. Known from
the paper: NAS-based; an attention mechanism supplies layer information to the policy;
Gumbel-softmax makes sampling differentiable; two training stages; a block with a shortcut lets it
prune width and depth. The rest is our design after TAS (Dong and Yang, NeurIPS 2019), as
METHODS.md (DCP-A) specifies it; choices, sampling and cost are in ``methods.dcpa_relaxation``, the
attention in ``methods.dcpa_attention``, the learner that joins them here:

- Choices (``width_choices``, ``depth_stages``): group l keeps ``w_lk = ceil(rho_k C_l)`` channels
  (to its rounding unit), rho from the options; a residual stage (``space.stages``) runs its first
  d blocks, 1 <= d <= n_blocks, the others skipped through their shortcut (identity, or the
  projection of a downsampling block, as ``pruning.models.drop_blocks`` replaces them).
- Attention (``LayerAttention``, ``layer_descriptors``): a descriptor per group (the quantiles of
  its channels' mean |BN output| on the batch, their spread, its MACs share, position, width) and
  per stage goes through one self-attention layer; linear heads (no bias) plus free logits give
  alpha_l over the width choices and alpha_s over the depth choices. Our additions: the free width
  logits start peaked around the uniform width meeting the loss target (``start_logits``), and the
  attention's Adam learning rate is ``attention_lr_scale`` times the free logits' (its weights are
  shared by every layer; at the full rate they moved all layers to one width).
- Sampling (``gumbel_softmax``, ``mixed_masks``, ``block_gates``):
  ``g = softmax((log_softmax(alpha) + Gumbel) / tau)``, straight-through hard when ``hard``; the mask
  of group l is ``sum_k g_k m_k``, m_k the first w_lk channels in importance order (re-ranked at
  every epoch of the weight stream); a block's gate is the sampled probability that the stage's
  depth reaches it, and the gated block computes ``gate * block(x) + (1 - gate) * skip(x)``.
- Cost (``MacsTerm`` with block gates, ``macs_loss``): E[MACs] from the expected widths and
  expected block gates, differentiable; ``L_macs = log E`` above t, ``-log E`` below ``t - tolerance``, else 0.
- Two stages (``DcpaRun.learn``): stage 1 trains the weights under uniformly sampled widths and
  depths; stage 2 alternates per batch an SGD step on the weights (one half of the training split,
  architecture sampled from the current logits) and an Adam step on the attention and logits (the
  other half); tau anneals by cosine from tau_max to tau_min over stage 2 (``cosine_temperature``).
- Result (``DcpaRun.result``): the argmax width per group and depth per stage. If that is over the
  search's MACs target, every group's ratio moves towards its smallest choice by the smallest common
  fraction that meets it, the dropped blocks kept (``fit_to_target``, DCM's rule); with
  ``fill_to_target``, one under it moves towards full width by the largest common fraction that
  still meets it (our design: the argmax rounds to coarse choices and the loss's tolerance band
  lies below the target, so the argmax alone leaves MACs unused that the baselines spend).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.methods.batch_stream import BatchStream
from prunetune.methods.channel_mask import ChannelMasks, masked_modules
from prunetune.methods.dcm import rounded_policy, split_held_out
from prunetune.methods.dcpa_attention import LayerAttention, group_descriptor, stage_descriptor
from prunetune.methods.dcpa_options import DcpaOptions
from prunetune.methods.dcpa_relaxation import (
    block_gates,
    cosine_temperature,
    depth_stages,
    gumbel_softmax,
    macs_loss,
    mixed_masks,
    prefix_masks,
    uniform_choice,
    width_choices,
)
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

# --- the learner -----------------------------------------------------------------------------------------


def fit_to_target(space: SearchSpace, ratios: torch.Tensor, floor: torch.Tensor, dropped: Sequence[str],
                  target: float, *, fill: bool = False) -> Policy:
    """The policy of ``ratios`` with ``dropped``; if over ``target``, ``floor + s (r - floor)`` for the
    largest s in [0, 1] whose rounded policy meets it (bisection: MACs grow with s), as DCM rounds.
    ``fill``: if under it, ``r + s (1 - r)`` for the largest such s instead (every group widened
    towards full width by one common fraction of what it left out; our design, as the one-shot
    baselines take the largest policy that meets the target)."""

    def rounded(keep: torch.Tensor) -> Policy:
        kept = rounded_policy(space, keep)
        return space.canonical(Policy(kept.keep_ratios, tuple(dropped), space.space_id))

    def largest(policy) -> Policy:  # the largest s in [0, 1] with policy(s) meeting the target
        low, high = 0.0, 1.0
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if space.macs_ratio(policy(middle)) <= target else (low, middle)
        return policy(low)

    argmax = rounded(ratios)
    if space.macs_ratio(argmax) <= target:
        return largest(lambda s: rounded(ratios + s * (1 - ratios))) if fill else argmax
    if space.macs_ratio(rounded(floor)) > target:
        raise UserError(f"every group at its smallest dcpa width keeps more than {target:g} of the MACs; "
                        f"lower dcpa.width_min")
    return largest(lambda s: rounded(floor + s * (ratios - floor)))


class DcpaLearner(Learner):
    """DCP-A as a learner (see the module doc); ``learn`` runs ``DcpaRun.learn``."""

    name = "dcpa"

    def check(self, space: SearchSpace, target: float) -> None:
        smallest = Policy.uniform(space, self.options.width_min)
        if space.macs_ratio(smallest) > target:
            raise UserError(f"with every group at dcpa.width_min {self.options.width_min:g} the model keeps "
                            f"{space.macs_ratio(smallest):.3f} of its MACs, over the target {target:g}; "
                            f"raise --macs-target to at least {space.macs_ratio(smallest):.3f}, or lower "
                            f"--set dcpa.width_min")
        if target - self.options.target_margin_max - self.options.tolerance <= 0:
            raise UserError(f"dcpa.target_margin_max and dcpa.tolerance leave no MACs target below {target:g}; "
                            f"lower them")

    def run(self, model: nn.Module, data: LearnData, target: float, hparams: dict, report: LearnReport, *,
            state: Mapping | None = None) -> Learned:
        run = DcpaRun(self.options, model, data, hparams, target)
        try:
            if state is not None:
                run.load_state_dict(state)
            return run.learn(report, resumed=state is not None)
        finally:
            run.remove_hooks()


class BlockGates:
    """Forward hooks on the droppable blocks: ``gate * block(x) + (1 - gate) * skip(x)`` while set,
    ``skip`` the block's shortcut as a dropped block computes it (``pruning.models.drop_blocks``:
    the identity, or ``relu(projection(x))``). ``gates`` are in ``space.droppable_blocks`` order."""

    def __init__(self, model: nn.Module, blocks: Sequence[str]):
        from prunetune.pruning.models import IDENTITY, residual_blocks

        declared = {b.name: b for b in residual_blocks(model)}
        self.gates: torch.Tensor | None = None
        self.enabled = True
        self._hooks = []
        for index, name in enumerate(blocks):
            block = declared[name]
            shortcut = None if block.shortcut == IDENTITY else model.get_submodule(block.shortcut_path)
            hook = self._hook(index, shortcut, block.activation)
            self._hooks.append(model.get_submodule(name).register_forward_hook(hook))

    def _hook(self, index: int, shortcut: nn.Module | None, activation: bool):
        def apply(module, inputs, output):
            if not self.enabled or self.gates is None:
                return output
            gate = self.gates[index].to(output.dtype)
            if not gate.requires_grad and float(gate) == 1.0:
                return output
            skip = inputs[0] if shortcut is None else shortcut(inputs[0])
            skip = F.relu(skip) if shortcut is not None and activation else skip
            return gate * output + (1 - gate) * skip

        return apply

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class DcpaRun:
    """One learning run: the model with its masks and gates, the attention, both optimisers, two streams."""

    def __init__(self, options: DcpaOptions, model: nn.Module, data: LearnData, hp: dict, target: float):
        from prunetune.pruning.train import epoch_seed

        self.options, self.data, self.hp, self.target = options, data, hp, target
        self.space = space = data.space
        self.loss_target = target - hp["target_margin"]
        device = data.device
        self.model = model.to(device)
        weight_part, arch_part = split_held_out(data.train, 0.5, data.seed)  # two halves (Two stages)
        augment = data.augment if hasattr(weight_part, "subset") else "none"
        self.weights = BatchStream(weight_part, data.recipe.batch_size, seed=epoch_seed(data.seed, 1),
                                   augment=augment, device=device)
        self.arch = BatchStream(arch_part, data.recipe.batch_size, seed=epoch_seed(data.seed, 2), device=device)
        self.per_epoch = max(self.weights.per_epoch, options.min_epoch_steps)  # a learning epoch's steps
        self.warmup_steps = hp["warmup_epochs"] * self.per_epoch
        self.total_steps = self.warmup_steps + hp["search_epochs"] * self.per_epoch
        self.rhos = options.width_ratios()
        self.widths = width_choices(space, self.rhos).to(device)
        self.channels = torch.tensor([g.channels for g in space.groups], dtype=torch.float32, device=device)
        self.stages = depth_stages(space) if options.depth else ()
        self.masks = ChannelMasks(self.model, space, options.criterion)
        self.gates = BlockGates(self.model, space.droppable_blocks)
        self._stats: list[torch.Tensor | None] = [None] * len(space.groups)
        self._stat_hooks = [masked_modules(self.model, g.members)[0].register_forward_hook(self._stat_hook(i))
                            for i, g in enumerate(space.groups)]
        self.collecting = False
        self.macs = MacsTerm(space).to(device)
        with torch.random.fork_rng(devices=[]):  # its initial weights follow the seed, not the global RNG
            torch.manual_seed(epoch_seed(data.seed, 7))
            self.attention = LayerAttention(len(space.groups), len(self.rhos), [s.choices for s in self.stages],
                                            options.attention_dim, options.attention_heads).to(device)
        with torch.no_grad():
            self.attention.depth_logits.copy_(self.start_depth_logits())
            if options.start_at_target:
                self.attention.width_logits.copy_(self.start_logits())
        recipe = data.recipe
        self.weight_optimizer = torch.optim.SGD(self.model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                                weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
        free = [self.attention.width_logits, self.attention.depth_logits]
        shared = [p for name, p in self.attention.named_parameters() if not name.endswith("_logits")]
        self.arch_optimizer = torch.optim.Adam([{"params": free, "lr": options.arch_lr},
                                                {"params": shared, "lr": options.arch_lr * options.attention_lr_scale}])
        self.prefixes: list[torch.Tensor] = []
        self.descriptors: torch.Tensor | None = None
        self.step, self.reranks, self.seconds = 0, 0, 0.0
        self.trajectory: list[dict] = []

    def start_depth_logits(self) -> torch.Tensor:
        """Free depth logits ``-full_depth_logit * (blocks the choice drops)`` (0: every depth equally
        likely): with full_depth_logit > 0, learning starts at full depth and drops a block only where
        the architecture steps move it there (our design)."""
        logits = torch.zeros_like(self.attention.depth_logits)
        for s, stage in enumerate(self.stages):
            for c in range(stage.choices):
                logits[s, c] = -self.options.full_depth_logit * (stage.choices - 1 - c)
        return logits

    def start_logits(self) -> torch.Tensor:
        """Free width logits peaked around the uniform keep ratio u at which E[MACs] (at the start
        depth distribution) meets the loss target: ``alpha_lk = -((w_lk / C_l - u) / (2 width_step))^2``,
        so stage 2 starts near the target and spends its steps moving channels between groups (the
        MACs term, identical in sign for every group, would otherwise drive them alike; our design)."""
        fractions = self.widths.to(torch.float32) / self.channels.unsqueeze(1)
        depth = F.softmax(self.attention.depth_logits.masked_fill(~self.attention.depth_valid, float("-inf")), -1)
        gates = block_gates(depth, self.stages, self.space.droppable_blocks) if self.stages else None
        low, high = 0.0, 1.0
        for _ in range(30):
            middle = (low + high) / 2
            ratios = torch.full((len(self.space.groups),), middle, device=fractions.device)
            low, high = (middle, high) if float(self.macs.ratio(ratios, gates)) <= self.loss_target else (low, middle)
        return -((fractions - low) / (2 * self.options.width_step)) ** 2

    # -- hooks and descriptors --

    def _stat_hook(self, index: int):
        def record(module, inputs, output):
            if self.collecting:
                self._stats[index] = output.detach()

        return record

    def remove_hooks(self) -> None:
        self.masks.remove()
        self.gates.remove()
        for hook in self._stat_hooks:
            hook.remove()
        self._stat_hooks = []

    def layer_descriptors(self, x: torch.Tensor) -> torch.Tensor:
        """Descriptors of every group (its BN output on batch ``x``, full model, eval mode) and stage."""
        was_training = self.model.training
        self.masks.enabled = self.gates.enabled = False
        self.collecting = True
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(x)
        finally:
            self.masks.enabled = self.gates.enabled = True
            self.collecting = False
            self.model.train(was_training)
        count = len(self.space.groups)
        rows = [group_descriptor(self._stats[i], g.macs_share, i / max(count - 1, 1), g.channels)
                for i, g in enumerate(self.space.groups)]
        for s, stage in enumerate(self.stages):
            share = sum(lc.macs for lc in self.space.layers if lc.block in stage.gated) / self.space.base_macs
            rows.append(stage_descriptor(share, s / max(len(self.stages) - 1, 1), len(stage.blocks)))
        self._stats = [None] * count
        return torch.stack(rows).to(self.data.device)

    # -- the architecture --

    def generator(self, salt: int) -> torch.Generator:
        from prunetune.pruning.train import epoch_seed

        return torch.Generator().manual_seed(epoch_seed(self.data.seed, salt * 1_000_003 + self.step))

    def apply(self, width_g: torch.Tensor, depth_g: torch.Tensor) -> None:
        """Masks ``sum_k g_k m_k`` per group and the block gates of the depth weights, for the next passes."""
        self.masks.use(mixed_masks(width_g, self.prefixes))
        self.gates.gates = block_gates(depth_g, self.stages, self.space.droppable_blocks) if self.stages else None

    def expected_macs_ratio(self, width_alpha: torch.Tensor, depth_alpha: torch.Tensor) -> torch.Tensor:
        """E[MACs] / MACs_0 from the expected widths ``sum_k p_lk w_lk / C_l`` and expected gates."""
        ratios = (F.softmax(width_alpha, dim=-1) * (self.widths / self.channels.unsqueeze(1))).sum(dim=1)
        if not self.stages:
            return self.macs.ratio(ratios)
        return self.macs.ratio(ratios, block_gates(F.softmax(depth_alpha, dim=-1), self.stages,
                                                   self.space.droppable_blocks))

    def argmax_choices(self, width_alpha: torch.Tensor, depth_alpha: torch.Tensor):
        return (F.one_hot(width_alpha.argmax(-1), width_alpha.shape[-1]).float(),
                F.one_hot(depth_alpha.argmax(-1), depth_alpha.shape[-1]).float())

    def temperature(self) -> float:
        if self.step < self.warmup_steps:
            return self.hp["tau_max"]
        return cosine_temperature(self.step - self.warmup_steps, self.total_steps - self.warmup_steps,
                                  self.hp["tau_max"], self.options.tau_min)

    def rerank(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Rank every group's channels again (every epoch) and rebuild its prefix masks m_k."""
        self.masks.rerank([(x, y)])
        self.prefixes = [prefix_masks(ranks, self.widths[i]) for i, ranks in enumerate(self.masks.ranks)]
        self.reranks += 1

    # -- the two stages --

    def learn(self, report: LearnReport, *, resumed: bool) -> Learned:
        """Stage 1 (warm-up under uniform choices), then stage 2 (alternating steps), per batch."""
        started, ran = time.perf_counter(), 0
        while self.step < self.total_steps:
            x, y = self.weights.next()
            if self.step % self.per_epoch == 0 or not self.prefixes:
                self.rerank(x, y)
            if self.step < self.warmup_steps:
                self.weight_step(x, y, self.uniform_architecture())
            else:
                if self.descriptors is None:
                    self.descriptors = self.layer_descriptors(x)
                self.weight_step(x, y, self.sampled_architecture())
                self.arch_step()
            self.step += 1
            ran += 1
            if self.step % self.options.checkpoint_every == 0 and self.step < self.total_steps:
                self.seconds += time.perf_counter() - started
                started = time.perf_counter()
                report(self.progress(), self.state_dict())
        self.seconds += time.perf_counter() - started
        learned = self.result()
        if not resumed or ran:
            report(self.progress(), self.state_dict())
        return learned

    def uniform_architecture(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: every group's width and every stage's depth drawn uniformly among its choices."""
        generator = self.generator(1)
        width = uniform_choice([len(self.rhos)] * len(self.space.groups), len(self.rhos), generator)
        depth_size = self.attention.depth_logits.shape[1]
        depth = uniform_choice([s.choices for s in self.stages], depth_size, generator)
        return width.to(self.data.device), depth.to(self.data.device)

    def sampled_architecture(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2's weight step: a Gumbel-softmax sample of the current logits, no gradient to them."""
        with torch.no_grad():
            width_alpha, depth_alpha = self.attention(self.descriptors)
            generator, tau, hard = self.generator(2), self.temperature(), self.options.hard
            return (gumbel_softmax(width_alpha, tau, generator, hard=hard),
                    gumbel_softmax(depth_alpha, tau, generator, hard=hard))

    def weight_step(self, x: torch.Tensor, y: torch.Tensor, architecture) -> None:
        """One SGD step on the weights under the sampled (fixed) architecture."""
        from prunetune.pruning.train import epoch_seed

        self.apply(*architecture)
        self.model.train()
        torch.manual_seed(epoch_seed(self.data.seed, 1000 + self.step))  # dropout, resumably
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.data.recipe.label_smoothing)
        self.weight_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.weight_optimizer.step()

    def arch_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """CE of a Gumbel-softmax sample + lambda * L_macs(E[MACs]) on an architecture batch (Cost)."""
        self.descriptors = self.layer_descriptors(x)
        width_alpha, depth_alpha = self.attention(self.descriptors)
        tau = self.temperature()
        generator = self.generator(3)
        width_g = gumbel_softmax(width_alpha, tau, generator, hard=self.options.hard)
        depth_g = gumbel_softmax(depth_alpha, tau, generator, hard=self.options.hard)
        self.apply(width_g, depth_g)
        self.model.train()
        cross_entropy = F.cross_entropy(self.model(x), y)
        expected = self.expected_macs_ratio(width_alpha, depth_alpha)
        cost = macs_loss(expected, self.loss_target, self.options.tolerance)
        loss = cross_entropy + self.hp["lambda"] * cost.to(cross_entropy.dtype)
        return loss, {"cross_entropy": cross_entropy.item(), "macs_loss": float(cost.detach()),
                      "macs_ratio": float(expected.detach()), "temperature": tau}

    def arch_step(self) -> None:
        """One Adam step on the attention and the logits, weights fixed, on the other half (Two stages)."""
        x, y = self.arch.next()
        loss, row = self.arch_loss(x, y)
        parameters = list(self.attention.parameters())
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)  # no weight gradients
        self.arch_optimizer.zero_grad(set_to_none=True)
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.grad = gradient
        self.arch_optimizer.step()
        if (self.step - self.warmup_steps) % self.options.record_every == 0 or self.step == self.total_steps - 1:
            self.record(row)

    def distribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current choice probabilities softmax(alpha): widths (groups, K), depths (stages, D)."""
        with torch.no_grad():
            width_alpha, depth_alpha = self.attention(self.descriptors)
            return F.softmax(width_alpha, -1).cpu(), F.softmax(depth_alpha, -1).cpu()

    def record(self, row: dict) -> None:
        """A trajectory row: the step's losses (``macs_ratio`` is E[MACs] / MACs_0 of the distribution it
        sampled from), then the choice probabilities after the step (``prob.<group>.w<k>`` for width
        choice k, ``prob.<stage>.d<k>`` for depth choice k) and each group's expected keep ratio."""
        width_p, depth_p = self.distribution()
        expected = (width_p * (self.widths.cpu() / self.channels.cpu().unsqueeze(1))).sum(dim=1)
        row = {"step": self.step, **row}
        for g, probabilities, keep in zip(self.space.groups, width_p, expected, strict=True):
            row[f"keep.{g.name}"] = float(keep)
            row.update({f"prob.{g.name}.w{k}": float(p) for k, p in enumerate(probabilities)})
        for stage, probabilities in zip(self.stages, depth_p, strict=True):
            row.update({f"prob.{stage.name}.d{c}": float(probabilities[c]) for c in range(stage.choices)})
        self.trajectory.append(row)

    # -- reports and result --

    def argmax_architecture(self) -> tuple[torch.Tensor, tuple[str, ...]]:
        """(keep ratio per group, dropped blocks) of the argmax width per group and depth per stage."""
        width_p, depth_p = self.distribution()
        kept = self.widths.cpu().gather(1, width_p.argmax(1, keepdim=True)).squeeze(1)
        dropped = tuple(b for s, stage in enumerate(self.stages) for b in stage.dropped(int(depth_p[s].argmax())))
        return kept.to(torch.float32) / self.channels.cpu(), dropped

    def progress(self) -> LearnProgress:
        """Validation accuracy of the argmax architecture (the full model in stage 1); reported, never used."""
        from prunetune.pruning.train import evaluate

        metrics = {"learn_stage": 1 if self.descriptors is None else 2, "learn_temperature": self.temperature(),
                   "learn_reranks": self.reranks, "learn_seconds": self.seconds}
        if self.descriptors is None:
            self.masks.enabled = self.gates.enabled = False
        else:
            with torch.no_grad():
                width_alpha, depth_alpha = self.attention(self.descriptors)
                self.apply(*self.argmax_choices(width_alpha, depth_alpha))
                metrics["expected_macs_ratio"] = float(self.expected_macs_ratio(width_alpha, depth_alpha))
            ratios, dropped = self.argmax_architecture()
            policy = Policy({g.name: float(r) for g, r in zip(self.space.groups, ratios, strict=True)},
                            dropped, self.space.space_id)
            metrics["macs_ratio"] = self.space.macs_ratio(policy)
            metrics["dropped_blocks"] = len(dropped)
            metrics.update({f"keep.{g.name}": float(r) for g, r in zip(self.space.groups, ratios, strict=True)})
        try:
            metrics["val_accuracy"], metrics["val_loss"] = evaluate(self.model, self.data.val, device=self.data.device)
        finally:
            self.masks.enabled = self.gates.enabled = True
        return LearnProgress(self.step, self.total_steps, metrics)

    def result(self) -> Learned:
        """The argmax policy, shrunk towards the smallest widths if over the target, filled towards full
        width if under it with ``fill_to_target`` (module doc: Result)."""
        if self.descriptors is None:  # no stage 2 (0 search epochs cannot happen: search_epochs >= 1)
            raise UserError("DCP-A learned no architecture: give dcpa.search_epochs_min at least 1")
        ratios, dropped = self.argmax_architecture()
        floor = self.widths.cpu()[:, 0].to(torch.float32) / self.channels.cpu()
        policy = fit_to_target(self.space, ratios, floor, dropped, self.target, fill=self.options.fill_to_target)
        width_p, depth_p = self.distribution()
        argmax = Policy({g.name: float(r) for g, r in zip(self.space.groups, ratios, strict=True)}, dropped,
                        self.space.space_id)
        argmax_macs, learned_macs = self.space.macs_ratio(argmax), self.space.macs_ratio(policy)
        info = {
            "argmax_macs_ratio": argmax_macs, "learned_macs_ratio": learned_macs,
            "shrunk": learned_macs < argmax_macs, "filled": learned_macs > argmax_macs,
            "loss_target": self.loss_target, "tolerance": self.options.tolerance,
            "steps": self.step, "warmup_steps": self.warmup_steps, "reranks": self.reranks,
            "seconds": self.seconds, "dropped_blocks": len(policy.dropped_blocks),
            "distribution": {
                "widths": {g.name: [float(p) for p in width_p[i]] for i, g in enumerate(self.space.groups)},
                "width_choices": {g.name: [int(w) for w in self.widths[i]] for i, g in enumerate(self.space.groups)},
                "depths": {s.name: [float(p) for p in depth_p[i, :s.choices]] for i, s in enumerate(self.stages)},
                "depth_choices": {s.name: s.depths() for s in self.stages},
            },
        }
        return Learned(policy, tuple(self.trajectory), info)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: tensors and plain data (``weights_only`` loads it);
        ``Learner.learn`` adds the header (method, space, hyperparameters) and checks it on resume."""
        return {
            "rhos": list(self.rhos), "stages": [[s.name, s.min_depth] for s in self.stages],
            "step": self.step, "reranks": self.reranks, "seconds": self.seconds,
            "model": self.model.state_dict(), "attention": self.attention.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(), "arch_optimizer": self.arch_optimizer.state_dict(),
            "ranks": [r.clone() for r in self.masks.ranks], "arch_position": self.arch.position,
            "descriptors": None if self.descriptors is None else self.descriptors.clone(),
            "trajectory": list(self.trajectory),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state`` (its header already checked by ``Learner.learn``), taken with these options."""
        same = (list(state["rhos"]) == list(self.rhos)
                and [list(b) for b in state["stages"]] == [[s.name, s.min_depth] for s in self.stages])
        if not same or not 0 <= int(state["step"]) <= self.total_steps:
            raise UserError("the learning checkpoint was taken with other hyperparameters or options; "
                            "resume with the ones it started with")
        self.model.load_state_dict(state["model"])
        self.attention.load_state_dict(state["attention"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])
        device = self.data.device
        self.masks.ranks = [r.to(device) for r in state["ranks"]]
        self.prefixes = [prefix_masks(ranks, self.widths[i]) for i, ranks in enumerate(self.masks.ranks)]
        self.step, self.reranks, self.seconds = int(state["step"]), int(state["reranks"]), float(state["seconds"])
        self.descriptors = None if state["descriptors"] is None else state["descriptors"].to(device)
        self.weights.seek(self.step)
        self.arch.seek(int(state["arch_position"]))
        self.trajectory = [dict(row) for row in state["trajectory"]]


def make_dcpa_learner(options: DcpaOptions) -> DcpaLearner:
    return DcpaLearner(options)
