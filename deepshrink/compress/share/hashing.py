"""HashedNets (Chen et al. 2015): a layer's weights drawn from a small bucket array.

Virtual weight i of a layer is ``sign(i) * bucket[h(i)]`` where ``h`` and
``sign`` are seeded hashes of the weight's position, so only the buckets are
trained and the assignment costs no storage: it is recomputed from the seed.
Buckets start at the mean of the (sign-corrected) pretrained weights hashed
into them, then fine-tune with the weights tied (same mechanism as k-means
codebooks).
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepshrink.compress.share.shared import finetune_tied, tie
from deepshrink.core.config import Config, Scope, check_range
from deepshrink.core.methods import Context, method
from deepshrink.train import TrainConfig

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed 64-bit hash (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def position_hash(numel: int, buckets: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket index, +-1 sign) for positions 0..numel-1 under ``seed``."""
    with np.errstate(over="ignore"):
        keys = np.arange(numel, dtype=np.uint64) + np.uint64(seed) * _GOLDEN
        mixed = _mix64(keys)
    index = torch.from_numpy((mixed % np.uint64(buckets)).astype(np.int64))
    sign = torch.from_numpy(np.where((mixed >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32))
    return index, sign


@dataclass(frozen=True)
class HashShare(Config):
    """Keep ``bucket_fraction`` of each layer's weights as trainable buckets (1/8 -> 8x fewer values)."""

    bucket_fraction: float = 0.125
    seed: int = 0
    scope: Scope = Scope()
    finetune: TrainConfig | None = None

    def __post_init__(self) -> None:
        check_range("bucket_fraction", self.bucket_fraction, 1e-6, 1.0, high_inclusive=True)


def hash_tie(model: nn.Module, cfg: HashShare) -> dict[str, int]:
    """Tie every layer in scope to its bucket array; returns bucket counts per layer."""
    counts = {}
    for i, (name, module) in enumerate(list(cfg.scope.layers(model))):
        weight = module.weight.detach().flatten()
        buckets = max(1, int(round(cfg.bucket_fraction * weight.numel())))
        index, sign = position_hash(weight.numel(), buckets, cfg.seed * 1000 + i)  # a distinct hash per layer
        totals = torch.zeros(buckets).index_add_(0, index, weight * sign)
        members = torch.bincount(index, minlength=buckets).clamp(min=1)
        tie(module, totals / members, index, torch.ones_like(weight, dtype=torch.bool), sign)
        counts[name] = buckets
    return counts


@method("hash_share", HashShare, needs=("data?",))
class HashShareMethod:
    def torch(self, model: nn.Module, cfg: HashShare, ctx: Context) -> nn.Module:
        hash_tie(model, cfg)
        return finetune_tied(model, cfg.finetune, ctx)
