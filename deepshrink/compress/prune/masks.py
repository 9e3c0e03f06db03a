"""Unstructured pruning masks: magnitude thresholds, layer-wise or global, and
keeping masked weights at zero while training.

Masks are plain bool tensors keyed by the layer's name. While fine-tuning,
gradient hooks zero the masked gradients and an after-step hook re-zeroes the
weights (momentum and weight decay would otherwise revive them). ``finalize``
removes every hook, so the result is an ordinary model whose pruned weights are
zeros in plain tensors.
"""

import torch
from torch import nn

from deepshrink.core.config import Scope, check_range
from deepshrink.core.errors import InputError
from deepshrink.train import TrainHook

Masks = dict[str, torch.Tensor]


def kth_threshold(values: torch.Tensor, sparsity: float) -> float:
    """Magnitude below which ``sparsity`` of ``values`` fall (exact count via kthvalue)."""
    k = int(round(sparsity * values.numel()))
    if k == 0:
        return -1.0
    return float(values.flatten().kthvalue(k).values)


def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    scope: Scope | None = None,
    granularity: str = "layer",
    layer_sparsity: dict[str, float] | None = None,
) -> Masks:
    """Keep-masks that zero the smallest-magnitude weights.

    ``granularity="layer"`` prunes ``sparsity`` of every layer (``layer_sparsity``
    overrides it per layer name); ``"global"`` uses one threshold over all layers
    in scope, so robust layers give up more weights than fragile ones.
    """
    check_range("sparsity", sparsity, 0.0, 1.0)
    if granularity == "global" and layer_sparsity:
        raise InputError("layer_sparsity sets per-layer targets, which granularity 'global' replaces by one threshold; use one of the two")
    scope = scope or Scope()
    layers = dict(scope.layers(model))
    if not layers:
        raise InputError(f"no layers in scope {scope}")
    unknown = sorted(set(layer_sparsity or {}) - set(layers))
    if unknown:
        raise InputError(f"layer_sparsity names layers not in scope: {unknown}; in scope: {sorted(layers)}")
    weights = {name: module.weight.detach().abs() for name, module in layers.items()}
    for name, w in weights.items():
        if not torch.isfinite(w).all():
            raise InputError(f"layer {name!r} has NaN or infinite weights; cannot rank them by magnitude")
    if granularity == "global":
        threshold = kth_threshold(torch.cat([w.flatten() for w in weights.values()]), sparsity)
        return {name: w > threshold for name, w in weights.items()}
    masks = {}
    for name, w in weights.items():
        s = (layer_sparsity or {}).get(name, sparsity)
        check_range(f"layer_sparsity[{name}]", s, 0.0, 1.0)
        masks[name] = exact_mask(w, s)
    return masks


def exact_mask(magnitude: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly round(sparsity * n) weights, breaking magnitude ties by position."""
    k = int(round(sparsity * magnitude.numel()))
    mask = torch.ones(magnitude.numel(), dtype=torch.bool)
    if k:
        mask[magnitude.flatten().argsort(stable=True)[:k]] = False
    return mask.view_as(magnitude)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.masked_fill_(~mask, 0.0)  # +0.0; multiplying would leave -0.0 for negative weights


def zero_masks(model: nn.Module, scope: Scope | None = None) -> Masks:
    """Masks of the weights that are exactly zero now, for layers that have any: training
    with these in a ``MaskHook`` keeps an already pruned model pruned."""
    masks = {name: module.weight.detach() != 0 for name, module in (scope or Scope()).layers(model)}
    return {name: mask for name, mask in masks.items() if not bool(mask.all())}


def keep_pruned(masks: Masks, pruned: Masks) -> Masks:
    """``masks`` intersected with the keep-masks of an earlier step (``pruned``: ``zero_masks``
    taken before this step), plus those earlier masks for layers this step leaves alone: a
    second pruning step, and its fine-tuning, never revive a weight the first one zeroed."""
    merged = dict(pruned)
    for name, mask in masks.items():
        merged[name] = mask & pruned[name] if name in pruned else mask
    return merged


def sparsity_of(masks: Masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


class MaskHook(TrainHook):
    """Keeps masked weights at zero during training; ``finalize`` removes all hooks."""

    def __init__(self, model: nn.Module, masks: Masks) -> None:
        self.model = model
        self.masks = masks
        self._handles: list = []
        self.attach()

    def attach(self) -> None:
        self.detach()
        modules = dict(self.model.named_modules())
        for name, mask in self.masks.items():
            self._handles.append(modules[name].weight.register_hook(lambda grad, mask=mask: grad.masked_fill(~mask, 0.0)))
        apply_masks(self.model, self.masks)

    def update(self, masks: Masks) -> None:
        """Swap in new masks (gradual pruning) and apply them at once."""
        self.masks = masks
        self.attach()

    def after_step(self, trainer) -> None:
        apply_masks(self.model, self.masks)

    def rank_state(self) -> Masks:
        return self.masks

    def rank_state_loaded(self) -> None:
        apply_masks(self.model, self.masks)

    def to(self, device) -> "MaskHook":
        super().to(device)
        self.attach()  # the gradient hooks hold the masks: re-register them with the moved ones
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def finalize(self) -> nn.Module:
        apply_masks(self.model, self.masks)
        self.detach()
        return self.model
