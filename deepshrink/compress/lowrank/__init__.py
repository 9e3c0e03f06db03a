"""Low-rank factorisation: truncated SVD of Linear, Tucker-2 and CP of Conv2d, rank selection."""

from deepshrink.compress.lowrank.decompose import (
    Decompose,
    LayerDecomposition,
    decompose_model,
    decompose_required,
    dense_weight,
)
from deepshrink.compress.lowrank.layers import (
    CPConv2d,
    LowRankLinear,
    TuckerConv2d,
    cp_conv,
    cp_factors,
    cp_reconstruct,
    exact_cp_rank,
    svd_linear,
    tucker2_factors,
    tucker_conv,
    unfold,
)
from deepshrink.compress.lowrank.rank import cp_rank_for, energy_rank, svd_rank_for, tucker_ranks_for, vbmf_rank

__all__ = [
    "CPConv2d",
    "Decompose",
    "LayerDecomposition",
    "LowRankLinear",
    "TuckerConv2d",
    "cp_conv",
    "cp_factors",
    "cp_rank_for",
    "cp_reconstruct",
    "decompose_model",
    "decompose_required",
    "dense_weight",
    "energy_rank",
    "exact_cp_rank",
    "svd_linear",
    "svd_rank_for",
    "tucker2_factors",
    "tucker_conv",
    "tucker_ranks_for",
    "unfold",
    "vbmf_rank",
]
