"""HashedNets (Chen et al. 2015): a layer's weights drawn from a small bucket array.

Virtual weight i of a layer is ``sign(i) * bucket[h(i)]`` where ``h`` and
``sign`` are seeded hashes of the weight's position, so only the buckets are
trained and the assignment costs no storage: it is recomputed from the seed.
Buckets start at the mean of the (sign-corrected) pretrained weights hashed
into them, then fine-tune with the weights tied (same mechanism as k-means
codebooks).
"""

import copy
import json
from dataclasses import dataclass

import torch
from torch import nn

from deepshrink.compress.share.shared import finetune_tied, tie
from deepshrink.core.config import Config, Scope, check_range
from deepshrink.core.methods import Context, method
from deepshrink.encode.hashed import HASH, position_hash
from deepshrink.train import TrainConfig


@dataclass(frozen=True)
class HashShare(Config):
    """Keep ``bucket_fraction`` of each layer's weights as trainable buckets (1/8 -> 8x fewer values)."""

    bucket_fraction: float = 0.125
    seed: int = 0
    scope: Scope = Scope()
    finetune: TrainConfig | None = None

    def __post_init__(self) -> None:
        check_range("bucket_fraction", self.bucket_fraction, 1e-6, 1.0, high_inclusive=True)


HASH_SPECS = "hash_specs"  # model attribute and checkpoint key: {"<layer>.weight": {"buckets", "seed", "hash"}}


def hash_tie(model: nn.Module, cfg: HashShare) -> dict[str, int]:
    """Tie every layer in scope to its bucket array; returns bucket counts per layer. The model
    keeps each layer's hash spec (``model.hash_specs``), so ``pack`` stores buckets, not weights."""
    counts, specs = {}, {}
    for i, (name, module) in enumerate(list(cfg.scope.layers(model))):
        weight = module.weight.detach().flatten()
        buckets = max(1, int(round(cfg.bucket_fraction * weight.numel())))
        seed = cfg.seed * 1000 + i  # a distinct hash per layer
        index, sign = position_hash(weight.numel(), buckets, seed)
        totals = torch.zeros(buckets).index_add_(0, index, weight * sign)
        members = torch.bincount(index, minlength=buckets).clamp(min=1)
        tie(module, totals / members, index, torch.ones_like(weight, dtype=torch.bool), sign)
        counts[name] = buckets
        specs[f"{name}.weight"] = {"buckets": buckets, "seed": seed, "hash": HASH}
    setattr(model, HASH_SPECS, specs)
    return counts


@method("hash_share", HashShare, needs=("data?",))
class HashShareMethod:
    def torch(self, model: nn.Module, cfg: HashShare, ctx: Context) -> nn.Module:
        hash_tie(model, cfg)
        return finetune_tied(model, cfg.finetune, ctx)

    def saved(self, model: nn.Module) -> dict[str, str] | None:
        """The hash specs, so a resumed run still packs the layers as buckets."""
        specs = getattr(model, HASH_SPECS, None)
        return {HASH_SPECS: json.dumps(specs)} if specs else None

    def restore(self, model: nn.Module, cfg: HashShare, ctx: Context, saved: dict) -> nn.Module:
        model = copy.deepcopy(model)
        if saved.get(HASH_SPECS):
            setattr(model, HASH_SPECS, json.loads(saved[HASH_SPECS]))
        return model
