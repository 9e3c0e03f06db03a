"""One before/after record for every command, the study and auto.

A *side* is a flat dict of measurements under the names in ``METRICS`` (plus
``ort_b<N>_ms`` / ``ort_b<N>_p90_ms`` for ONNX Runtime latency at batch N).
``compare`` pairs two sides into a ``Comparison``, which derives the change
column and the table rows, so every report.json, terminal table and study row
uses the same names for the same quantity. An unknown name is an error: a new
measurement gets a row in ``METRICS`` instead of a private spelling.
"""

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from deepshrink.data.datasets import ImageSet
from deepshrink.evaluate.accuracy import evaluate_accuracy
from deepshrink.evaluate.flops import count_compute
from deepshrink.evaluate.latency import ort_latency_interleaved
from deepshrink.evaluate.size import measure_size


@dataclass(frozen=True)
class Metric:
    label: str
    format: Callable[[float], str]
    change: str = "ratio"  # "ratio": after / before; "pp": after - before in points; "": no change column


def _fixed(digits: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{digits}f}"


def _count(v: float) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:,.0f}"


def _percent(v: float) -> str:
    return f"{100 * v:.2f}"


METRICS: dict[str, Metric] = {
    "top1": Metric("Top-1 %", _fixed(2), "pp"),
    "top5": Metric("Top-5 %", _fixed(2), "pp"),
    "top1_ort": Metric("Top-1 % (ONNX Runtime)", _fixed(2), "pp"),
    "top1_before_finetune": Metric("Top-1 % before fine-tuning", _fixed(2), "pp"),
    "params": Metric("params", _count),
    "nonzero_params": Metric("non-zero params", _count),
    "weights": Metric("conv/linear weights", _count),
    "weight_sparsity": Metric("conv/linear weight sparsity %", _percent, ""),
    "macs": Metric("MACs (dense)", _count),
    "effective_macs": Metric("MACs (effective, zeros skipped)", _count),
    "conv_macs": Metric("conv MACs", _count),
    "flops": Metric("FLOPs", _count),
    "bytes": Metric("bytes on disk", _count),
    "onnx_bytes": Metric("ONNX bytes", _count),
    "cosine_mean": Metric("pooled cosine mean (torch)", _fixed(5), ""),
    "cosine_min": Metric("pooled cosine min (torch)", _fixed(5), ""),
    "cosine_mean_ort": Metric("pooled cosine mean (ORT)", _fixed(5), ""),
    "cosine_min_ort": Metric("pooled cosine min (ORT)", _fixed(5), ""),
    "peak_rss_mb": Metric("peak memory MB", _fixed(1)),
    "ort_session_mb": Metric("ORT session MB (deepshrink.evaluate.memory)", _fixed(2)),
    "ort_b64_peak_mb": Metric("ORT batch-64 peak MB", _fixed(2)),
    "seconds": Metric("time s", _fixed(1), ""),
}
_LATENCY = re.compile(r"ort_b(\d+)(_p90)?_ms")


def latency_key(batch: int, p90: bool = False) -> str:
    return f"ort_b{batch}{'_p90' if p90 else ''}_ms"


def metric(key: str) -> Metric:
    """The metric named ``key``; latency names carry their batch size."""
    if key in METRICS:
        return METRICS[key]
    match = _LATENCY.fullmatch(key)
    if match is None:
        raise KeyError(f"unknown measurement {key!r}: add it to deepshrink.evaluate.compare.METRICS")
    return Metric(f"ORT batch {match[1]} ms ({'p90' if match[2] else 'median'})", _fixed(3))


def _order(key: str) -> tuple[int, int]:
    """Table order: METRICS' order, latency last by batch size."""
    if key in METRICS:
        return list(METRICS).index(key), 0
    match = _LATENCY.fullmatch(key)
    return len(METRICS) + bool(match[2]), -int(match[1])


@dataclass(frozen=True)
class Comparison:
    """Two sides measured the same way; ``labels`` name them in tables (e.g. fp32 / quantized)."""

    before: dict[str, float]
    after: dict[str, float]
    labels: tuple[str, str] = ("before", "after")

    def ratio(self, key: str) -> float | None:
        """after / before, None when either is missing or before is 0."""
        b, a = self.before.get(key), self.after.get(key)
        return a / b if a is not None and b else None

    def change(self, key: str) -> str:
        b, a = self.before.get(key), self.after.get(key)
        kind = metric(key).change
        if a is None or b is None or not kind:
            return ""
        if kind == "pp":
            return f"{a - b:+.2f}pp"
        return f"x{a / b:.3f}" if b else "-"

    def keys(self) -> list[str]:
        """Every measured name, in table order (a name measured on one side only still gets its row)."""
        return sorted({*self.before, *self.after}, key=_order)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(label, before, after, change) per measurement, formatted; '-' where a side lacks it."""

        def show(side: dict, key: str) -> str:
            value = side.get(key)
            return "-" if value is None else metric(key).format(value)

        return [(metric(k).label, show(self.before, k), show(self.after, k), self.change(k)) for k in self.keys()]

    def markdown(self) -> str:
        lines = [f"| | {self.labels[0]} | {self.labels[1]} | change |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows()]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "before": self.before, "after": self.after}


def compare(before: Mapping[str, float], after: Mapping[str, float], labels: tuple[str, str] = ("before", "after")) -> Comparison:
    """The before/after record; a name outside ``METRICS`` (or ``ort_b<N>_ms``) raises ``KeyError``."""
    for key in (*before, *after):
        metric(key)
    return Comparison(dict(before), dict(after), tuple(labels))


# -- measuring one side ---------------------------------------------------------------------------------
def weight_sparsity(model: nn.Module) -> tuple[int, float]:
    """(conv/linear weights, their zero fraction): what unstructured pruning changes."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(w.numel() for w in weights)
    zeros = 1.0 - sum(int(torch.count_nonzero(w)) for w in weights) / total if total else 0.0
    return total, zeros


def measure(model: nn.Module, test: ImageSet, onnx: bytes | None = None) -> dict[str, float]:
    """Accuracy, size (bytes: the safetensors file) and compute of one model; ``onnx``: its exported bytes."""
    acc = evaluate_accuracy(model, test)
    size = measure_size(model, len(onnx) if onnx is not None else None)
    compute = count_compute(model, tuple(test.images.shape[1:]))
    weights, sparsity = weight_sparsity(model)
    side = {
        "top1": acc.top1,
        "top5": acc.top5,
        "params": size.params,
        "nonzero_params": size.nonzero_params,
        "weights": weights,
        "weight_sparsity": sparsity,
        "macs": compute.macs,
        "effective_macs": compute.effective_macs,
        "conv_macs": sum(layer.macs for layer in compute.layers if layer.kind == nn.Conv2d.__name__),
        "bytes": size.disk_bytes,
    }
    if onnx is not None:
        side["onnx_bytes"] = len(onnx)
    return side


def measure_ort_latency(
    sessions: Mapping[str, object], input_shape: tuple[int, ...], batches: Iterable[int], repeats: int, p90: bool = False, rounds: int = 3
) -> dict[str, dict[str, float]]:
    """ONNX Runtime median (and p90) latency of each session per batch size, keyed like a side.

    Interleaved rounds put every side under the same machine load, so their ratio holds on a busy CPU."""
    sides: dict[str, dict[str, float]] = {name: {} for name in sessions}
    for batch in batches:
        for name, (median, slow) in ort_latency_interleaved(sessions, input_shape, batch, repeats, rounds).items():
            sides[name][latency_key(batch)] = median
            if p90:
                sides[name][latency_key(batch, p90=True)] = slow
    return sides
