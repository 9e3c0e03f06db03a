"""Pruning: masks, importance, unstructured and schedules."""

from deepshrink.compress.prune.masks import MaskHook, apply_masks, magnitude_masks, sparsity_of
from deepshrink.compress.prune.schedules import GradualPruningHook, agp_fraction
from deepshrink.compress.prune.unstructured import MagnitudePrune

__all__ = ["GradualPruningHook", "MagnitudePrune", "MaskHook", "agp_fraction", "apply_masks", "magnitude_masks", "sparsity_of"]
