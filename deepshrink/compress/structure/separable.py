"""Depthwise-separable substitution: a kxk conv becomes depthwise kxk -> pointwise 1x1.

The pair is initialised to approximate the original: for each input channel i,
the conv's slice W[:, i] (out x k²) is a matrix, and its best rank-m
approximation (SVD) gives that channel's m depthwise filters and their
pointwise weights. A conv that is separable by construction is reproduced
exactly; otherwise fine-tuning (or distillation) closes the gap.
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn

from deepshrink.compress.distill import KD, restructure_and_finetune
from deepshrink.core.config import Config, Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.train import TrainConfig


class SeparableConv2d(nn.Sequential):
    """Depthwise kxk (in -> in·m, the original stride/padding) then pointwise 1x1 (in·m -> out)."""


@dataclass(frozen=True)
class Separable(Config):
    """Replace kxk convs (groups 1) in scope by depthwise-separable pairs with ``multiplier``
    depthwise filters per input channel; ``finetune`` then trains, ``distill`` with KD from the original."""

    multiplier: int = 1
    scope: Scope = Scope(types=("Conv2d",))
    finetune: TrainConfig | None = None
    distill: KD | None = None

    def __post_init__(self) -> None:
        if self.multiplier < 1:
            raise InputError(f"multiplier must be >= 1, got {self.multiplier}")
        if self.distill is not None and self.finetune is None:
            raise InputError("distill sets how to fine-tune: set finetune too")


def separable_factors(weight: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(depthwise (in·m, 1, kh, kw), pointwise (out, in·m)): per-input-channel rank-m SVD of W[:, i]."""
    out_c, in_c, kh, kw = weight.shape
    if not 1 <= multiplier <= min(out_c, kh * kw):
        raise InputError(f"multiplier must be in [1, {min(out_c, kh * kw)}] for a {out_c}x{in_c}x{kh}x{kw} conv, got {multiplier}")
    slices = weight.detach().double().permute(1, 0, 2, 3).reshape(in_c, out_c, kh * kw)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)  # batched over input channels
    root = s[:, :multiplier].sqrt()
    depthwise = (root[:, :, None] * vh[:, :multiplier]).reshape(in_c * multiplier, 1, kh, kw)
    pointwise = (u[:, :, :multiplier] * root[:, None, :]).permute(1, 0, 2).reshape(out_c, in_c * multiplier)
    return depthwise, pointwise


def separable_conv(conv: nn.Conv2d, multiplier: int = 1, name: str = "layer") -> SeparableConv2d:
    if conv.groups != 1:
        raise InputError(f"{name}: already a grouped convolution (groups={conv.groups})")
    if conv.padding_mode != "zeros":
        raise InputError(f"{name}: padding_mode {conv.padding_mode!r} is not supported; only zeros")
    out_c, in_c = conv.weight.shape[:2]
    depthwise_w, pointwise_w = separable_factors(conv.weight, multiplier)
    depthwise = nn.Conv2d(in_c, in_c * multiplier, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=in_c, bias=False)
    pointwise = nn.Conv2d(in_c * multiplier, out_c, 1, bias=conv.bias is not None)
    depthwise.weight.data.copy_(depthwise_w)
    pointwise.weight.data.copy_(pointwise_w[:, :, None, None])
    if conv.bias is not None:
        pointwise.bias.data.copy_(conv.bias.detach())
    return SeparableConv2d(depthwise, pointwise)


def separable_weight(layer: SeparableConv2d) -> torch.Tensor:
    """The dense kxk weight the pair computes (for measuring the approximation)."""
    depthwise, pointwise = layer[0].weight.detach().double(), layer[1].weight.detach().double()[:, :, 0, 0]
    in_c = layer[0].in_channels
    m = depthwise.shape[0] // in_c
    d = depthwise.reshape(in_c, m, -1)  # (in, m, k²)
    p = pointwise.reshape(-1, in_c, m)  # (out, in, m)
    return torch.einsum("oim,imk->oik", p, d).reshape(pointwise.shape[0], in_c, *layer[0].kernel_size)


def substitute_separable(model: nn.Module, cfg: Separable) -> tuple[nn.Module, dict[str, float]]:
    """Replace the profitable kxk convs in scope, in place; returns the model and each layer's relative weight error."""
    errors = {}
    inside = [name for name, m in model.named_modules() if isinstance(m, SeparableConv2d)]
    for name, conv in list(cfg.scope.layers(model)):
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.kernel_size == (1, 1):
            continue
        if any(name.startswith(f"{p}.") for p in inside):
            continue
        out_c, in_c, kh, kw = conv.weight.shape
        if cfg.multiplier * (kh * kw + out_c) >= out_c * kh * kw:
            continue  # the pair would cost as much as the conv
        new = separable_conv(conv, min(cfg.multiplier, out_c, kh * kw), name)
        w = conv.weight.detach().double()
        errors[name] = float((separable_weight(new) - w).norm() / w.norm().clamp_min(1e-300))
        if name == "":
            return new, errors
        model.set_submodule(name, new)
    return model, errors


@method("separable", Separable, needs=("data?", "teacher?"))
class SeparableMethod:
    def torch(self, model: nn.Module, cfg: Separable, ctx: Context) -> nn.Module:
        return restructure_and_finetune(model, lambda m: substitute_separable(m, cfg)[0], cfg.finetune, cfg.distill, ctx)

    def restore(self, model: nn.Module, cfg: Separable, ctx: Context, saved: dict) -> nn.Module:
        return substitute_separable(copy.deepcopy(model), cfg)[0]
