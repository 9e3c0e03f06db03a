"""Tied weights for codebook fine-tuning.

A shared layer's weight is ``codebook[indices]`` (zero where pruned). It is a
``torch.nn.utils.parametrize`` parametrization whose trainable tensor is the
codebook itself, so autograd gives each shared value the sum of the gradients
of the weights that use it: exactly Deep Compression's centroid update, and the
weights stay tied through training. ``untie`` bakes the values into an ordinary
weight tensor.
"""

import torch
from torch import nn
from torch.nn.utils import parametrize

from deepshrink.core.errors import InputError
from deepshrink.train import Trainer


class CodebookWeight(nn.Module):
    """weight = sign * codebook[indices] where kept, +0.0 elsewhere (``sign`` is HashedNets' sign hash)."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor, sign: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("indices", indices)
        self.register_buffer("keep", keep)
        self.register_buffer("sign", sign)
        self._initial_codebook = codebook

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        # index_select, not codebook[indices]: its backward (index_add) sums each shared value's gradients in a
        # fixed order, where indexing's backward accumulates from several threads in whatever order they run.
        values = codebook.index_select(0, self.indices.flatten()).view(self.indices.shape)
        if self.sign is not None:
            values = values * self.sign
        # where(), not a multiply by the mask: pruned weights must be +0.0, never -0.0.
        return torch.where(self.keep, values, torch.zeros((), dtype=codebook.dtype))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return self._initial_codebook.clone()


def tie(module: nn.Module, codebook: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor, sign: torch.Tensor | None = None) -> None:
    shape = module.weight.shape
    sign = None if sign is None else sign.view(shape)
    parametrize.register_parametrization(module, "weight", CodebookWeight(codebook, indices.view(shape), keep.view(shape), sign))


def codebook_of(module: nn.Module) -> torch.Tensor:
    return module.parametrizations.weight.original


def finetune_tied(model: nn.Module, finetune, ctx) -> nn.Module:
    """Train the shared values (weights stay tied) if ``finetune`` is set, then untie."""
    if finetune is not None:
        if ctx.data is None:
            raise InputError("fine-tuning shared weights needs data: pass data= (a DataBundle)")
        Trainer(model, finetune, ctx.data.train, ctx.data.val, progress=ctx.progress).fit()
    return untie(model)


def untie(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            # That re-registers ``weight`` after ``bias``: restore the layer's own order so the state dict
            # (and every archive written from it) is the same as the untouched model's.
            params = module._parameters
            rest = {k: v for k, v in params.items() if k != "weight"}
            weight = params.pop("weight")
            params.clear()
            params.update({"weight": weight, **rest})
    return model
