"""Block-wise 4-bit weight-only quantization of Linear layers, as ONNX Runtime's ``MatMulNBits`` runs it.

Each output channel's weights are cut into blocks of ``block_size`` input
features (32, 64 or 128); each block has its own fp32 scale and, when
asymmetric, its own 4-bit zero point: ``w ~= (q - zero) * scale`` with
``q`` in 0..15 (symmetric: zero 8, codes 1..15). ``search`` tries clipping
the block's range and keeps, per block, the scale with the smallest squared
error. Activations stay fp32, so the torch model that holds the dequantized
weights computes what ORT computes (up to summation order).
"""

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deepshrink.core.config import Config, Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method, method
from deepshrink.core.modules import check_layer_names, replace_module

BLOCK_SIZES = (32, 64, 128)
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@dataclass(frozen=True)
class Blockwise4(Config):
    """4-bit weights in blocks of ``block_size`` along the input features; ``fallback`` layers stay as they are."""

    scope: Scope = Scope(types=("Linear",))
    block_size: int = 32
    symmetric: bool = True
    search: bool = False
    fallback: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise InputError(f"block_size must be one of {list(BLOCK_SIZES)}, got {self.block_size}")


@dataclass(frozen=True)
class Blocks4:
    """Codes ``[out, blocks, block_size]`` (0..15, padded with zero codes), scales and zero points ``[out, blocks]``."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    in_features: int

    def dequantized(self) -> Tensor:
        w = (self.codes.float() - self.zero.float()[..., None]) * self.scale[..., None]
        return w.reshape(w.shape[0], -1)[:, : self.in_features]


def _blocks(weight: Tensor, block_size: int) -> Tensor:
    out, k = weight.shape
    padded = torch.zeros(out, -(-k // block_size) * block_size, dtype=torch.float32)
    padded[:, :k] = weight.detach().float()
    return padded.reshape(out, -1, block_size)


def _encode(blocks: Tensor, low: Tensor, high: Tensor, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, scale, zero) of each block for the range [low, high]."""
    if symmetric:
        scale = torch.maximum(high.abs(), low.abs()) / 7
        zero = torch.full_like(scale, 8.0)
    else:
        low, high = low.clamp(max=0.0), high.clamp(min=0.0)
        scale = (high - low) / 15
        zero = torch.round(-low / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, 15)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(blocks / scale[..., None]) + zero[..., None], 0, 15)
    return codes, scale, zero


def quantize_blocks(weight: Tensor, block_size: int = 32, symmetric: bool = True, search: bool = False) -> Blocks4:
    """Block-wise 4-bit codes of a ``[out, in]`` weight (round to nearest; ``search``: per-block clip with least error)."""
    if weight.dim() != 2:
        raise InputError(f"4-bit weight quantization needs a 2-d weight, got shape {tuple(weight.shape)}")
    blocks = _blocks(weight, block_size)
    low, high = blocks.amin(dim=2), blocks.amax(dim=2)
    best, best_error = None, None
    for ratio in CLIP_GRID if search else CLIP_GRID[:1]:
        codes, scale, zero = _encode(blocks, low * ratio, high * ratio, symmetric)
        error = ((codes - zero[..., None]) * scale[..., None] - blocks).pow(2).sum(dim=2)
        if best is None:
            best, best_error = [codes, scale, zero], error
            continue
        better = error < best_error
        best[0] = torch.where(better[..., None], codes, best[0])
        best[1], best[2] = torch.where(better, scale, best[1]), torch.where(better, zero, best[2])
        best_error = torch.minimum(error, best_error)
    codes, scale, zero = best
    return Blocks4(codes.to(torch.uint8), scale.float(), zero.to(torch.uint8), weight.shape[1])


class Blockwise4Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is the dequantized 4-bit weight; ``blocks`` holds the codes to export."""

    def __init__(self, linear: nn.Linear, blocks: Blocks4, block_size: int, symmetric: bool) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.blocks, self.block_size, self.symmetric = blocks, block_size, symmetric
        with torch.no_grad():
            self.weight.copy_(blocks.dequantized())
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        self.eval()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, 4-bit blocks of {self.block_size}, {'symmetric' if self.symmetric else 'asymmetric'}"


def blockwise4_targets(model: nn.Module, cfg: Blockwise4) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if name and isinstance(m, nn.Linear) and cfg.scope.matches(name, m) and name not in cfg.fallback
    ]


def quantize_layers_4bit(model: nn.Module, names: list[str], cfg: Blockwise4) -> nn.Module:
    """Swap the named Linear layers (in place) for their 4-bit versions."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or isinstance(linear, Blockwise4Linear):
            raise InputError(f"layer {name!r} is a {type(linear).__name__}; 4-bit weights take a float nn.Linear")
        blocks = quantize_blocks(linear.weight, cfg.block_size, cfg.symmetric, cfg.search)
        replace_module(model, name, Blockwise4Linear(linear, blocks, cfg.block_size, cfg.symmetric))
    return model


@method("weight_int4", Blockwise4, quantizes=True)
class Blockwise4Method:
    def torch(self, model: nn.Module, cfg: Blockwise4, ctx: Context) -> nn.Module:
        check_layer_names(model, cfg.fallback, "fallback")
        return quantize_layers_4bit(model.eval(), blockwise4_targets(model, cfg), cfg)

    def restore(self, model: nn.Module, cfg: Blockwise4, ctx: Context, saved: dict) -> nn.Module:
        return self.torch(copy.deepcopy(model), cfg, ctx)  # no data: deterministic from the weights


def quantize_blockwise4(model: nn.Module, cfg: Blockwise4 | None = None) -> nn.Module:
    """A copy of ``model`` with 4-bit block-wise weights in its Linear layers (the caller's model is untouched)."""
    return apply_method(model, cfg or Blockwise4())


def blockwise4_layers(model: nn.Module) -> dict[str, Blockwise4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Blockwise4Linear)}
