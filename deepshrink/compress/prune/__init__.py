"""Pruning: masks, importance, unstructured, N:M, lottery tickets, regularisers and schedules."""

from deepshrink.compress.prune.dependency import ChannelGroup, Member, channel_groups
from deepshrink.compress.prune.importance import channel_scores
from deepshrink.compress.prune.lottery import LotteryResult, LotteryTicket, find_ticket, rewind, round_sparsities, surviving_magnitude_masks
from deepshrink.compress.prune.masks import MaskHook, apply_masks, magnitude_masks, sparsity_of
from deepshrink.compress.prune.nm import NMPrune, nm_mask, nm_masks, satisfies_nm
from deepshrink.compress.prune.regularizers import BNScaleL1Regularizer, GroupLassoRegularizer, L1Regularizer, Regularize
from deepshrink.compress.prune.schedules import GradualPruningHook, agp_fraction
from deepshrink.compress.prune.structured import ChannelPrune, prune_channels, remove_blocks, select_channels
from deepshrink.compress.prune.unstructured import MagnitudePrune

__all__ = [
    "BNScaleL1Regularizer",
    "ChannelGroup",
    "ChannelPrune",
    "GradualPruningHook",
    "GroupLassoRegularizer",
    "L1Regularizer",
    "Regularize",
    "LotteryResult",
    "LotteryTicket",
    "MagnitudePrune",
    "MaskHook",
    "Member",
    "NMPrune",
    "agp_fraction",
    "apply_masks",
    "channel_groups",
    "channel_scores",
    "find_ticket",
    "magnitude_masks",
    "nm_mask",
    "nm_masks",
    "prune_channels",
    "remove_blocks",
    "rewind",
    "round_sparsities",
    "satisfies_nm",
    "select_channels",
    "sparsity_of",
    "surviving_magnitude_masks",
]
