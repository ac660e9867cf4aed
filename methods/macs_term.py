"""MACs of a model as a differentiable function of its groups' keep ratios (torch).

The same formula as ``SearchSpace.estimate_macs`` (pruning/space.py), with the kept fraction of
each group, ``kept_l / C_l``, replaced by a continuous keep ratio r_l: a Conv2d or Linear layer
costs ``MACs_0 * r_out * (sum_parts count * r_part) / in_total`` (parts fed by no group count with
ratio 1), a depthwise convolution ``MACs_0 * r_out``. At the ratios of a rounded policy it equals
the space's estimate, which is exact for conv and linear layers. Used by DCM's loss
(METHODS.md: ``MACs(r)`` differentiable in r) and open to every learner with a MACs term.
Dropped blocks are not modelled here (no learner drops blocks yet).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prunetune.pruning.space import SearchSpace


class MacsTerm(nn.Module):
    """``forward(ratios)``: MACs of ``space``'s model at keep ratios ``ratios`` (one per group, in
    ``space.groups`` order), differentiable in them; ``ratio(ratios)`` divides by the base MACs."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        index = {g.name: i for i, g in enumerate(space.groups)}
        fixed = len(space.groups)  # the position of the constant ratio 1 (inputs no group owns)
        macs, out_index, in_weights = [], [], []
        for layer in space.layers:
            macs.append(float(layer.macs))
            out_index.append(fixed if layer.out_group is None else index[layer.out_group])
            weights = [0.0] * (fixed + 1)
            in_total = sum(count for _, count in layer.in_parts)
            if layer.depthwise or not in_total:
                weights[fixed] = 1.0
            else:
                for group, count in layer.in_parts:
                    weights[fixed if group is None else index[group]] += count / in_total
            in_weights.append(weights)
        self.group_names = tuple(index)
        self.base_macs = float(space.base_macs)
        self.register_buffer("macs", torch.tensor(macs, dtype=torch.float64))
        self.register_buffer("out_index", torch.tensor(out_index, dtype=torch.long))
        self.register_buffer("in_weights", torch.tensor(in_weights, dtype=torch.float64))

    def forward(self, ratios: torch.Tensor) -> torch.Tensor:
        extended = torch.cat([ratios.to(torch.float64), ratios.new_ones(1, dtype=torch.float64)])
        out_fraction = extended[self.out_index]
        in_fraction = self.in_weights @ extended
        return (self.macs * out_fraction * in_fraction).sum()

    def ratio(self, ratios: torch.Tensor) -> torch.Tensor:
        """MACs at ``ratios`` as a fraction of the base model's MACs."""
        return self(ratios) / self.base_macs

    def of(self, keep_ratios: Mapping[str, float]) -> float:
        """MACs at a ``{group: keep ratio}`` mapping, as a plain number."""
        with torch.no_grad():
            return float(self(torch.tensor([float(keep_ratios[name]) for name in self.group_names])))
