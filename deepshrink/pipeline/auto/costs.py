"""What the plan is built from: each layer's cost of being pruned or shared (the one sensitivity probe of
``evaluate.sensitivity``) and its bytes in a .dsz at every (sparsity, bits) pair (sized by the packer)."""

import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from deepshrink.analysis.sensitivity import output_kl, probe_layers, pruned, shared
from deepshrink.compress.prune.unstructured import MagnitudePrune
from deepshrink.compress.share.kmeans_share import KMeansShare, tie_to_codebooks
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.encode.pack import pack
from deepshrink.pipeline.auto.options import FP32_BITS, AutoOptions, Option


@contextmanager
def progress_bar(progress: bool, label: str, total: int):
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def layer_names(model: nn.Module, scope: Scope) -> list[str]:
    names = [name for name, _ in scope.layers(model)]
    if not names:
        raise InputError(f"no Conv2d/Linear layers in scope {scope}")
    return names


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module, images: torch.Tensor, names: list[str], options: AutoOptions, progress: bool = True
) -> dict[str, dict[str, dict]]:
    """{layer: {"prune": {sparsity: cost}, "bits": {bits: cost}}}, one layer changed at a time; the cost is the
    KL divergence of the model's outputs from the unchanged model's (``evaluate.sensitivity.output_kl``)."""
    changes = {("prune", s): pruned(s, options.scope.types) for s in options.probed_levels}
    changes.update({("bits", b): shared(b) for b in options.bit_levels})
    with progress_bar(progress, "sensitivity", len(names) * len(changes)) as advance:
        probed = probe_layers(model, names, changes, output_kl(model, images), advance)
    result = {name: {"prune": {}, "bits": {}} for name in names}
    for name, costs in probed.items():
        for (kind, level), cost in costs.items():
            result[name][kind][level] = cost
    return result


def tie_plan_bits(model: nn.Module, bits: dict[str, int], scope: Scope) -> None:
    """Tie each layer to a codebook of 2^bits values (one clustering call per distinct width)."""
    for width in sorted(set(bits.values()) - {FP32_BITS}):
        names = [n for n, b in bits.items() if b == width]
        tie_to_codebooks(model, KMeansShare(conv_bits=width, linear_bits=width, scope=Scope(types=scope.types, include=_exactly(names))))


def _exactly(names: list[str]) -> str:
    """A scope regex matching these layer names and no other."""
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def _pack_bytes(model: nn.Module, names: list[str], tmp: Path) -> tuple[int, dict[str, int]]:
    """(file bytes, per-layer weight bytes: coded streams plus manifest share, as the packer sizes them) of ``model``."""
    report = pack(model, tmp / "probe.dsz")
    return report.file_bytes, {n: report.archive_bytes[f"{n}.weight"] for n in names}


@torch.no_grad()
def uniform_bytes(model: nn.Module, names: list[str], sparsity: float, bits: int, scope: Scope) -> tuple[int, dict[str, int]]:
    """(.dsz file bytes, per-layer bytes) with every layer pruned one-shot to ``sparsity`` and shared at ``bits``
    by the registered methods (``MagnitudePrune``, ``KMeansShare``), as a recipe would."""
    quiet = Context(progress=False)
    pruned_model = apply_method(model, MagnitudePrune(sparsity=sparsity, scope=scope), quiet)
    sharing = KMeansShare(conv_bits=bits, linear_bits=bits, scope=Scope(types=scope.types, include=_exactly(names)))
    with tempfile.TemporaryDirectory() as tmp:
        return _pack_bytes(apply_method(pruned_model, sharing, quiet), names, Path(tmp))


def measure_bytes(
    model: nn.Module, names: list[str], options: AutoOptions, progress: bool = True
) -> tuple[dict[str, dict[tuple[float, int], int]], int]:
    """Per-layer .dsz bytes for every (sparsity, bits) pair (one-shot, before fine-tuning) and the fixed overhead."""
    table: dict[str, dict[tuple[float, int], int]] = {n: {} for n in names}
    fixed = 0
    pairs = [(s, b) for s in (0.0, *options.prune_levels) for b in options.bit_levels]
    with progress_bar(progress, "byte table", len(pairs)) as advance:
        for s, bits in pairs:
            file_bytes, per_layer = uniform_bytes(model, names, s, bits, options.scope)
            for n in names:
                table[n][(s, bits)] = per_layer[n]
            fixed = max(fixed, file_bytes - sum(per_layer.values()))
            advance()
    return table, fixed


def layer_options(
    sensitivity: dict[str, dict[str, dict]], table: dict[str, dict[tuple[float, int], int]], weights: tuple[float, float] = (1.0, 1.0)
) -> dict[str, list[Option]]:
    """Every (sparsity, bits) option per layer with its cost: the pruning cost plus the sharing cost, each
    scaled by ``weights`` (how much of that damage the trials saw survive fine-tuning)."""
    out = {}
    for name, sizes in table.items():
        prune = sensitivity[name]["prune"]
        out[name] = [
            Option(s, b, size, weights[0] * interpolated_cost(prune, s) + weights[1] * sharing_cost(sensitivity[name], s, b))
            for (s, b), size in sizes.items()
        ]
    return out


def sharing_cost(layer: dict[str, dict], sparsity: float, bits: int) -> float:
    """Sharing measured on the dense layer, scaled by the weights left: a pruned layer clusters fewer (and larger,
    better separated) weights, so its sharing error shrinks at least in proportion (measured: faster)."""
    return layer["bits"][bits] * (1.0 - sparsity)


def interpolated_cost(probed: dict[float, float], sparsity: float) -> float:
    """Cost at ``sparsity``, linear between probed levels (0 when unpruned), extended along the last segment."""
    points = sorted({0.0: 0.0, **probed}.items())
    segment = next((i for i in range(1, len(points)) if sparsity <= points[i][0]), len(points) - 1)
    (s0, c0), (s1, c1) = points[segment - 1], points[segment]
    return c0 + (c1 - c0) * (sparsity - s0) / (s1 - s0)
