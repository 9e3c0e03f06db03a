"""Factorised layers and the factorisations that initialise them.

Each factorised layer is an ``nn.Sequential`` of plain ``Linear``/``Conv2d``
layers, so MAC counting, ONNX export and ONNX Runtime see ordinary ops; the
subclass names only mark a layer as already factorised. Factors are computed
in float64 and cast back, so a full-rank factorisation is exact to float32
rounding.
"""

import math

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac
from torch import nn

from deepshrink.core.errors import InputError


class LowRankLinear(nn.Sequential):
    """``Linear(in, r, bias=False)`` then ``Linear(r, out)``: W ≈ (U·√S)(√S·Vᵀ)."""


class TuckerConv2d(nn.Sequential):
    """Tucker-2: 1x1 (in -> r_in), kxk core (r_in -> r_out, the original stride/padding), 1x1 (r_out -> out)."""


class CPConv2d(nn.Sequential):
    """CP (Lebedev et al. 2015): 1x1 (in -> R), depthwise kx1, depthwise 1xk, 1x1 (R -> out)."""


FACTORISED = (LowRankLinear, TuckerConv2d, CPConv2d)


def _check_conv(name: str, conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise InputError(f"{name}: grouped convolutions (groups={conv.groups}) are not decomposed; exclude the layer")
    if conv.padding_mode != "zeros":
        raise InputError(f"{name}: padding_mode {conv.padding_mode!r} is not supported; only zeros")


def _copy_bias(target: nn.Module, source: nn.Module) -> None:
    if source.bias is not None:
        target.bias.data.copy_(source.bias.detach())


# -- SVD of Linear --------------------------------------------------------------------------
def linear_singular_values(layer: nn.Linear) -> torch.Tensor:
    return torch.linalg.svdvals(layer.weight.detach().double())


def svd_linear(layer: nn.Linear, rank: int, name: str = "layer") -> LowRankLinear:
    """Truncated SVD of the weight, split evenly (√S on both sides) so both factors train alike."""
    out_features, in_features = layer.weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise InputError(f"{name}: SVD rank must be in [1, {min(out_features, in_features)}], got {rank}")
    u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(in_features, rank, bias=False)
    second = nn.Linear(rank, out_features, bias=layer.bias is not None)
    first.weight.data.copy_(root[:, None] * vh[:rank])
    second.weight.data.copy_(u[:, :rank] * root)
    _copy_bias(second, layer)
    return LowRankLinear(first, second)


# -- Tucker-2 of Conv2d ---------------------------------------------------------------------
def unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-n unfolding: the mode's index on rows, everything else on columns."""
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


def _leading_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.linalg.svd(matrix, full_matrices=False)[0][:, :rank]


def tucker2_factors(weight: torch.Tensor, ranks: tuple[int, int], iters: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(core (r_out, r_in, kh, kw), U_out (out, r_out), U_in (in, r_in)): HOSVD, then ``iters`` HOOI sweeps."""
    w = weight.detach().double()
    r_out, r_in = ranks
    u_out, u_in = _leading_vectors(unfold(w, 0), r_out), _leading_vectors(unfold(w, 1), r_in)
    for _ in range(iters):  # HOOI: each factor from the weight projected on the other
        u_out = _leading_vectors(unfold(torch.einsum("oihw,ir->orhw", w, u_in), 0), r_out)
        u_in = _leading_vectors(unfold(torch.einsum("oihw,os->sihw", w, u_out), 1), r_in)
    core = torch.einsum("oihw,os,ir->srhw", w, u_out, u_in)
    return core, u_out, u_in


def tucker_conv(conv: nn.Conv2d, ranks: tuple[int, int], iters: int = 0, name: str = "layer") -> TuckerConv2d:
    _check_conv(name, conv)
    out_c, in_c = conv.weight.shape[:2]
    r_out, r_in = ranks
    if not (1 <= r_out <= out_c and 1 <= r_in <= in_c):
        raise InputError(f"{name}: Tucker ranks must be in [1, {out_c}] x [1, {in_c}], got ({r_out}, {r_in})")
    core, u_out, u_in = tucker2_factors(conv.weight, ranks, iters)
    first = nn.Conv2d(in_c, r_in, 1, bias=False)
    middle = nn.Conv2d(r_in, r_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False)
    last = nn.Conv2d(r_out, out_c, 1, bias=conv.bias is not None)
    first.weight.data.copy_(u_in.T[:, :, None, None])
    middle.weight.data.copy_(core)
    last.weight.data.copy_(u_out[:, :, None, None])
    _copy_bias(last, conv)
    return TuckerConv2d(first, middle, last)


# -- CP of Conv2d ---------------------------------------------------------------------------
def exact_cp_rank(shape: tuple[int, ...]) -> int:
    """Terms of the trivial exact CP decomposition: one per index tuple of the three smallest modes."""
    return math.prod(shape) // max(shape)


def _exact_cp(w: torch.Tensor) -> list[torch.Tensor]:
    """Exact CP with one rank-1 term per index of all modes but the largest (one-hot factors there)."""
    free = int(np.argmax(w.shape))
    others = [m for m in range(4) if m != free]
    rank = exact_cp_rank(tuple(w.shape))
    factors: list[torch.Tensor] = [torch.empty(0)] * 4
    grids = torch.meshgrid(*[torch.arange(w.shape[m]) for m in others], indexing="ij")
    for mode, index in zip(others, grids, strict=True):
        factors[mode] = nn.functional.one_hot(index.flatten(), w.shape[mode]).double().T  # (dim, rank)
    factors[free] = w.movedim(free, -1).reshape(rank, w.shape[free]).T  # the fiber of each index tuple
    return factors


def _balanced(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give each term's four factor columns the same norm (the 4th root of their product): better for fine-tuning."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (4, rank)
    scale = norms.prod(0).clamp_min(1e-30) ** 0.25
    return [f / norms[i].clamp_min(1e-30) * scale for i, f in enumerate(factors)]


def cp_factors(weight: torch.Tensor, rank: int, iters: int = 200, seed: int = 0) -> list[torch.Tensor]:
    """[A_out, A_in, A_h, A_w], each (dim, rank): exact at ``rank >= exact_cp_rank``, else CP-ALS (tensorly, SVD init)."""
    w = weight.detach().double()
    if rank >= exact_cp_rank(tuple(w.shape)):
        return _balanced(_exact_cp(w))
    with tl.backend_context("numpy"):
        cp = parafac(w.numpy(), rank, n_iter_max=iters, init="svd", tol=1e-10, random_state=seed, normalize_factors=True)
    weights, factors = cp
    factors = [torch.from_numpy(np.asarray(f)).double() for f in factors]
    factors[0] = factors[0] * torch.from_numpy(np.asarray(weights)).double()
    return _balanced(factors)


def cp_reconstruct(factors: list[torch.Tensor]) -> torch.Tensor:
    return torch.einsum("or,ir,hr,wr->oihw", *factors)


def cp_conv(conv: nn.Conv2d, rank: int, iters: int = 200, seed: int = 0, name: str = "layer") -> CPConv2d:
    """Pointwise -> vertical depthwise (carries the row stride/padding) -> horizontal depthwise -> pointwise."""
    _check_conv(name, conv)
    if isinstance(conv.padding, str):
        raise InputError(f"{name}: CP needs numeric padding, got {conv.padding!r}")
    if rank < 1:
        raise InputError(f"{name}: CP rank must be >= 1, got {rank}")
    rank = min(rank, exact_cp_rank(tuple(conv.weight.shape)))
    a_out, a_in, a_h, a_w = cp_factors(conv.weight, rank, iters, seed)
    out_c, in_c, kh, kw = conv.weight.shape
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    first = nn.Conv2d(in_c, rank, 1, bias=False)
    vertical = nn.Conv2d(rank, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=rank, bias=False)
    horizontal = nn.Conv2d(rank, rank, (1, kw), (1, sw), (0, pw), (1, dw), groups=rank, bias=False)
    last = nn.Conv2d(rank, out_c, 1, bias=conv.bias is not None)
    first.weight.data.copy_(a_in.T[:, :, None, None])
    vertical.weight.data.copy_(a_h.T[:, None, :, None])
    horizontal.weight.data.copy_(a_w.T[:, None, None, :])
    last.weight.data.copy_(a_out[:, :, None, None])
    _copy_bias(last, conv)
    return CPConv2d(first, vertical, horizontal, last)
