"""Latency (median and p90 over repeated runs after warm-up) and peak inference
memory, in PyTorch and ONNX Runtime, under a fixed thread count."""

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from deepshrink.export.onnx import ort_session, run_ort

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class LatencyResult:
    backend: str  # "torch" or "onnxruntime"
    batch_size: int
    median_ms: float
    p90_ms: float
    runs: int


def time_callable(fn: Callable[[], object], repeats: int, warmup: int = 5) -> tuple[float, float]:
    """(median, p90) wall milliseconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def torch_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, repeats: int = 30) -> LatencyResult:
    model.eval()
    x = torch.randn(batch_size, *input_shape)
    with torch.inference_mode():
        median, p90 = time_callable(lambda: model(x), repeats)
    return LatencyResult("torch", batch_size, median, p90, repeats)


def ort_latency(session, input_shape: tuple[int, ...], batch_size: int, repeats: int = 30) -> LatencyResult:
    x = torch.randn(batch_size, *input_shape)
    median, p90 = time_callable(lambda: run_ort(session, x), repeats)
    return LatencyResult("onnxruntime", batch_size, median, p90, repeats)


def ort_latency_interleaved(
    sessions: dict, input_shape: tuple[int, ...], batch_size: int, repeats: int = 30, rounds: int = 3
) -> dict[str, tuple[float, float]]:
    """(median, p90) ms per named session, timed in alternating rounds so that
    drift and warm-up hit every session alike (a speedup is two timings of one run)."""
    runs: dict[str, list[LatencyResult]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            runs[name].append(ort_latency(session, input_shape, batch_size, repeats))
    return {name: (statistics.median(r.median_ms for r in rs), statistics.median(r.p90_ms for r in rs)) for name, rs in runs.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_rss_delta(fn: Callable[[], object], runs: int = 3) -> int:
    """Peak resident memory above the starting level while ``fn`` runs, sampled every 0.2 ms.

    RSS counts what the process really holds (weights, activations, allocator
    caches), which is what a deployment pays for; allocator reuse can make a
    second measurement in one process lower than the first.
    """
    gc.collect()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(runs):
            fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, _rss_bytes()) - base


def torch_peak_memory(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> int:
    x = torch.randn(batch_size, *input_shape)

    def infer() -> None:
        with torch.inference_mode():
            model(x)

    return peak_rss_delta(infer)


def ort_peak_memory(onnx_model: bytes, input_shape: tuple[int, ...], batch_size: int, threads: int | None) -> int:
    """Memory to create an ORT session and run it once: what deploying the ONNX file costs."""
    x = torch.randn(batch_size, *input_shape)
    return peak_rss_delta(lambda: run_ort(ort_session(onnx_model, threads), x), runs=1)
