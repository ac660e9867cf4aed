"""Channel importance criteria: one score per channel of a group, higher means keep.

Every criterion is a callable ``(model, groups, calib) -> {group name: scores}`` where ``groups``
maps group names to Torch-Pruning groups of ``model`` and ``calib`` is a list of ``(x, y)``
calibration batches from the training split. Scoring all groups in one call lets the
activation-based criteria run the calibration batches once for the whole model.

Registered: ``l1``, ``l2``, ``bn_scale``, ``fpgm``, ``taylor`` (Torch-Pruning's own group
importances), ``random`` (seeded), and ``attention``, ARPruning's criterion (Yuan et al., Neural
Networks 174, 2024; METHODS.md), with its p = 1 variant ``attention_p1``, and ``texture``, CDP's
skeleton-based criterion (Li et al., AI Communications 36(4), 2023; METHODS.md, CDP + DTC).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunetune.pruning.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]
Scores = dict[str, torch.Tensor]


def _finite(scores: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(scores.detach().float().cpu(), nan=0.0, posinf=1e30, neginf=-1e30)


@dataclass(frozen=True)
class TorchPruningCriterion:
    """A Torch-Pruning group importance (magnitude, BN scale, FPGM), applied group by group."""

    kind: str  # "l1" | "l2" | "bn_scale" | "fpgm"
    needs_calibration = False

    def _importance(self):
        import torch_pruning as tp

        if self.kind == "l1":
            return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
        if self.kind == "l2":
            return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
        if self.kind == "bn_scale":
            return tp.importance.BNScaleImportance(normalizer=None)
        return tp.importance.FPGMImportance(normalizer=None)

    def __call__(self, model: nn.Module, groups: Mapping, calib: Sequence[Batch] | None = None) -> Scores:
        importance = self._importance()
        scores = {}
        for name, group in groups.items():
            score = importance(group)
            if score is None:  # Torch-Pruning's answer for a group without the layers it reads (bn_scale's BatchNorms)
                raise _no_batchnorm(type(model).__name__, name)
            scores[name] = _finite(score)
        return scores


@dataclass(frozen=True)
class TaylorCriterion:
    """First-order Taylor importance (Molchanov et al., CVPR 2019): |w * dL/dw| summed per channel.

    Gradients of the cross-entropy come from the calibration batches; the model's own gradients
    are cleared before and after.
    """

    needs_calibration = True

    def __call__(self, model: nn.Module, groups: Mapping, calib: Sequence[Batch] | None = None) -> Scores:
        import torch_pruning as tp

        calib = _require_calibration(calib, "taylor")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        model.zero_grad(set_to_none=True)
        for x, y in calib:
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
        importance = tp.importance.GroupTaylorImportance(normalizer=None)
        scores = {name: _finite(importance(group)) for name, group in groups.items()}
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return scores


@dataclass(frozen=True)
class RandomCriterion:
    """Uniform random scores from a seeded generator: the control every criterion must beat."""

    seed: int = 0
    needs_calibration = False

    def __call__(self, model: nn.Module, groups: Mapping, calib: Sequence[Batch] | None = None) -> Scores:
        generator = torch.Generator().manual_seed(self.seed)
        return {name: torch.rand(len(group.items[0].idxs), generator=generator)
                for name, group in groups.items()}


def attention_scores(features: torch.Tensor, p: int = 2) -> torch.Tensor:
    """ARPruning's intra-layer criterion for every channel j of F (B x C x H x W) at once.

    The spatial attention map of sample b is Q(F)_b = v_b / ||v_b||_2 with v_b = vec((1/C) sum_c |F_bc|^p)
    (attention transfer; METHODS.md, ARPruning).

    s_j = mean over samples b and pixels of (Q(F) - Q(F without j))^2, where F without j averages
    |F_c|^p over the other C - 1 channels: (C * mean_c - |F_j|^p) / (C - 1). A channel whose removal
    changes the attention map most scores highest; an all-zero channel scores 0.
    """
    batch, channels = features.shape[:2]
    powered = features.abs().pow(p).flatten(2)  # B x C x HW
    if channels < 2:
        return torch.ones(channels)
    full = powered.mean(dim=1, keepdim=True)  # B x 1 x HW
    q = full / full.norm(dim=2, keepdim=True).clamp_min(1e-12)
    without = (channels * full - powered) / (channels - 1)  # B x C x HW
    q_without = without / without.norm(dim=2, keepdim=True).clamp_min(1e-12)
    return (q - q_without).pow(2).mean(dim=(0, 2))


@dataclass(frozen=True)
class AttentionCriterion:
    """ARPruning's attention-map criterion on each group's BatchNorm outputs (METHODS.md).

    A residual group owns several BatchNorms (one per block feeding the sum): its score is the sum
    of their per-channel scores, averaged over calibration batches. Groups without a BatchNorm use
    their convolutions' outputs. ``p=1`` is the |F| variant (registered as ``attention_p1``).
    """

    p: int = 2
    needs_calibration = True

    def __post_init__(self) -> None:
        if self.p not in (1, 2):
            raise UserError(f"attention criterion p={self.p!r} is not 1 or 2; use p=2 (F^2, attention "
                            f"transfer) or p=1 (|F|)")

    def __call__(self, model: nn.Module, groups: Mapping, calib: Sequence[Batch] | None = None) -> Scores:
        calib = _require_calibration(calib, "attention")
        observed = {name: _observed_layers(model, group) for name, group in groups.items()}
        totals = {name: torch.zeros(len(group.items[0].idxs)) for name, group in groups.items()}
        modules = {m for layers in observed.values() for m in layers}
        captured: dict[nn.Module, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda mod, _i, out: captured.__setitem__(mod, out.detach()))
                 for m in modules]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for x, _ in calib:
                    captured.clear()
                    model(x.to(device))
                    for name, layers in observed.items():
                        for layer in layers:
                            if layer in captured:
                                totals[name] += attention_scores(captured[layer], self.p).cpu()
        finally:
            for hook in hooks:
                hook.remove()
            model.train(was_training)
        return {name: _finite(total / len(calib)) for name, total in totals.items()}


def texture_pattern(weight: torch.Tensor) -> torch.Tensor:
    """The K x K texture of every filter: ``P_n[i, j] = ||W[n, :, i, j]||_2`` (N x K x K; a Linear's
    rows are 1 x 1 patterns). With a CDP filter skeleton the layer's ``weight`` is ``W * FS_n``
    (methods/cdp_dtc.py), so ``P_n[i, j] = |FS_n[i, j]| * ||W[n, :, i, j]||_2``: a stripe the skeleton
    zeroed has no texture."""
    w = weight.detach().float()
    if w.dim() == 2:
        w = w[:, :, None, None]
    return w.pow(2).sum(dim=1).sqrt()


@dataclass(frozen=True)
class TextureCriterion:
    """CDP's skeleton-based importance (METHODS.md, CDP + DTC): filter n scores
    ``sum_ij |FS_n[i, j]| * ||W[n, :, i, j]||_2``, the L1 norm of its texture (``texture_pattern``).

    A layer with a skeleton (a CDP + DTC model while it learns) reads it through its ``weight``
    (``W * FS``); a model without skeletons, or one whose skeletons were folded into the weights, is
    scored on the weights' own K x K pattern norms, i.e. as if ``FS = 1`` (for a folded skeleton the
    two agree: ``|FS| * ||W||`` is the norm of the folded stripe). A filter with no surviving stripe
    scores 0. A group's channel sums its scores over the group's convolutions and linears, so a
    channel of a coupled group scores 0 only when it is dead in every member.
    """

    needs_calibration = False

    def __call__(self, model: nn.Module, groups: Mapping, calib: Sequence[Batch] | None = None) -> Scores:
        import torch_pruning as tp

        out_fns = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels)
        scores = {}
        for name, group in groups.items():
            total = torch.zeros(len(group.items[0].idxs))
            for item in group.items:
                layer = item.dep.target.module
                if item.dep.handler not in out_fns or not isinstance(layer, nn.Conv2d | nn.Linear):
                    continue
                per_filter = texture_pattern(layer.weight).flatten(1).sum(1).cpu()
                total.scatter_add_(0, torch.tensor(item.root_idxs, dtype=torch.long), per_filter[item.idxs])
            scores[name] = _finite(total)
        return scores


def _observed_layers(model: nn.Module, group) -> list[nn.Module]:
    """The modules whose outputs carry the group's channels: its BatchNorms, else its convs."""
    import torch_pruning as tp

    out_modules = [item.dep.target.module for item in group.items
                   if item.dep.handler in (tp.prune_batchnorm_out_channels, tp.prune_conv_out_channels,
                                           tp.prune_depthwise_conv_out_channels)]
    norms = [m for m in out_modules if isinstance(m, nn.BatchNorm2d)]
    return list(dict.fromkeys(norms or [m for m in out_modules if isinstance(m, nn.Conv2d)]))


def check_criterion_fits(name: str, model: nn.Module, space, *, model_name: str) -> None:
    """Refuse, before any trial, criterion ``name`` where it cannot score every group of ``space``
    (``model``'s search space): ``bn_scale`` ranks a group's channels by the scales |gamma| of its
    affine BatchNorms (Network Slimming, Liu et al., ICCV 2017), so a group without one has no score.
    The other criteria score any group."""
    if name != "bn_scale":
        return
    modules = dict(model.named_modules())
    for group in space.groups:
        if not any(_is_affine_batchnorm(modules.get(member)) for member in group.members):
            raise _no_batchnorm(model_name, group.name)


def _is_affine_batchnorm(module: nn.Module | None) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine


def _no_batchnorm(model_name: str, layer: str) -> UserError:
    return UserError(f"importance bn_scale needs a BatchNorm after each prunable layer; {model_name}'s {layer} "
                     f"has none; choose --importance l1 (or --set importance=l1)")


def _require_calibration(calib: Sequence[Batch] | None, name: str) -> Sequence[Batch]:
    if not calib:
        raise UserError(f"criterion '{name}' needs calibration batches; pass some training batches")
    return calib


CRITERIA: dict[str, Callable[..., Callable]] = {
    "l1": lambda: TorchPruningCriterion("l1"),
    "l2": lambda: TorchPruningCriterion("l2"),
    "bn_scale": lambda: TorchPruningCriterion("bn_scale"),
    "fpgm": lambda: TorchPruningCriterion("fpgm"),
    "taylor": TaylorCriterion,
    "random": RandomCriterion,
    "attention": AttentionCriterion,
    "attention_p1": lambda: AttentionCriterion(p=1),
    "texture": TextureCriterion,
}


def criterion_names() -> list[str]:
    return sorted(CRITERIA)


def get_criterion(name: str, **options):
    """The criterion registered as ``name``; unknown names or options are a UserError listing valid ones."""
    if name not in CRITERIA:
        raise UserError(f"unknown importance criterion '{name}'; choose one of: {', '.join(criterion_names())}")
    try:
        return CRITERIA[name](**options)
    except TypeError:
        raise UserError(f"criterion '{name}' takes no options {sorted(options)}") from None
