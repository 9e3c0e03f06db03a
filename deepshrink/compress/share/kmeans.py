"""1-D k-means for weight sharing (Deep Compression, Han et al. 2016).

Centroid initialisation matters: ``linear`` spaces centroids evenly between the
min and max weight, which keeps the rare large weights (the important ones)
represented; ``density`` places them at quantiles of the weight CDF; ``random``
samples weights. Assignment uses sorted centroids and ``searchsorted`` on their
midpoints, so each iteration is O(n log k) and vectorised.
"""

from typing import Literal

import torch

Init = Literal["linear", "density", "random"]


def init_centroids(values: torch.Tensor, k: int, init: Init, generator: torch.Generator) -> torch.Tensor:
    if init == "linear":
        return torch.linspace(float(values.min()), float(values.max()), k, dtype=torch.float64)
    if init == "density":
        return torch.quantile(values.double(), torch.linspace(0, 1, k + 2, dtype=torch.float64)[1:-1])
    if init == "random":
        return values[torch.randperm(values.numel(), generator=generator)[:k]].double().sort().values
    raise ValueError(f"unknown centroid init {init!r}; use linear, density or random")


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value (centroids sorted ascending)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return torch.searchsorted(midpoints.to(values.dtype), values.contiguous())


def kmeans_1d(values: torch.Tensor, k: int, init: Init = "linear", iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster a 1-D tensor into at most ``k`` float32 centroids; returns (centroids, assignment).

    With no more distinct values than ``k`` the distinct values themselves are
    the codebook, so already-shared weights are reproduced exactly.
    """
    values = values.detach().flatten().float()
    if values.numel() == 0:
        raise ValueError("cannot cluster an empty tensor")
    distinct = values.unique()
    if distinct.numel() <= k:
        return distinct, torch.searchsorted(distinct, values)
    generator = torch.Generator().manual_seed(seed)
    centroids = init_centroids(values, k, init, generator)
    data = values.double()
    for _ in range(iters):
        labels = assign(data, centroids)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.bincount(labels, weights=data, minlength=k)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # empty clusters keep their centroid
        updated = updated.sort().values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    centroids = centroids.float().unique()  # float32 rounding can merge neighbours
    return centroids, assign(values, centroids)
