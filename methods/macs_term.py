"""MACs of a model as a differentiable function of its groups' keep ratios (torch).

The same formula as ``SearchSpace.estimate_macs`` (pruning/space.py), with the kept fraction of
each group, ``kept_l / C_l``, replaced by a continuous keep ratio r_l: a Conv2d or Linear layer
costs ``MACs_0 * r_out * (sum_parts count * r_part) / in_total`` (parts fed by no group count with
ratio 1), a depthwise convolution ``MACs_0 * r_out``. At the ratios of a rounded policy it equals
the space's estimate, which is exact for conv and linear layers. Used by DCM's loss
(METHODS.md: ``MACs(r)`` differentiable in r) and open to every learner with a MACs term.

Depth: ``block_gates`` holds one gate g_b in [0, 1] per droppable block (``space.droppable_blocks``
order); the layers of block b's residual branch cost ``g_b`` times their MACs, so gate 0 prices
the block as replaced by its shortcut (a projection shortcut's MACs still count) and gate 1 as
kept. At 0/1 gates and a rounded policy's ratios it equals ``SearchSpace.estimate_macs`` of that
policy with the gate-0 blocks dropped (the ratios of groups inside them do not matter).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from prunetune.pruning.space import SearchSpace


class MacsTerm(nn.Module):
    """``forward(ratios, block_gates=None)``: MACs of ``space``'s model at keep ratios ``ratios`` (one
    per group, in ``space.groups`` order) and block gates (one per droppable block, in
    ``space.droppable_blocks`` order; None keeps every block), differentiable in both;
    ``ratio(...)`` divides by the base MACs."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        index = {g.name: i for i, g in enumerate(space.groups)}
        fixed = len(space.groups)  # the position of the constant ratio 1 (inputs no group owns)
        blocks = {name: i for i, name in enumerate(space.droppable_blocks)}
        kept = len(blocks)  # the position of the constant gate 1 (layers in no droppable block)
        macs, out_index, in_weights, block_index = [], [], [], []
        for layer in space.layers:
            macs.append(float(layer.macs))
            block_index.append(kept if layer.block is None else blocks[layer.block])
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
        self.block_names = tuple(blocks)
        self.block_groups = {b.name: b.groups for b in space.blocks if b.droppable}
        self.base_macs = float(space.base_macs)
        self.register_buffer("macs", torch.tensor(macs, dtype=torch.float64))
        self.register_buffer("out_index", torch.tensor(out_index, dtype=torch.long))
        self.register_buffer("in_weights", torch.tensor(in_weights, dtype=torch.float64))
        self.register_buffer("block_index", torch.tensor(block_index, dtype=torch.long))

    def forward(self, ratios: torch.Tensor, block_gates: torch.Tensor | None = None) -> torch.Tensor:
        extended = torch.cat([ratios.to(torch.float64), ratios.new_ones(1, dtype=torch.float64)])
        layer_macs = self.macs * extended[self.out_index] * (self.in_weights @ extended)
        if block_gates is None:
            return layer_macs.sum()
        if block_gates.shape != (len(self.block_names),):
            raise ValueError(f"block_gates has shape {tuple(block_gates.shape)}; give one gate per droppable "
                             f"block ({len(self.block_names)}, in space.droppable_blocks order)")
        gates = torch.cat([block_gates.to(torch.float64), block_gates.new_ones(1, dtype=torch.float64)])
        return (layer_macs * gates[self.block_index]).sum()

    def ratio(self, ratios: torch.Tensor, block_gates: torch.Tensor | None = None) -> torch.Tensor:
        """MACs at ``ratios`` (and ``block_gates``) as a fraction of the base model's MACs."""
        return self(ratios, block_gates) / self.base_macs

    def of(self, keep_ratios: Mapping[str, float], dropped_blocks: Iterable[str] = ()) -> float:
        """MACs at a ``{group: keep ratio}`` mapping with ``dropped_blocks`` dropped, as a plain number;
        groups inside dropped blocks may be missing from the mapping."""
        dropped = set(dropped_blocks)
        gone = {g for name in dropped for g in self.block_groups[name]}
        with torch.no_grad():
            ratios = torch.tensor([float(keep_ratios[name] if name in keep_ratios or name not in gone else 1.0)
                                   for name in self.group_names])
            gates = torch.tensor([0.0 if name in dropped else 1.0 for name in self.block_names])
            return float(self(ratios, gates if dropped else None))
