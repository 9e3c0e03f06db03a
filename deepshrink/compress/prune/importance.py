"""Channel importance: one score per channel of each group, higher = keep.

A group's channel lives in several layers; its score sums the contributions of
the layers that create it (the producing conv/linear filters, incl. depthwise
convs passing it on) and, for ``bn_scale``/gradient criteria, its BatchNorms.

- ``l1`` / ``l2``: norm of the producing filters (Li et al. 2017).
- ``bn_scale``: |gamma| of the group's BNs (Network Slimming, Liu et al. 2017).
- ``taylor``: |sum of w * dL/dw| over the channel's parameters, averaged over batches
  (first-order loss change when the channel is removed; Molchanov et al. 2019).
- ``hessian``: 0.5 * sum of w^2 * (dL/dw)^2, averaged over batches: OBD's saliency with
  the Hessian diagonal approximated by the empirical Fisher.
- ``random``: seeded control baseline.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
from torch import nn

from deepshrink.compress.prune.dependency import ChannelGroup, Member, eval_mode
from deepshrink.core.errors import InputError

Criterion = Literal["l1", "l2", "bn_scale", "taylor", "hessian", "random"]
CRITERIA: tuple[str, ...] = ("l1", "l2", "bn_scale", "taylor", "hessian", "random")
GRADIENT_CRITERIA = ("taylor", "hessian")
# (inputs, targets) batches scored with cross-entropy, or a closure returning one loss.
GradientSource = Iterable[tuple[torch.Tensor, torch.Tensor]] | Callable[[nn.Module], torch.Tensor]


def channel_scores(
    model: nn.Module,
    groups: list[ChannelGroup],
    criterion: str = "l1",
    batches: GradientSource | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Per-group float32 scores of shape ``(group.size,)``; gradient criteria need ``batches``."""
    if criterion not in CRITERIA:
        raise InputError(f"unknown importance {criterion!r}; known: {', '.join(CRITERIA)}")
    modules = dict(model.named_modules())
    if criterion in ("l1", "l2"):
        return [_filter_norms(modules, g, 1 if criterion == "l1" else 2) for g in groups]
    if criterion == "bn_scale":
        return [_bn_scale(modules, g) for g in groups]
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return [torch.rand(g.size, generator=generator) for g in groups]
    if batches is None:
        raise InputError(f"importance {criterion!r} needs gradients: pass batches (or data with a training set)")
    return _gradient_scores(model, modules, groups, batches, criterion)


def _rows(tensor: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """The entries of ``tensor`` (dim 0) belonging to each group channel, as (size, k) rows."""
    return tensor.narrow(0, member.offset, size * member.repeat).reshape(size, -1).float()


def _channel_params(modules: dict[str, nn.Module], group: ChannelGroup, kinds: tuple[str, ...]) -> list[tuple[torch.Tensor, Member]]:
    """(parameter, member) pairs whose dim 0 holds the group's channels: weights and biases of producers and BNs."""
    pairs = []
    for member in group.members:
        if member.kind in kinds:
            module = modules[member.module]
            pairs += [(p, member) for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]
    return pairs


def _filter_norms(modules: dict[str, nn.Module], group: ChannelGroup, p: int) -> torch.Tensor:
    scores = torch.zeros(group.size)
    for member in group.members:
        if member.kind == "out":
            scores += _rows(modules[member.module].weight.detach(), member, group.size).norm(p=p, dim=1)
    return scores


def _bn_scale(modules: dict[str, nn.Module], group: ChannelGroup) -> torch.Tensor:
    gammas = [
        _rows(modules[m.module].weight.detach(), m, group.size).abs().sum(1)
        for m in group.members
        if m.kind == "bn" and modules[m.module].affine
    ]
    if not gammas:
        raise InputError(f"importance 'bn_scale' needs an affine BatchNorm on every pruned group; {group} has none: use 'l1'")
    return torch.stack(gammas).sum(0)


def _losses(model: nn.Module, batches: GradientSource) -> Iterator[torch.Tensor]:
    if callable(batches):
        yield batches(model)
        return
    for inputs, targets in batches:
        yield nn.functional.cross_entropy(model(inputs), targets)


def _gradient_scores(
    model: nn.Module, modules: dict[str, nn.Module], groups: list[ChannelGroup], batches: GradientSource, criterion: str
) -> list[torch.Tensor]:
    """Taylor / Fisher-OBD saliencies from per-batch gradients (eval mode: BN statistics stay untouched)."""
    owned = [_channel_params(modules, g, ("out", "bn")) for g in groups]
    params = list({id(p): p for pairs in owned for p, _ in pairs}.values())
    totals = [torch.zeros(g.size) for g in groups]
    flags = [p.requires_grad for p in params]
    count = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with eval_mode(model):
            for loss in _losses(model, batches):
                grads = dict(zip(map(id, params), torch.autograd.grad(loss, params, allow_unused=True), strict=True))
                for total, group, pairs in zip(totals, groups, owned, strict=True):
                    total += _saliency(group, pairs, grads, criterion)
                count += 1
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    if count == 0:
        raise InputError(f"importance {criterion!r} needs at least one batch of gradients; got none")
    return [t / count for t in totals]


def _saliency(
    group: ChannelGroup, pairs: list[tuple[torch.Tensor, Member]], grads: dict[int, torch.Tensor | None], criterion: str
) -> torch.Tensor:
    """One batch's per-channel saliency for ``criterion`` over the channel's own parameters."""
    score = torch.zeros(group.size)
    for param, member in pairs:
        grad = grads[id(param)]
        if grad is None:  # the loss does not depend on it
            continue
        w, g = _rows(param.detach(), member, group.size), _rows(grad, member, group.size)
        score += (w * g).sum(1) if criterion == "taylor" else 0.5 * (w.square() * g.square()).sum(1)
    return score.abs() if criterion == "taylor" else score
