"""Structural rewrites that change a model's layers but not its function: BatchNorm folding
(and, later, depthwise-separable substitution)."""

from deepshrink.compress.structure.fold import FoldBN, fold_batchnorm, foldable_pairs
from deepshrink.compress.structure.separable import Separable, SeparableConv2d, separable_conv, separable_weight, substitute_separable

__all__ = ["FoldBN", "fold_batchnorm", "foldable_pairs"]
__all__ += ["Separable", "SeparableConv2d", "separable_conv", "separable_weight", "substitute_separable"]
