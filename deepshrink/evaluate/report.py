"""``evaluate``: one call measuring everything the seed's comparison asks for."""

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from deepshrink.data.datasets import ImageSet
from deepshrink.evaluate.accuracy import AccuracyResult, evaluate_accuracy, predictions, torch_predict
from deepshrink.evaluate.environment import environment
from deepshrink.evaluate.flops import ComputeReport, count_compute, flop_counter_flops
from deepshrink.evaluate.latency import LatencyResult, ort_latency, ort_peak_memory, torch_latency, torch_peak_memory
from deepshrink.evaluate.robustness import RobustnessReport, measure_robustness
from deepshrink.evaluate.size import SizeReport, measure_size
from deepshrink.export.onnx import onnx_bytes, ort_session, run_ort


@dataclass
class OnnxCheck:
    max_abs_diff: float  # ORT vs torch logits on a test batch
    top1_agreement: float  # percent of test images where both predict the same class
    test_top1: float  # ORT's own Top-1 on the evaluated test set


@dataclass
class EvalReport:
    name: str
    input_shape: tuple[int, ...]
    accuracy: AccuracyResult
    size: SizeReport
    compute: ComputeReport
    latency: list[LatencyResult] = field(default_factory=list)
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)
    onnx: OnnxCheck | None = None
    flop_counter_flops: int = 0  # torch.utils.flop_counter's total, a cross-check of compute.conv_linear_flops
    compression_ratio: float | None = None  # reference disk bytes / this model's disk bytes
    robustness: RobustnessReport | None = None  # Top-1 and flips under input noise; agreement with the reference
    eval_time_s: float = 0.0
    environment: dict = field(default_factory=environment)

    def latency_ms(self, backend: str, batch_size: int) -> float | None:
        return next((r.median_ms for r in self.latency if r.backend == backend and r.batch_size == batch_size), None)

    def to_dict(self, layers: bool = False) -> dict:
        out = asdict(self)
        out["compute"] = {
            "macs": self.compute.macs,
            "effective_macs": self.compute.effective_macs,
            "flops": self.compute.flops,
            "conv_linear_flops": self.compute.conv_linear_flops,
        }
        if layers:
            out["compute"]["layers"] = [asdict(layer) for layer in self.compute.layers]
        out["size"]["sparsity"] = self.size.sparsity
        return out


def _onnx_check(session, model: nn.Module, test: ImageSet, batch_size: int = 500) -> OnnxCheck:
    max_diff, agree, correct = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(test), batch_size):
            x, y = test.images[start : start + batch_size], test.labels[start : start + batch_size]
            expected = model(x).numpy()
            got = run_ort(session, x)
            max_diff = max(max_diff, float(np.abs(got - expected).max()))
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
            correct += int((got.argmax(1) == y.numpy()).sum())
    return OnnxCheck(max_diff, 100.0 * agree / len(test), 100.0 * correct / len(test))


def evaluate(
    model: nn.Module,
    test: ImageSet,
    name: str = "model",
    reference: nn.Module | None = None,
    batch_sizes: tuple[int, ...] = (1, 64),
    repeats: int = 30,
    onnx: bool = True,
    threads: int | None = None,
) -> EvalReport:
    """Accuracy, robustness to input noise, size, MACs/FLOPs, latency (torch and ORT), peak memory, ONNX agreement."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model.eval()
    input_shape = tuple(test.images.shape[1:])
    accuracy = evaluate_accuracy(model, test)
    proto = onnx_bytes(model, input_shape) if onnx else None
    size = measure_size(model, onnx_bytes=len(proto) if proto else None)
    report = EvalReport(name, input_shape, accuracy, size, count_compute(model, input_shape))
    report.flop_counter_flops = flop_counter_flops(model, input_shape)
    reference_predictions = None
    if reference is not None:
        report.compression_ratio = measure_size(reference).disk_bytes / size.disk_bytes
        reference_predictions = predictions(torch_predict(reference), test)
    report.robustness = measure_robustness(torch_predict(model), test, reference_predictions)
    largest = max(batch_sizes)
    report.peak_memory_bytes["torch"] = torch_peak_memory(model, input_shape, largest)
    report.latency += [torch_latency(model, input_shape, b, repeats) for b in batch_sizes]
    if proto is not None:
        threads = threads or torch.get_num_threads()
        report.peak_memory_bytes["onnxruntime"] = ort_peak_memory(proto, input_shape, largest, threads)
        session = ort_session(proto, threads)
        report.onnx = _onnx_check(session, model, test)
        report.latency += [ort_latency(session, input_shape, b, repeats) for b in batch_sizes]
    report.eval_time_s = time.perf_counter() - start
    return report
