"""DCP-A's attention: layer descriptors through one self-attention layer give the architecture logits.

A descriptor per prunable group (the quantiles of its channels' mean |BN output|, their spread, its
MACs share, position and width) and per residual stage; ``LayerAttention`` turns them into alpha_l
over the width choices and alpha_s over the depth choices (``methods.dcpa``'s docstring, Attention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

QUANTILES = 4  # channel statistics of a group summarised to this many quantiles
DESCRIPTOR_SIZE = QUANTILES + 6


# --- attention -------------------------------------------------------------------------------------------


class LayerAttention(nn.Module):
    """Descriptors of the layers (groups, then stages) -> one self-attention layer -> logits.

    ``forward(descriptors)`` returns (width alpha (groups, K), depth alpha (stages, D)): a linear
    head on each token's attended embedding plus free logits, invalid depth choices at -inf
    (METHODS.md, DCP-A: Attention).
    """

    def __init__(self, groups: int, width_count: int, depth_counts: Sequence[int], dim: int, heads: int):
        super().__init__()
        self.groups = groups
        self.embed = nn.Linear(DESCRIPTOR_SIZE, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.width_head = nn.Linear(dim, width_count, bias=False)  # a shared bias would move every layer alike
        depth_size = max(depth_counts, default=1)
        self.depth_head = nn.Linear(dim, depth_size, bias=False)
        for head in (self.width_head, self.depth_head):  # start near the free logits' distribution
            nn.init.normal_(head.weight, std=0.01)
        self.width_logits = nn.Parameter(torch.zeros(groups, width_count))
        self.depth_logits = nn.Parameter(torch.zeros(len(depth_counts), depth_size))
        valid = torch.zeros(len(depth_counts), depth_size, dtype=torch.bool)
        for s, count in enumerate(depth_counts):
            valid[s, :count] = True
        self.register_buffer("depth_valid", valid)

    def forward(self, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.embed(descriptors).unsqueeze(0)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        hidden = self.norm(tokens + attended).squeeze(0)
        width = self.width_head(hidden[:self.groups]) + self.width_logits
        depth = self.depth_head(hidden[self.groups:]) + self.depth_logits
        return width, depth.masked_fill(~self.depth_valid, float("-inf"))


def group_descriptor(output: torch.Tensor, macs_share: float, position: float, channels: int) -> torch.Tensor:
    """A group's descriptor from its BN output on the batch: the quantiles of its channels' mean
    |output| (over a common scale), their spread, the log of that scale, its MACs share, position, log-width."""
    magnitude = output.detach().abs().float().transpose(0, 1).flatten(1)  # channels x (batch, pixels)
    mean, spread = magnitude.mean(dim=1), magnitude.std(dim=1) if magnitude.shape[1] > 1 else magnitude.mean(1) * 0
    scale = mean.mean().clamp_min(1e-8)
    quantiles = torch.quantile(mean / scale, torch.linspace(0, 1, QUANTILES, device=mean.device)).cpu()
    extra = torch.tensor([float((spread.mean() / scale).clamp(max=10)), float(torch.log(scale)), macs_share,
                          position, math.log2(channels) / 8, 0.0])
    return torch.cat([quantiles, extra])


def stage_descriptor(macs_share: float, position: float, blocks: int) -> torch.Tensor:
    """A stage's descriptor: its droppable blocks' MACs share, its position, its size; flag 1."""
    return torch.tensor([0.0] * (QUANTILES + 2) + [macs_share, position, math.log2(blocks + 1) / 8, 1.0])
