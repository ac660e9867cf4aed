"""DCP-A's relaxed search space: the width and depth choices, their Gumbel-softmax sampling, the MACs loss.

What ``methods.dcpa`` (the learner; its docstring gives the method after METHODS.md, DCP-A) samples
architectures with: ``width_choices`` and ``depth_stages`` (the choices), ``gumbel_softmax``,
``mixed_masks`` and ``block_gates`` (sampling), ``cosine_temperature`` (tau's schedule) and
``macs_loss`` (the cost term).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunetune.pruning.space import SearchSpace

# --- choices ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DepthStage:
    """The depth choices of one residual stage: run its first ``min_depth + choice`` ``blocks`` (in
    order); the blocks past that depth are skipped through their shortcut (METHODS.md, DCP-A: Choices)."""

    name: str
    blocks: tuple[str, ...]
    min_depth: int

    @property
    def choices(self) -> int:
        return len(self.blocks) - self.min_depth + 1

    @property
    def gated(self) -> tuple[str, ...]:
        """The blocks some choice drops."""
        return self.blocks[self.min_depth:]

    def depths(self) -> list[int]:
        return [self.min_depth + c for c in range(self.choices)]

    def dropped(self, choice: int) -> tuple[str, ...]:
        return self.blocks[self.min_depth + choice:]


def depth_stages(space: SearchSpace) -> tuple[DepthStage, ...]:
    """Depth choices 1..n_blocks per stage of ``space.stages`` (more where a block that cannot be
    dropped comes later in it); stages with one choice only are left out."""
    result = []
    for stage in space.stages:
        droppable = [space.block(name).droppable for name in stage.blocks]
        min_depth = max([1] + [i + 1 for i, can in enumerate(droppable) if not can])
        if min_depth < len(stage.blocks):
            result.append(DepthStage(stage.name, stage.blocks, min_depth))
    return tuple(result)


def width_choices(space: SearchSpace, rhos: Sequence[float]) -> torch.Tensor:
    """``w_lk = ceil(rho_k C_l)`` to the group's rounding unit and limits: (groups, choices), long."""
    return torch.tensor([[g.kept_channels(rho) for rho in rhos] for g in space.groups], dtype=torch.long)


# --- sampling ----------------------------------------------------------------------------------------


def cosine_temperature(step: int, total: int, tau_max: float, tau_min: float) -> float:
    """tau annealed by cosine from ``tau_max`` at step 0 to ``tau_min`` at step ``total - 1``
    (METHODS.md, DCP-A: Two stages)."""
    progress = min(step, total - 1) / max(total - 1, 1)
    return tau_min + 0.5 * (tau_max - tau_min) * (1 + math.cos(math.pi * progress))


def gumbel_softmax(alpha: torch.Tensor, tau: float, generator: torch.Generator, *, hard: bool) -> torch.Tensor:
    """``g = softmax((log_softmax(alpha) + Gumbel) / tau)`` over the last dimension (METHODS.md,
    DCP-A: Sampling); ``hard``: the one-hot argmax forward, g's gradient backward (straight-through)."""
    uniform = torch.rand(alpha.shape, generator=generator, dtype=torch.float32).to(alpha.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    soft = F.softmax((F.log_softmax(alpha, dim=-1) + gumbel) / tau, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return one_hot - soft.detach() + soft


def uniform_choice(counts: Sequence[int], size: int, generator: torch.Generator) -> torch.Tensor:
    """One-hot rows (len(counts), size): each row a choice drawn uniformly among its first counts[i]."""
    rows = torch.zeros(len(counts), size)
    for i, count in enumerate(counts):
        rows[i, int(torch.randint(count, (1,), generator=generator))] = 1.0
    return rows


def prefix_masks(ranks: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """m_k (choices, C): m_k keeps the w_k best-ranked channels (1-based ``ranks``, 1 the best)."""
    return (ranks.unsqueeze(0) <= widths.to(ranks.dtype).unsqueeze(1)).to(torch.float32)


def mixed_masks(g: torch.Tensor, prefixes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The mask of each group ``sum_k g_lk m_lk`` (METHODS.md, DCP-A: Sampling)."""
    return [g[i] @ prefix for i, prefix in enumerate(prefixes)]


def block_gates(depth_g: torch.Tensor, stages: Sequence[DepthStage], droppable: Sequence[str]) -> torch.Tensor:
    """The gate of every droppable block (``droppable`` order, MacsTerm's): the (sampled or expected)
    weight of its stage's depth choices that run it, ``sum_{c : min_depth + c > position} g_c``; 1 for
    blocks no choice drops."""
    gates = {}
    for s, stage in enumerate(stages):
        for name in stage.gated:
            position = stage.blocks.index(name)
            gates[name] = depth_g[s, position - stage.min_depth + 1:stage.choices].sum()
    one = depth_g.new_ones(())
    return torch.stack([gates.get(name, one) for name in droppable]) if droppable else depth_g.new_zeros(0)


# --- cost ----------------------------------------------------------------------------------------------


def macs_loss(expected_ratio: torch.Tensor, target: float, tolerance: float) -> torch.Tensor:
    """``log E[MACs]`` above t, ``-log E[MACs]`` below ``t - tolerance``, else 0 (METHODS.md, DCP-A:
    Cost; on the ratio to the base MACs, which shifts the log by a constant)."""
    value = float(expected_ratio.detach())
    if value > target:
        return torch.log(expected_ratio)
    if value < target - tolerance:
        return -torch.log(expected_ratio)
    return expected_ratio * 0.0
