"""Per-layer sensitivity (Han et al. 2015, Li et al. 2017): change one layer at a
time (prune it by magnitude, k-means share it) and score the model.

``probe_layers`` is the one probe: the pruning curves of ``deepshrink prune
--sensitivity`` (scored by Top-1) and ``deepshrink auto``'s pruning and sharing
costs (scored by ``output_kl``) both come from it.

Layers differ widely in how much pruning they tolerate (a first conv with few
weights breaks early, a wide fully connected layer barely notices 90%), so one
sparsity for every layer wastes either accuracy or compression. The curves
measured here feed ``layer_sparsities_for_target``, which spends a global
sparsity budget on the layers where it costs the least accuracy, and
``plot_sensitivity`` for a look at them.
"""

import copy
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deepshrink.compress.prune.masks import apply_masks, magnitude_masks
from deepshrink.compress.share.kmeans import kmeans_1d
from deepshrink.core.config import Scope, check_range
from deepshrink.core.errors import InputError
from deepshrink.data.datasets import ImageSet
from deepshrink.evaluate.accuracy import evaluate_accuracy

DEFAULT_SPARSITIES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class SensitivityResult:
    """Top-1 (percent) with only one layer pruned, per layer and sparsity."""

    baseline_top1: float
    samples: int
    layers: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name -> [(sparsity, top1)], ascending
    params: dict[str, int] = field(default_factory=dict)  # weights per layer: what a layer's sparsity is worth

    def curve(self, name: str) -> list[tuple[float, float]]:
        """The layer's points with the unpruned baseline (0.0, baseline) first."""
        return [(0.0, self.baseline_top1), *self.layers[name]]

    def to_dict(self) -> dict:
        return {
            "baseline_top1": self.baseline_top1,
            "samples": self.samples,
            "layers": {name: {"params": self.params[name], "points": [list(p) for p in points]} for name, points in self.layers.items()},
        }


Change = Callable[[nn.Module, str], None]  # changes layer ``name`` of the probe model in place


def pruned(sparsity: float, types: tuple[type, ...] = (nn.Conv2d, nn.Linear)) -> Change:
    """The layer pruned by magnitude to ``sparsity`` (its smallest weights zeroed)."""

    def change(probe: nn.Module, name: str) -> None:
        apply_masks(probe, magnitude_masks(probe, sparsity, Scope(types=types, include=f"^{re.escape(name)}$")))

    return change


def shared(bits: int) -> Change:
    """The layer's non-zero weights replaced by their nearest of 2^bits k-means centroids (zeros stay zero)."""

    def change(probe: nn.Module, name: str) -> None:
        weight = probe.get_submodule(name).weight
        keep = weight != 0
        if keep.any():
            codebook, assignment = kmeans_1d(weight[keep], 2**bits)
            values = torch.zeros_like(weight)
            values[keep] = codebook[assignment]
            weight.copy_(values)

    return change


@torch.no_grad()
def probe_layers(
    model: nn.Module,
    names: list[str],
    changes: dict[Hashable, Change],
    score: Callable[[nn.Module], float],
    advance: Callable[[], None] = lambda: None,
) -> dict[str, dict[Hashable, float]]:
    """``{layer: {change key: score}}`` with each change applied to one layer at a time on a copy of ``model``
    (eval mode) and undone before the next: the one sensitivity probe of pruning, sharing and quantization."""
    probe = copy.deepcopy(model).eval()
    result: dict[str, dict[Hashable, float]] = {}
    for name in names:
        weight = probe.get_submodule(name).weight
        original = weight.detach().clone()
        result[name] = {}
        for key, change in changes.items():
            change(probe, name)
            result[name][key] = score(probe)
            weight.copy_(original)
            advance()
    return result


@torch.no_grad()
def output_logprobs(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([torch.log_softmax(model(images[i : i + batch_size]), 1) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def kl_divergence(reference: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean KL(reference || changed) of the predicted distributions: > 0 for any change, unlike a Top-1 count."""
    return float((reference.exp() * (reference - logprobs)).sum(1).mean())


def output_kl(model: nn.Module, images: torch.Tensor) -> Callable[[nn.Module], float]:
    """A probe score: the KL divergence of a changed model's outputs on ``images`` from ``model``'s
    (smooth and additive for small changes, where a Top-1 count on a few hundred images is mostly 0)."""
    reference = output_logprobs(model, images)
    return lambda changed: kl_divergence(reference, output_logprobs(changed, images))


def layer_sensitivity(
    model: nn.Module,
    data: ImageSet,
    sparsities: tuple[float, ...] | list[float] = DEFAULT_SPARSITIES,
    scope: Scope | None = None,
    batch_size: int = 500,
) -> SensitivityResult:
    """Prune each layer in ``scope`` alone to each of ``sparsities`` (on a copy) and measure Top-1 on ``data``."""
    levels = sorted(set(sparsities))
    if not levels:
        raise InputError("sensitivity needs at least one sparsity")
    if not 0 < levels[0] <= levels[-1] < 1:
        raise InputError(f"sensitivity sparsities must be in (0, 1), got {levels}")
    scope = scope or Scope()
    layers = dict(scope.layers(model))
    if not layers:
        raise InputError(f"no layers in scope {scope}")
    probed = probe_layers(
        model, list(layers), {s: pruned(s, scope.types) for s in levels}, lambda probe: evaluate_accuracy(probe, data, batch_size).top1
    )
    result = SensitivityResult(evaluate_accuracy(model, data, batch_size).top1, len(data))  # eval mode, restored
    for name, module in layers.items():
        result.layers[name], result.params[name] = list(probed[name].items()), module.weight.numel()
    return result


def layer_sparsities_for_target(result: SensitivityResult, target_sparsity: float, max_drop: float | None = None) -> dict[str, float]:
    """Per-layer sparsities whose parameter-weighted mean is ``target_sparsity``.

    Greedy: repeatedly raise the layer whose next measured sparsity costs the least
    Top-1 per weight pruned; the last step is interpolated so the target is met
    exactly. ``max_drop`` (Top-1 points below the baseline) bars levels that alone
    lose more. The dict covers every layer of ``result``: pass it as
    ``MagnitudePrune(sparsity=0, layer_sparsity=...)`` with the same scope.
    """
    check_range("target_sparsity", target_sparsity, 0.0, 1.0)
    if not result.layers:
        raise InputError("the sensitivity result has no layers")
    total = sum(result.params.values())
    needed = target_sparsity * total
    step = dict.fromkeys(result.layers, 0)
    chosen = dict.fromkeys(result.layers, 0.0)
    pruned = 0.0
    while pruned < needed:
        move = _cheapest_step(result, step, max_drop)
        if move is None:
            limit = f" within max_drop {max_drop}" if max_drop is not None else ""
            raise InputError(f"cannot reach sparsity {target_sparsity}{limit}: the measured levels reach {pruned / total:.3f} at most")
        name, (s0, s1), gain = move
        if pruned + gain >= needed:
            chosen[name] = s0 + (needed - pruned) / result.params[name]
            break
        step[name] += 1
        chosen[name], pruned = s1, pruned + gain
    return chosen


def _cheapest_step(
    result: SensitivityResult, step: dict[str, int], max_drop: float | None
) -> tuple[str, tuple[float, float], float] | None:
    """(layer, (from, to) sparsity, weights pruned) of the next step with the least Top-1 lost per weight."""
    best, best_cost = None, float("inf")
    for name, i in step.items():
        curve = result.curve(name)
        if i + 1 >= len(curve):
            continue
        (s0, a0), (s1, a1) = curve[i], curve[i + 1]
        if max_drop is not None and result.baseline_top1 - a1 > max_drop:
            continue
        gain = result.params[name] * (s1 - s0)
        cost = (a0 - a1) / gain
        if cost < best_cost:
            best, best_cost = (name, (s0, s1), gain), cost
    return best


def plot_sensitivity(result: SensitivityResult, path: str | Path, title: str = "per-layer pruning sensitivity") -> Path:
    """Write a PNG of Top-1 against sparsity, one line per layer (Agg: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name in result.layers:
        xs, ys = zip(*result.curve(name), strict=True)
        axes.plot([100 * x for x in xs], ys, marker="o", markersize=3, label=f"{name} ({result.params[name]:,})")
    axes.axhline(result.baseline_top1, color="grey", linestyle="--", linewidth=1, label="unpruned")
    axes.set(xlabel="sparsity of the one pruned layer (%)", ylabel=f"Top-1 % ({result.samples:,} images)", title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower left")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
