"""Pruning: masks, importance, unstructured and schedules."""

from deepshrink.compress.prune.dependency import ChannelGroup, Member, channel_groups
from deepshrink.compress.prune.importance import channel_scores
from deepshrink.compress.prune.masks import MaskHook, apply_masks, magnitude_masks, sparsity_of
from deepshrink.compress.prune.schedules import GradualPruningHook, agp_fraction
from deepshrink.compress.prune.structured import ChannelPrune, prune_channels, remove_blocks, select_channels
from deepshrink.compress.prune.unstructured import MagnitudePrune

__all__ = [
    "ChannelGroup",
    "ChannelPrune",
    "GradualPruningHook",
    "MagnitudePrune",
    "MaskHook",
    "Member",
    "agp_fraction",
    "apply_masks",
    "channel_groups",
    "channel_scores",
    "magnitude_masks",
    "prune_channels",
    "remove_blocks",
    "select_channels",
    "sparsity_of",
]
