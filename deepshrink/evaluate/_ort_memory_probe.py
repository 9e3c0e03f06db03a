"""Run as a script (``python _ort_memory_probe.py MODEL THREADS 64,1,28,28``) by
``deepshrink.evaluate.memory``, which explains the method. It imports nothing but the
standard library, numpy, onnx and onnxruntime, so the process it measures holds no torch,
no dataset and no deepshrink. Prints one JSON line of resident-memory deltas in bytes.
Its /proc helpers, ``status_kib`` and ``reset_peak``, are shared with that module."""

import json
import sys

import numpy as np


def status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Writing 5 to clear_refs sets the kernel's peak-RSS mark (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _session(model: str | bytes, threads: int):
    import onnxruntime as ort  # here, not at the top: deepshrink.evaluate.memory imports this file's /proc helpers

    # deepshrink.export.onnx.ort_session's options (that module imports torch, so not here),
    # with the arena off: each tensor is its own allocation, so RSS follows live tensors
    # instead of the arena's power-of-two growth.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _warm_up(threads: int) -> None:
    """One session of a one-node model pays ORT's one-time costs (kernel registry, library
    pages, thread pool) before the baseline, so they are not charged to the model."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "warm_up", [value], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _session(model.SerializeToString(), threads).run(None, {"x": np.ones(1, np.float32)})


def measure(model: str, threads: int, shape: tuple[int, ...]) -> dict[str, int]:
    """Resident bytes above the baseline: ``session_bytes`` held once the session is
    created (initializers, pre-packed weights, the optimised graph); ``run_peak_bytes``,
    the most held at any moment of creation plus one run of ``shape``. The input batch is
    allocated before the baseline, so it is not counted."""
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    _warm_up(threads)
    reset_peak()
    base = status_kib("VmRSS")
    session = _session(model, threads)
    created = status_kib("VmRSS")
    session.run(None, {session.get_inputs()[0].name: batch})
    return {"session_bytes": (created - base) * 1024, "run_peak_bytes": (status_kib("VmHWM") - base) * 1024}


if __name__ == "__main__":
    path, thread_count, dims = sys.argv[1], int(sys.argv[2]), tuple(int(d) for d in sys.argv[3].split(","))
    print(json.dumps(measure(path, thread_count, dims)))
