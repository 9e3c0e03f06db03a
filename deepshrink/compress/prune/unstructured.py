"""Unstructured magnitude pruning with one-shot, iterative or gradual (AGP) schedules."""

from dataclasses import dataclass, replace
from typing import Literal

from torch import nn

from deepshrink.compress.prune.masks import MaskHook, keep_pruned, magnitude_masks, zero_masks
from deepshrink.compress.prune.schedules import GradualPruningHook
from deepshrink.core.config import Config, Scope, check_range
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.train import TrainConfig, Trainer


@dataclass(frozen=True)
class MagnitudePrune(Config):
    """Zero the smallest weights. ``layer_sparsity`` overrides ``sparsity`` per layer name.

    ``schedule``: ``oneshot`` prunes then fine-tunes; ``iterative`` repeats prune ->
    fine-tune ``iterations`` times on a rising sparsity; ``agp`` raises sparsity along
    the cubic schedule during the first ``agp_fraction`` of fine-tuning.
    """

    sparsity: float
    granularity: Literal["layer", "global"] = "layer"
    scope: Scope = Scope()
    layer_sparsity: dict[str, float] | None = None
    schedule: Literal["oneshot", "iterative", "agp"] = "oneshot"
    iterations: int = 3
    agp_fraction: float = 0.7
    finetune: TrainConfig | None = None

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0)
        for name, value in (self.layer_sparsity or {}).items():
            check_range(f"layer_sparsity.{name}", value, 0.0, 1.0)
        if self.granularity == "global" and self.layer_sparsity:
            raise InputError(
                "layer_sparsity sets per-layer targets, which granularity 'global' replaces by one threshold; use one of the two"
            )
        check_range("agp_fraction", self.agp_fraction, 0.0, 1.0, high_inclusive=True)
        if self.iterations < 1:
            raise InputError(f"iterations must be >= 1, got {self.iterations}")
        if self.schedule != "oneshot" and self.finetune is None:
            raise InputError(f"schedule {self.schedule!r} prunes while fine-tuning: set finetune")

    def masks_at(self, model: nn.Module, fraction: float = 1.0):
        """Masks for ``fraction`` of the target sparsity (every layer's target scaled alike)."""
        layers = {k: v * fraction for k, v in (self.layer_sparsity or {}).items()}
        return magnitude_masks(model, self.sparsity * fraction, self.scope, self.granularity, layers)


def _finetune(model: nn.Module, config: TrainConfig, hook: MaskHook, ctx: Context) -> None:
    if ctx.data is None:
        raise InputError("fine-tuning needs data: pass data= (a DataBundle)")
    Trainer(model, config, ctx.data.train, ctx.data.val, hooks=[hook], progress=ctx.progress).fit()


@method("prune", MagnitudePrune, needs=("data?",))
class MagnitudePruneMethod:
    def torch(self, model: nn.Module, cfg: MagnitudePrune, ctx: Context) -> nn.Module:
        pruned = zero_masks(model)  # what an earlier step pruned stays pruned
        if cfg.schedule == "agp":
            steps = cfg.finetune.epochs * -(-len(ctx.data.train) // cfg.finetune.batch_size) if ctx.data else 0
            end = int(cfg.agp_fraction * steps)

            def masks(fraction: float):
                return keep_pruned(cfg.masks_at(model, fraction), pruned)

            hook = GradualPruningHook(model, masks, start=0, end=end, frequency=max(1, end // 50))
            _finetune(model, cfg.finetune, hook, ctx)
            return hook.finalize()
        rounds = cfg.iterations if cfg.schedule == "iterative" else 1
        for i in range(1, rounds + 1):
            hook = MaskHook(model, keep_pruned(cfg.masks_at(model, i / rounds), pruned))
            if cfg.finetune is not None:
                _finetune(model, replace(cfg.finetune, seed=cfg.finetune.seed + i - 1), hook, ctx)
            hook.finalize()
        return model
