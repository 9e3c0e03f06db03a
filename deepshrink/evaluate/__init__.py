"""Metrics: accuracy, size, MACs/FLOPs, latency, memory, and the one-call ``evaluate``."""

from deepshrink.evaluate.accuracy import AccuracyResult, evaluate_accuracy
from deepshrink.evaluate.flops import ComputeReport, LayerCost, count_compute
from deepshrink.evaluate.report import EvalReport, evaluate
from deepshrink.evaluate.size import SizeReport, measure_size

__all__ = [
    "AccuracyResult",
    "ComputeReport",
    "EvalReport",
    "LayerCost",
    "SizeReport",
    "count_compute",
    "evaluate",
    "evaluate_accuracy",
    "measure_size",
]
