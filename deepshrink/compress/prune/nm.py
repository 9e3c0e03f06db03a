"""N:M semi-structured sparsity (e.g. 2:4): in every group of M consecutive
weights along a layer's input dimension, only the N largest magnitudes survive.

Unlike free-form sparsity, the fixed pattern is what sparse tensor cores (and
some CPU kernels) can exploit, at a fixed sparsity of 1 - N/M. Groups run over
a filter's flattened ``(in, kh, kw)`` weights for Conv2d and over
``in_features`` for Linear, so every output row holds exactly ``rows / M * N``
non-zeros. The masks are ordinary keep-masks: ``MaskHook`` holds them during
fine-tuning exactly as for magnitude pruning.
"""

from dataclasses import dataclass

import torch
from torch import nn

from deepshrink.compress.prune.masks import MaskHook, Masks, keep_pruned, zero_masks
from deepshrink.compress.prune.unstructured import _finetune
from deepshrink.core.config import Config, Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.train import TrainConfig


def check_nm(n: int, m: int) -> None:
    """Raise InputError unless 1 <= n < m (n == m would prune nothing)."""
    if n < 1 or n >= m:
        raise InputError(f"n must be in [1, m) for N:M sparsity (keep n of every m weights), got {n}:{m}")


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """The weight as (outputs, inputs per output): a conv filter's (in, kh, kw) flattened."""
    return weight.reshape(weight.shape[0], -1)


def nm_mask(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Keep-mask of ``weight``'s shape keeping the ``n`` largest magnitudes in each group of ``m``.

    Ties keep the earlier position (stable sort), so equal weights give a deterministic mask.
    """
    check_nm(n, m)
    rows = _rows(weight.detach())
    if rows.shape[1] % m:
        raise InputError(f"layer {name!r} has {rows.shape[1]} input weights per output, not divisible by M={m}; exclude it from the scope")
    if not torch.isfinite(rows).all():
        raise InputError(f"layer {name!r} has NaN or infinite weights; cannot rank them by magnitude")
    groups = rows.abs().reshape(-1, m)
    keep = groups.argsort(dim=1, descending=True, stable=True)[:, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return mask.view_as(weight)


def nm_masks(model: nn.Module, n: int, m: int, scope: Scope | None = None) -> Masks:
    """N:M keep-masks for every layer in ``scope`` (default: all Conv2d and Linear)."""
    check_nm(n, m)
    scope = scope or Scope()
    masks = {name: nm_mask(module.weight, n, m, name) for name, module in scope.layers(model)}
    if not masks:
        raise InputError(f"no layers in scope {scope}")
    return masks


def satisfies_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` along the input dimension holds at most ``n`` non-zeros."""
    rows = _rows(weight.detach())
    return rows.shape[1] % m == 0 and bool(((rows != 0).reshape(-1, m).sum(1) <= n).all())


@dataclass(frozen=True)
class NMPrune(Config):
    """Apply N:M masks (sparsity 1 - n/m in every layer in scope), optionally fine-tune with them held."""

    n: int = 2
    m: int = 4
    scope: Scope = Scope()
    finetune: TrainConfig | None = None

    def __post_init__(self) -> None:
        check_nm(self.n, self.m)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m


@method("nm_prune", NMPrune, needs=("data?",))
class NMPruneMethod:
    def torch(self, model: nn.Module, cfg: NMPrune, ctx: Context) -> nn.Module:
        hook = MaskHook(model, keep_pruned(nm_masks(model, cfg.n, cfg.m, cfg.scope), zero_masks(model)))
        if cfg.finetune is not None:
            _finetune(model, cfg.finetune, hook, ctx)
        return hook.finalize()
