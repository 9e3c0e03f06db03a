"""Sparsity regularisers as training hooks: an extra loss term that pushes the
weights that pruning will remove towards zero *before* they are removed, so the
cut costs less accuracy.

- ``L1Regularizer``: sum of |w| over the layers in scope; favours many small weights
  (unstructured magnitude pruning).
- ``GroupLassoRegularizer``: sum over every output channel of the L2 norm of its
  filter (Wen et al. 2016); its gradient shrinks a whole filter at once, so entire
  channels approach zero (channel pruning).
- ``BNScaleL1Regularizer``: L1 on BatchNorm gammas (Network Slimming, Liu et al.
  2017); channels whose gamma reaches zero are pruned by ``importance="bn_scale"``.

Each hook adds ``strength * penalty()`` to the training loss; ``penalty()`` is
exposed unscaled for logging and tests. ``Regularize`` is the config a recipe
step names (``finetune: {regularize: {kind: bn_scale, strength: 1e-4}}``); its
``hook(model)`` builds the hook.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deepshrink.core.config import Config, Scope
from deepshrink.core.errors import InputError
from deepshrink.train import TrainHook


class _Regularizer(TrainHook):
    """Holds the parameters a penalty reads; subclasses define ``penalty``."""

    def __init__(self, params: list[nn.Parameter], strength: float, what: str) -> None:
        if not strength >= 0:
            raise InputError(f"regulariser strength must be >= 0, got {strength}")
        if not params:
            raise InputError(f"no {what} to regularise")
        self.params, self.strength = params, strength

    def penalty(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_loss(self, trainer, inputs: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        return self.strength * self.penalty() if self.strength else None


def _weights(model: nn.Module, scope: Scope | None) -> list[nn.Parameter]:
    return [module.weight for _, module in (scope or Scope()).layers(model)]


class L1Regularizer(_Regularizer):
    """strength * sum |w| over the weights of the layers in scope."""

    def __init__(self, model: nn.Module, strength: float, scope: Scope | None = None) -> None:
        super().__init__(_weights(model, scope), strength, f"layers in scope {scope or Scope()}")

    def penalty(self) -> torch.Tensor:
        return sum(w.abs().sum() for w in self.params)


class GroupLassoRegularizer(_Regularizer):
    """strength * sum over output channels of ||filter||_2 (a Linear's rows, a conv's (in, kh, kw) filters)."""

    def __init__(self, model: nn.Module, strength: float, scope: Scope | None = None) -> None:
        super().__init__(_weights(model, scope), strength, f"layers in scope {scope or Scope()}")

    def penalty(self) -> torch.Tensor:
        # vector_norm's gradient at an all-zero filter is 0, so channels already at zero stay finite.
        return sum(torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).sum() for w in self.params)


class BNScaleL1Regularizer(_Regularizer):
    """strength * sum |gamma| over every affine BatchNorm of the model."""

    def __init__(self, model: nn.Module, strength: float) -> None:
        gammas = [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
        super().__init__(gammas, strength, f"affine BatchNorm layers in {type(model).__name__}")

    def penalty(self) -> torch.Tensor:
        return sum(g.abs().sum() for g in self.params)


@dataclass(frozen=True)
class Regularize(Config):
    """A sparsity regulariser for training: ``l1`` (weights), ``group_lasso`` (output
    channels) or ``bn_scale`` (BatchNorm gammas; ``scope`` does not apply)."""

    kind: Literal["l1", "group_lasso", "bn_scale"] = "l1"
    strength: float = 1e-4
    scope: Scope = Scope()

    def __post_init__(self) -> None:
        if self.kind not in ("l1", "group_lasso", "bn_scale"):
            raise InputError(f"kind: {self.kind!r} is not one of ['l1', 'group_lasso', 'bn_scale']")
        if not self.strength >= 0:
            raise InputError(f"strength must be >= 0, got {self.strength}")

    def hook(self, model: nn.Module) -> TrainHook:
        if self.kind == "bn_scale":
            return BNScaleL1Regularizer(model, self.strength)
        return {"l1": L1Regularizer, "group_lasso": GroupLassoRegularizer}[self.kind](model, self.strength, self.scope)
