"""Running ONNX models in ONNX Runtime over an input set, and the op types ORT actually runs
after its own graph optimisations (to see that QDQ became QLinearConv). Sessions come from
``export.onnx.ort_session``; fidelity and Top-1 from ``evaluate``."""

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from deepshrink.core.errors import InputError
from deepshrink.export.onnx import ort_session
from deepshrink.onnx_in.data import NpzInputs

BATCH = 256


def run_outputs(sess, data: NpzInputs, outputs: list[str] | None = None, batch: int = BATCH) -> list[np.ndarray]:
    """Every requested output (all by default) over the whole input set, concatenated on the sample axis."""
    parts: list[list[np.ndarray]] = []
    for feed in data.batches(batch):
        try:
            result = sess.run(outputs, feed)
        except Exception as exc:  # a wrong feed (dtype, rank) is the user's data
            raise InputError(f"ONNX Runtime failed on the inputs ({str(exc).strip().splitlines()[0]})") from None
        parts.append(result)
    return [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]


def all_outputs(model: onnx.ModelProto | bytes, data: NpzInputs, threads: int | None = None) -> dict[str, np.ndarray]:
    """Every graph output over ``data``, by name, in the graph's order."""
    sess = ort_session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, run_outputs(sess, data, names), strict=True))


def first_output(model: onnx.ModelProto | bytes, data: NpzInputs, threads: int | None = None) -> np.ndarray:
    """The model's first output over ``data`` (the logits of a classifier)."""
    sess = ort_session(model, threads)
    return run_outputs(sess, data, [sess.get_outputs()[0].name])[0]


def optimized_op_counts(model: onnx.ModelProto | bytes, threads: int | None = 1) -> Counter:
    """Op types of the graph ORT runs after its optimisations (QDQ groups fused into QLinearConv, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        ort_session(model, threads, str(path))
        return Counter(node.op_type for node in onnx.load(str(path)).graph.node)
