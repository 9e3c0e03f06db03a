"""Truncated SVD of an encoder's FFN and attention projections.

``W [out, in] ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T)``: a Linear becomes two, of
ranks ``r``, which saves weights only when ``r (in + out) < in * out``; a layer
where it would not is left alone and reported. Do this after head/neuron
pruning, which expects plain Linear projections. The factorisation and the rank
choice are compress/lowrank's (``svd_linear``, ``LowRankLinear``, ``energy_rank``).
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from deepshrink.compress.lowrank.layers import linear_singular_values, svd_linear
from deepshrink.compress.lowrank.rank import energy_rank, fraction_rank
from deepshrink.core.config import Config, check_range
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.core.modules import replace_module
from deepshrink.transformers.prune import attention_blocks, ffn_blocks

Target = Literal["ffn", "attention"]


@dataclass(frozen=True)
class TransformerSVD(Config):
    """Keep ``rank_fraction`` of each target layer's full rank ``min(in, out)``, or, with
    ``energy`` set, the smallest rank holding that fraction of the squared singular values."""

    rank_fraction: float = 0.5
    energy: float | None = None
    targets: tuple[Target, ...] = ("ffn",)

    def __post_init__(self) -> None:
        check_range("rank_fraction", self.rank_fraction, 0.0, 1.0, high_inclusive=True)
        if self.rank_fraction == 0:
            raise InputError("rank_fraction must be > 0")
        if self.energy is not None:
            check_range("energy", self.energy, 0.0, 1.0, high_inclusive=True)
        bad = [t for t in self.targets if t not in ("ffn", "attention")]
        if bad or not self.targets:
            raise InputError(f"targets: need some of ['ffn', 'attention'], got {list(self.targets)}")


def choose_rank(layer: nn.Linear, cfg: TransformerSVD) -> int:
    """``rank_fraction`` of the full rank, or the energy rank: compress/lowrank's rank choice."""
    if cfg.energy is None:
        return fraction_rank(min(layer.weight.shape), cfg.rank_fraction)
    return energy_rank(linear_singular_values(layer), cfg.energy)


def target_layers(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the FFN and/or attention projections of a BERT-like model."""
    names = {id(m): n for n, m in model.named_modules()}
    layers: list[nn.Module] = []
    if "attention" in targets:
        for b in attention_blocks(model):
            layers += [b.attn.query, b.attn.key, b.attn.value, b.out]
    if "ffn" in targets:
        for b in ffn_blocks(model):
            layers += [b.up, b.down]
    return [names[id(m)] for m in layers if isinstance(m, nn.Linear)]


def decompose_transformer(model: nn.Module, cfg: TransformerSVD) -> tuple[nn.Module, dict[str, int | None]]:
    """Factorise the target layers in place; returns ``{layer: rank, or None where it would not save weights}``."""
    names = target_layers(model, cfg.targets)
    if not names:
        raise InputError(f"no BERT-style {' or '.join(cfg.targets)} projections found in {type(model).__name__}")
    ranks: dict[str, int | None] = {}
    for name in names:
        layer = model.get_submodule(name)
        rank = choose_rank(layer, cfg)
        saves = rank * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features
        ranks[name] = rank if saves else None
        if saves:
            replace_module(model, name, svd_linear(layer, rank, name))
    return model, ranks


@method("transformer_svd", TransformerSVD)
class TransformerSVDMethod:
    def torch(self, model: nn.Module, cfg: TransformerSVD, ctx: Context) -> nn.Module:
        return decompose_transformer(model.eval(), cfg)[0]

    def restore(self, model: nn.Module, cfg: TransformerSVD, ctx: Context, saved: dict) -> nn.Module:
        return self.torch(copy.deepcopy(model), cfg, ctx)  # no data: deterministic from the weights
