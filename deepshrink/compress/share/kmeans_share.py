"""k-means weight sharing with codebook fine-tuning (Deep Compression, stage 2)."""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from deepshrink.compress.share.kmeans import kmeans_1d
from deepshrink.compress.share.shared import finetune_tied, tie
from deepshrink.core.config import Config, Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.train import TrainConfig


@dataclass(frozen=True)
class KMeansShare(Config):
    """Every layer in scope keeps 2^bits shared values (conv and linear set apart,
    as the paper found conv layers need more bits); pruned zeros stay zero.
    ``finetune`` trains the codebooks (and biases/BN) with the weights tied."""

    conv_bits: int = 8
    linear_bits: int = 5
    init: Literal["linear", "density", "random"] = "linear"
    scope: Scope = Scope()
    iters: int = 50
    seed: int = 0
    finetune: TrainConfig | None = None

    def __post_init__(self) -> None:
        for key in ("conv_bits", "linear_bits"):
            if not 1 <= getattr(self, key) <= 16:
                raise InputError(f"{key} must be in [1, 16], got {getattr(self, key)}")

    def bits_for(self, module: nn.Module) -> int:
        return self.conv_bits if isinstance(module, nn.Conv2d) else self.linear_bits


def tie_to_codebooks(model: nn.Module, cfg: KMeansShare) -> dict[str, int]:
    """Cluster each layer's non-zero weights and tie the layer to its codebook; returns codebook sizes."""
    sizes = {}
    for name, module in list(cfg.scope.layers(model)):
        weight = module.weight.detach()
        if not torch.isfinite(weight).all():
            raise InputError(f"layer {name!r} has NaN or infinite weights; cannot cluster them")
        keep = weight != 0
        if not keep.any():
            continue
        codebook, assignment = kmeans_1d(weight[keep], 2 ** cfg.bits_for(module), cfg.init, cfg.iters, cfg.seed)
        indices = torch.zeros(weight.numel(), dtype=torch.long)
        indices[keep.flatten()] = assignment
        tie(module, codebook, indices, keep)
        sizes[name] = codebook.numel()
    return sizes


@method("share", KMeansShare, needs=("data?",))
class KMeansShareMethod:
    def torch(self, model: nn.Module, cfg: KMeansShare, ctx: Context) -> nn.Module:
        tie_to_codebooks(model, cfg)
        return finetune_tied(model, cfg.finetune, ctx)
