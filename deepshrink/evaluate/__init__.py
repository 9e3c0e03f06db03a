"""Pure metrics, below ``compress``: accuracy/Top-1, fidelity, size, MACs/FLOPs, latency, memory,
and the one-call ``evaluate``. Analysis that runs the methods (sensitivity) is ``deepshrink.analysis``."""

from deepshrink.evaluate.accuracy import AccuracyResult, evaluate_accuracy, top1
from deepshrink.evaluate.fidelity import Fidelity, fidelity
from deepshrink.evaluate.flops import ComputeReport, LayerCost, count_compute
from deepshrink.evaluate.report import EvalReport, evaluate
from deepshrink.evaluate.size import SizeReport, measure_size

__all__ = [
    "AccuracyResult",
    "ComputeReport",
    "EvalReport",
    "Fidelity",
    "LayerCost",
    "SizeReport",
    "count_compute",
    "evaluate",
    "evaluate_accuracy",
    "fidelity",
    "measure_size",
    "top1",
]
