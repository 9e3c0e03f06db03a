"""Folding BatchNorm into the convolution or linear layer that feeds it.

In eval mode a BatchNorm is an affine map per channel, y = gamma * (x - mean) /
sqrt(var + eps) + beta, so it can be absorbed into the preceding layer's weight
and bias: one layer less at run time, and the weights that get quantized are
the ones the model actually uses (quantizing before folding would scale the
rounding error by gamma / std).
"""

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from deepshrink.core.config import Config
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.core.modules import replace_module

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for data-dependent control flow
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot trace {type(model).__name__} with torch.fx to find conv/linear + BatchNorm pairs ({first})") from None


def _matches(layer: nn.Module, bn: _BatchNorm) -> bool:
    """Same channel count, and a BN of the right dimensionality with running statistics to fold."""
    if bn.running_mean is None or bn.running_var is None:
        return False
    if isinstance(layer, nn.Linear):
        return isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.out_features
    expected = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}[type(layer)]
    return isinstance(bn, expected) and bn.num_features == layer.out_channels


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv_or_linear_name, bn_name) pairs where the BN consumes that layer's output and nothing else does.

    Modules called more than once are left out: folding would change their other calls too.
    """
    graph = _trace(model)
    modules = dict(graph.named_modules())
    calls: dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm) or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        layer, bn = modules[source.target], modules[node.target]
        if type(layer) not in (*CONVS, nn.Linear):  # exact types: a subclass may compute something else
            continue
        if calls[source.target] == 1 and calls[node.target] == 1 and _matches(layer, bn):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def _fold_into(layer: nn.Conv2d | nn.Linear, bn: _BatchNorm) -> None:
    """W' = W * gamma / std per output channel, b' = (b - mean) * gamma / std + beta (computed in float64)."""
    weight = layer.weight.double()
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    new_bias = (bias - bn.running_mean.double()) * factor + beta
    layer.weight.copy_(new_weight.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
    else:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every foldable BatchNorm folded into its conv/linear and replaced by
    nn.Identity; other BatchNorms stay. The caller's model is not modified."""
    folded = copy.deepcopy(model).eval()
    for layer_name, bn_name in foldable_pairs(folded):
        _fold_into(folded.get_submodule(layer_name), folded.get_submodule(bn_name))
        replace_module(folded, bn_name, nn.Identity())
    return folded


@dataclass(frozen=True)
class FoldBN(Config):
    """Fold every foldable BatchNorm into the conv/linear layer before it (no options:
    the fold is exact in eval mode, so there is nothing to choose)."""


@method("fold_bn", FoldBN)
class FoldBNMethod:
    def torch(self, model: nn.Module, cfg: FoldBN, ctx: Context) -> nn.Module:
        return fold_batchnorm(model)

    def restore(self, model: nn.Module, cfg: FoldBN, ctx: Context, saved: dict) -> nn.Module:
        return fold_batchnorm(model)  # BatchNorms become Identity: the checkpoint has no BN entries
