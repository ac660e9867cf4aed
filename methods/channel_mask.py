"""Dynamic channel masking (DCM, METHODS.md): soft rank masks on every group's channels.

Each group's channels are ranked by an importance criterion from ``pruning.importance`` (rank 1
is the most important); ``ChannelMasks.rerank`` ranks them again as the weights change. The mask
of channel c of group l is ``m_lc = sigmoid((r_l * C_l - rank_lc + 0.5) / T)``: with 1-based ranks
it keeps the best ``round(r_l * C_l)`` channels once T is small (a hard mask), and is
differentiable in the keep ratio r_l while T is not. The masks multiply the outputs of the group's
BatchNorms (its convolutions and linears where it has none), so a masked channel is zero wherever
the group's channels flow, as if pruned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunetune.pruning.space import SearchSpace


def soft_mask(keep_ratio: torch.Tensor, ranks: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sigmoid((r * C - rank + 0.5) / T)`` for 1-based ``ranks`` of the C channels (METHODS.md, DCM)."""
    channels = ranks.numel()
    return torch.sigmoid((keep_ratio * channels - ranks + 0.5) / temperature)


def ranks_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks, 1 for the highest score (ties broken by channel index, stably)."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1)
    return ranks.to(torch.float32)


def masked_modules(model: nn.Module, members: Sequence[str]) -> list[nn.Module]:
    """The layers whose outputs carry a group's channels: its BatchNorms, else its convs and linears."""
    modules = [model.get_submodule(name) for name in members]
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return norms or [m for m in modules if isinstance(m, nn.Conv2d | nn.Linear)]


class ChannelMasks:
    """Soft rank masks on ``model``'s groups, applied by forward hooks while ``enabled``.

    ``set(ratios, temperature)`` fixes the masks for the next forward passes: ``ratios`` (one per
    group, in ``space.groups`` order) may require grad, so the loss reaches them through the masks.
    """

    def __init__(self, model: nn.Module, space: SearchSpace, criterion: str):
        from prunetune.pruning.dependency import tp_group, trace_graph, trace_groups
        from prunetune.pruning.importance import get_criterion
        from prunetune.pruning.models import classifier_layer

        self.model = model
        self.space = space
        self.criterion = get_criterion(criterion)
        graph = trace_graph(model, space.input_shape)  # before the hooks: tracing runs the model
        traced = {g.name: g for g in trace_groups(model, graph, ignored=[classifier_layer(model)])}
        self._tp_groups = {g.name: tp_group(graph, traced[g.name].root) for g in space.groups}
        self.ranks = [torch.arange(1, g.channels + 1, dtype=torch.float32) for g in space.groups]
        self.enabled = True
        self._masks: list[torch.Tensor | None] = [None] * len(space.groups)
        self._hooks = []
        for index, group in enumerate(space.groups):
            for module in masked_modules(model, group.members):
                self._hooks.append(module.register_forward_hook(self._hook(index)))

    def _hook(self, index: int):
        def apply(module, inputs, output):
            mask = self._masks[index]
            if not self.enabled or mask is None:
                return output
            shape = (1, -1) + (1,) * (output.dim() - 2)
            return output * mask.to(output.dtype).view(shape)

        return apply

    def rerank(self, calib: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Rank every group's channels again with the criterion on the current weights (masks off)."""
        was_enabled, self.enabled = self.enabled, False
        try:
            scores = self.criterion(self.model, self._tp_groups, calib)
        finally:
            self.enabled = was_enabled
        device = next(self.model.parameters()).device
        self.ranks = [ranks_from_scores(scores[g.name]).to(device) for g in self.space.groups]

    def set(self, ratios: torch.Tensor, temperature: float) -> list[torch.Tensor]:
        """Compute every group's soft mask at ``ratios`` and ``temperature``; return them."""
        self._masks = [soft_mask(ratios[i], ranks, temperature) for i, ranks in enumerate(self.ranks)]
        return self._masks

    def use(self, masks: Sequence[torch.Tensor]) -> None:
        """Apply ``masks`` (one per group, in ``space.groups`` order, any that the caller computed:
        DCP-A's mixtures of prefix masks) in the next forward passes."""
        self._masks = list(masks)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
