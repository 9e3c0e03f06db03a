"""Dynamic int8 with a sensitivity-based fp32 fallback for the layers that cannot take it.

Each candidate layer is quantized alone and the drop in pooled-embedding
cosine is measured on the given token batches. Then everything is quantized
and, while the targets (mean cosine, worst cosine) are missed, the layer that
spent the largest share of either budget goes back to fp32, one at a time.
Errors do not add up exactly, so the greedy path can overshoot; a last pass
quantizes the chosen layers again, largest first, wherever the targets still
hold.
Torch computes what ONNX Runtime computes (``DynamicQuantLinear``), so these
numbers hold for the exported model too.
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from torch import nn

from deepshrink.compress.quant.dynamic import DynamicQuant, dynamic_targets, quantize_layers
from deepshrink.core.config import check_range
from deepshrink.core.modules import replace_module
from deepshrink.evaluate.fidelity import Fidelity, fidelity
from deepshrink.transformers.fidelity import pooled_embeddings
from deepshrink.transformers.load import Batch, check_batches

MEAN_TARGET = 0.995
MIN_TARGET = 0.98


@dataclass
class FallbackResult:
    """What the search found: the fp32 layers, each layer's own damage, and the fidelity path."""

    config: DynamicQuant  # the config that reproduces the model (fallback filled in)
    fallback: list[str]  # every layer kept in fp32, given or found
    sensitivity: dict[str, Fidelity]  # cosine with only that layer quantized
    fidelity: Fidelity  # of the returned model
    without_fallback: Fidelity  # everything quantized
    steps: list[tuple[str, Fidelity]] = field(default_factory=list)  # (layer sent back to fp32, fidelity after)

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "fallback": self.fallback,
            "sensitivity": {k: v.to_dict() for k, v in self.sensitivity.items()},
            "fidelity": self.fidelity.to_dict(),
            "without_fallback": self.without_fallback.to_dict(),
            "steps": [{"layer": name, **fid.to_dict()} for name, fid in self.steps],
        }


def quantized_layer_fidelity(
    model: nn.Module, batches: Sequence[Batch], names: Sequence[str], reduce_range: bool = False
) -> dict[str, Fidelity]:
    """Pooled-embedding fidelity with only one layer quantized, per layer (the model is restored)."""
    reference = pooled_embeddings(model, batches)
    result = {}
    for name in names:
        original = model.get_submodule(name)
        quantize_layers(model, [name], reduce_range)
        try:
            result[name] = fidelity(reference, pooled_embeddings(model, batches), agreement=False)
        finally:
            replace_module(model, name, original)
    return result


def _damage(fid: Fidelity, mean_target: float, min_target: float) -> float:
    """The larger share of the mean and worst-case cosine budgets one layer spends."""
    return max((1 - fid.cosine_mean) / max(1 - mean_target, 1e-12), (1 - fid.cosine_min) / max(1 - min_target, 1e-12))


def quantize_with_fallback(
    model: nn.Module,
    batches: Sequence[Batch],
    config: DynamicQuant | None = None,
    mean_target: float = MEAN_TARGET,
    min_target: float = MIN_TARGET,
    sensitivity: dict[str, Fidelity] | None = None,
) -> tuple[nn.Module, FallbackResult]:
    """A dynamically quantized copy of ``model`` that meets the cosine targets on ``batches``.

    ``sensitivity`` (from an earlier search on the same model and batches) skips re-measuring it.
    """
    check_range("mean_target", mean_target, 0.0, 1.0, high_inclusive=True)
    check_range("min_target", min_target, 0.0, 1.0, high_inclusive=True)
    batches = check_batches(batches)
    config = config or DynamicQuant()
    model = copy.deepcopy(model).eval()
    names = dynamic_targets(model, config)
    if sensitivity is None or set(sensitivity) != set(names):
        sensitivity = quantized_layer_fidelity(model, batches, names, config.reduce_range)
    order = sorted(names, key=lambda n: _damage(sensitivity[n], mean_target, min_target), reverse=True)
    reference = pooled_embeddings(model, batches)

    def measure(m: nn.Module) -> Fidelity:
        return fidelity(reference, pooled_embeddings(m, batches), agreement=False)

    quantized = quantize_layers(copy.deepcopy(model), names, config.reduce_range)
    first = current = measure(quantized)
    found, steps = [], []
    for name in order:
        if current.meets(mean_target, min_target):
            break
        replace_module(quantized, name, copy.deepcopy(model.get_submodule(name)))
        found.append(name)
        current = measure(quantized)
        steps.append((name, current))
    if current.meets(mean_target, min_target):
        found, current = _requantize_unneeded(quantized, found, current, measure, (mean_target, min_target), config.reduce_range)
    final = replace(config, fallback=tuple(config.fallback) + tuple(n for n in order if n in found))
    return quantized, FallbackResult(final, list(final.fallback), sensitivity, current, first, steps)


def _requantize_unneeded(quantized: nn.Module, found: list[str], current: Fidelity, measure, targets, reduce_range: bool):
    """Greedy fp32 choices can overshoot: quantize each chosen layer again, largest first, where the targets still hold."""
    kept = list(found)
    for name in sorted(found, key=lambda n: -quantized.get_submodule(n).weight.numel()):
        original = quantized.get_submodule(name)
        quantize_layers(quantized, [name], reduce_range)
        trial = measure(quantized)
        if trial.meets(*targets):
            kept.remove(name)
            current = trial
        else:
            replace_module(quantized, name, original)
    return kept, current
