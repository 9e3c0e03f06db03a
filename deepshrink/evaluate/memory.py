"""Memory of the model itself, not of the process around it.

A study cell's process holds torch, the dataset and the training code: about 1.1 GB
whatever the model, so its peak RSS says nothing about the model. Two measures instead:

* ``ort_memory``: ONNX Runtime's memory for the model, measured in a fresh subprocess
  (``_ort_memory_probe.py``) that imports only numpy, onnx and onnxruntime. After a
  warm-up session on a one-node model has paid ORT's one-time costs, the baseline RSS
  is read and the kernel's peak mark reset (``/proc/self/clear_refs``); then the session
  is created and one batch runs. The session runs with the CPU arena off and glibc's
  mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every tensor buffer is
  its own mapping, mapped when allocated and returned when freed: the peak RSS above the
  baseline is then initializers + pre-packed weights + the peak of live intermediate
  tensors, not the arena's power-of-two growth or the allocator's history. RSS counts
  pages actually touched, so it is a measure, not an estimate from shapes.
* ``PeakRSS``: the peak RSS above the RSS at its start, around the recipe's steps
  (compression, training, export). tracemalloc sees only Python's allocator and torch's
  CPU allocator keeps no statistics, so the kernel's peak mark is the measure that sees
  every tensor, reset at the start so the baseline's own history does not count.

Both need Linux's ``/proc``; elsewhere they give None (the report shows "-").
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deepshrink.core.errors import DeepShrinkError
from deepshrink.evaluate._ort_memory_probe import reset_peak, status_kib

PROBE = Path(__file__).with_name("_ort_memory_probe.py")
_PROC = Path("/proc/self/clear_refs")
MB = 1024 * 1024


@dataclass(frozen=True)
class OrtMemory:
    session_bytes: int  # held once the session exists: initializers, pre-packed weights, graph
    run_peak_bytes: int  # the most held through creation plus one inference of the batch

    @property
    def session_mb(self) -> float:
        return self.session_bytes / MB

    @property
    def run_peak_mb(self) -> float:
        return self.run_peak_bytes / MB


def ort_memory(onnx_path: str | Path, input_shape: tuple[int, ...], batch: int = 64, threads: int = 1) -> OrtMemory | None:
    """ONNX Runtime's memory for one ``batch`` x ``input_shape`` inference of the file (see module doc)."""
    if not _PROC.exists():
        return None
    shape = ",".join(str(d) for d in (batch, *input_shape))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(PROBE), str(onnx_path), str(threads), shape]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise DeepShrinkError(f"ORT memory probe failed on {onnx_path}: {done.stderr.strip().splitlines()[-1:]}")
    return OrtMemory(**json.loads(done.stdout.splitlines()[-1]))


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.bytes``: the most resident memory held
    above the RSS at entry, at any moment inside the block (None without /proc)."""

    bytes: int | None = None

    def __enter__(self) -> "PeakRSS":
        self._base = None
        if _PROC.exists():
            reset_peak()  # the kernel's peak mark restarts at the current RSS
            self._base = status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self._base is not None:
            self.bytes = (status_kib("VmHWM") - self._base) * 1024

    @property
    def mb(self) -> float | None:
        return None if self.bytes is None else self.bytes / MB
