"""Rank selection: by kept energy, by a target MAC reduction, or automatically (VBMF).

VBMF is the analytic empirical variational Bayes matrix factorisation of
Nakajima et al. (2013): it estimates the noise variance from the singular values
and keeps the components above the resulting threshold, with no knob to tune;
Kim et al. (2016) use it on the two unfoldings to pick Tucker-2 ranks.
"""

import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from deepshrink.core.errors import InputError


def fraction_rank(full_rank: int, fraction: float) -> int:
    """``fraction`` of the full rank, rounded, at least 1."""
    return max(1, int(round(fraction * full_rank)))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values hold ``energy`` of the total squared sum."""
    if not 0 < energy <= 1:
        raise InputError(f"energy must be in (0, 1], got {energy}")
    power = singular_values.double() ** 2
    kept = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
    return min(len(power), int((kept < energy - 1e-12).sum()) + 1)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2: float, rows: int, cols: int, s: np.ndarray, residual: float, xubar: float) -> float:
    """Negative free energy of EVBMF as a function of the noise variance (Nakajima et al. 2013, eq. 23)."""
    alpha = rows / cols
    x = s**2 / (cols * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    return float(
        np.sum(z2 - np.log(z2))
        + np.sum(z1 - tau_z1)
        + np.sum(np.log((tau_z1 + 1) / z1))
        + alpha * np.sum(np.log(tau_z1 / alpha + 1))
        + residual / (cols * sigma2)
        + (rows - len(s)) * np.log(sigma2)
    )


def vbmf_rank(matrix: torch.Tensor) -> int:
    """Rank kept by analytic EVBMF with the noise variance estimated from the data (at least 1)."""
    y = matrix.detach().double().numpy()
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    if rows < 2:
        return 1
    s = np.linalg.svd(y, compute_uv=False)
    alpha = rows / cols
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eh_ub = int(min(math.ceil(rows / (1 + alpha)) - 1, rows)) - 1
    upper = float(np.sum(s**2)) / (rows * cols)
    lower = max(s[eh_ub + 1] ** 2 / (cols * xubar), float(np.mean(s[eh_ub + 1 :] ** 2)) / cols) if eh_ub + 1 < len(s) else upper * 1e-6
    if not 0 < lower < upper:
        return 1
    best = minimize_scalar(_evb_objective, args=(rows, cols, s, 0.0, xubar), bounds=(lower, upper), method="bounded")
    threshold = math.sqrt(cols * best.x * (1 + tauubar) * (1 + alpha / tauubar))
    return max(1, int(np.sum(s > threshold)))


# -- ranks for a target MAC reduction ----------------------------------------------------
# Costs are MACs per output position; a strided conv's first 1x1 runs at stride² as many positions.
def svd_rank_for(out_features: int, in_features: int, compression: float) -> int:
    return max(1, math.floor(out_features * in_features / (compression * (out_features + in_features))))


def tucker_ranks_for(out_c: int, in_c: int, kernel: tuple[int, int], stride: tuple[int, int], compression: float) -> tuple[int, int]:
    """Ranks in the proportion out:in whose MACs are 1/compression of the conv's (a quadratic in the scale)."""
    k2, s2 = kernel[0] * kernel[1], stride[0] * stride[1]
    target = out_c * in_c * k2 / compression
    a, b = k2 * in_c * out_c, s2 * in_c**2 + out_c**2
    scale = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    r_out, r_in = max(1, math.floor(scale * out_c)), max(1, math.floor(scale * in_c))
    while tucker_macs(out_c, in_c, (r_out, r_in), kernel, stride) > target and r_out + r_in > 2:
        if r_out > 1 and (r_out / out_c >= r_in / in_c or r_in == 1):  # a rank floored up to 1 pushed it over: trim the other
            r_out -= 1
        else:
            r_in -= 1
    return r_out, r_in


def cp_rank_for(out_c: int, in_c: int, kernel: tuple[int, int], stride: tuple[int, int], compression: float) -> int:
    per_rank = in_c * stride[0] * stride[1] + kernel[0] * stride[1] + kernel[1] + out_c
    return max(1, math.floor(out_c * in_c * kernel[0] * kernel[1] / (compression * per_rank)))


def tucker_macs(out_c: int, in_c: int, ranks: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]) -> int:
    r_out, r_in = ranks
    return in_c * r_in * stride[0] * stride[1] + r_in * r_out * kernel[0] * kernel[1] + r_out * out_c


def cp_macs(out_c: int, in_c: int, rank: int, kernel: tuple[int, int], stride: tuple[int, int]) -> int:
    return rank * (in_c * stride[0] * stride[1] + kernel[0] * stride[1] + kernel[1] + out_c)
