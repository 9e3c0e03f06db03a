"""Robustness and stability of a compressed model, as the seed's evaluation asks.

Compression can keep clean accuracy while making a model brittle, so three
numbers sit next to Top-1:

* Top-1 under additive Gaussian input noise at a few strengths (``sigma`` in
  units of the normalised input, whose pixel standard deviation is 1);
* the flip rate: the share of images whose predicted class changes when that
  noise is added (a stability measure that needs no labels);
* agreement: the share of clean test images on which the compressed model
  predicts the same class as the original (``reference``) model.

The noise is drawn from one seeded generator in the same batch order for every
model, so two models are compared on exactly the same noisy images. A model is
given as a ``predict`` function (images -> logits), so PyTorch models and ONNX
Runtime sessions are measured alike.
"""

from dataclasses import dataclass

import torch

from deepshrink.core.errors import InputError
from deepshrink.data.datasets import ImageSet
from deepshrink.evaluate.accuracy import Predict, predictions

NOISE_SIGMAS: tuple[float, ...] = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class RobustnessReport:
    sigmas: tuple[float, ...]
    noisy_top1: tuple[float, ...]  # percent, one per sigma
    flip_rate: tuple[float, ...]  # percent of images whose class changes under that noise
    agreement: float | None  # percent of clean images classified as the reference model does
    samples: int

    def describe(self) -> str:
        levels = zip(self.sigmas, self.noisy_top1, self.flip_rate, strict=True)
        text = ", ".join(f"sigma {sigma}: {top1:.2f} ({flips:.1f}% flipped)" for sigma, top1, flips in levels)
        return text if self.agreement is None else f"{text}; agrees with the reference on {self.agreement:.2f}%"


def _percent(mask: torch.Tensor) -> float:
    return 100.0 * float(mask.float().mean())


def measure_robustness(
    predict: Predict,
    data: ImageSet,
    reference: torch.Tensor | None = None,
    sigmas: tuple[float, ...] = NOISE_SIGMAS,
    seed: int = 0,
) -> RobustnessReport:
    """Top-1 and flip rate under each noise strength; ``reference``: the original model's clean predictions."""
    if not len(data):
        raise InputError("robustness needs at least one labelled image")
    if not sigmas or not all(s > 0 for s in sigmas):
        raise InputError(f"noise sigmas must be positive, got {sigmas}")
    if reference is not None and len(reference) != len(data):
        raise InputError(f"reference has {len(reference)} predictions for {len(data)} images")
    clean = predictions(predict, data)
    noisy = [predictions(predict, data, sigma, seed) for sigma in sigmas]
    return RobustnessReport(
        sigmas=tuple(sigmas),
        noisy_top1=tuple(_percent(p == data.labels) for p in noisy),
        flip_rate=tuple(_percent(p != clean) for p in noisy),
        agreement=None if reference is None else _percent(clean == reference),
        samples=len(data),
    )
