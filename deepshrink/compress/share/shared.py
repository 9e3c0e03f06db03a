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


class CodebookWeight(nn.Module):
    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("indices", indices)
        self.register_buffer("keep", keep)
        self._initial_codebook = codebook

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        # where(), not a multiply by the mask: pruned weights must be +0.0, never -0.0.
        return torch.where(self.keep, codebook[self.indices], torch.zeros((), dtype=codebook.dtype))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return self._initial_codebook.clone()


def tie(module: nn.Module, codebook: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor) -> None:
    parametrize.register_parametrization(
        module, "weight", CodebookWeight(codebook, indices.view_as(module.weight), keep.view_as(module.weight))
    )


def codebook_of(module: nn.Module) -> torch.Tensor:
    return module.parametrizations.weight.original


def untie(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model
