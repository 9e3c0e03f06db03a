"""Calibration through ONNX Runtime: intermediate tensors become graph outputs,
the calibration inputs stream through in batches, and deepshrink's observers (the
PyTorch path's own) or per-channel means are updated batch by batch, so memory
stays flat in the number of samples."""

from collections.abc import Iterator

import numpy as np
import onnx
import torch
from onnx import helper

from deepshrink.compress.quant.calibration import ChannelMeans
from deepshrink.compress.quant.observers import make_observer
from deepshrink.compress.quant.primitives import QuantSpec
from deepshrink.export.onnx import ort_session
from deepshrink.onnx_in.data import NpzInputs
from deepshrink.onnx_in.model import graph_inputs

CALIB_BATCH = 64


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that returns exactly the tensors ``names``, without the nodes they do not need."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    known = {v.name: v for v in (*graph.value_info, *graph.output)}
    outputs = [known.get(name) or helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in dict.fromkeys(names)]
    del graph.output[:]
    graph.output.extend(outputs)
    needed, kept = set(names), []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(t for t in node.input if t)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return out


def stream_tensors(model: onnx.ModelProto, data: NpzInputs, names: list[str], batch: int = CALIB_BATCH) -> Iterator[dict[str, np.ndarray]]:
    """For every batch of ``data``: the values of ``names`` (graph inputs come from the feed)."""
    inputs = {i.name for i in graph_inputs(model)}
    computed = [n for n in names if n not in inputs]
    sess = ort_session(with_outputs(model, computed), layout=False) if computed else None
    for feed in data.batches(batch):
        values = dict(zip(computed, sess.run(computed, feed), strict=True)) if sess else {}
        values.update({n: feed[n] for n in names if n in inputs})
        yield values


def observe(model: onnx.ModelProto, data: NpzInputs, names: list[str], observer: str, spec: QuantSpec) -> dict[str, tuple[float, int]]:
    """(scale, zero point) per tensor from the observer ``observer`` over ``data``."""
    observers = {name: make_observer(observer, spec) for name in names}
    for values in stream_tensors(model, data, names):
        for name, value in values.items():
            observers[name].update(torch.from_numpy(value))
    result = {}
    for name, obs in observers.items():
        scale, zero_point = obs.qparams()
        result[name] = (float(scale.reshape(())), int(zero_point.reshape(())))
    return result


def _channel_sum(value: np.ndarray, axis: int) -> np.ndarray:
    return value.astype(np.float64).sum(axis=tuple(i for i in range(value.ndim) if i != axis))


def channel_means(model: onnx.ModelProto, data: NpzInputs, axes: dict[str, int]) -> dict[str, np.ndarray]:
    """Mean of each tensor per channel (``axes[name]`` is the channel axis) over ``data``."""
    means = ChannelMeans()
    for values in stream_tensors(model, data, list(axes)):
        for name, value in values.items():
            axis = axes[name] % value.ndim
            means.add(name, _channel_sum(value, axis), value.size // value.shape[axis])
    return means.means()
