"""ONNX export of fake-quant models in QDQ form with real integer weights.

The exporter writes each fake-quant op as QuantizeLinear -> DequantizeLinear.
For weights that pair starts from a float constant, so we store the integer
codes instead (int8 initializer -> DequantizeLinear: 4x fewer bytes) and, like
ONNX Runtime's own quantizer, store Conv/Gemm biases as int32 at the scale
input_scale x weight_scale. ONNX Runtime then fuses DQ -> Conv -> Q into
QLinearConv (and Gemm, Add, pooling alike) and runs integer kernels.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from deepshrink.compress.quant.modules import frozen_for_export
from deepshrink.export.onnx import OPSET, ExportError, check_exported, onnx_bytes, write_atomic


def export_quantized_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], opset: int = OPSET) -> Path:
    """Export a fake-quant model (from ``deepshrink.quantize``) as a checked QDQ ONNX file, atomically."""
    return write_atomic(path, quantized_onnx_bytes(model, input_shape, opset))


def quantized_onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], opset: int = OPSET) -> bytes:
    with frozen_for_export(model):
        proto = onnx.load_from_string(onnx_bytes(model, input_shape, opset, constant_folding=False))
    _constants_to_initializers(proto.graph)
    _fold_constant_casts(proto.graph)
    _fold_weight_quantize(proto.graph)
    _quantize_biases(proto.graph)
    check_exported(proto, "quantized ONNX")
    return proto.SerializeToString()


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes become initializers, so every constant is found in one place."""
    for node in [n for n in graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]:
        tensor = numpy_helper.to_array(node.attribute[0].t)
        graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
        graph.node.remove(node)


def _fold_constant_casts(graph: onnx.GraphProto) -> None:
    """Cast/Identity of a constant -> a constant (the exporter casts zero points to
    int8/uint8 and links equal initializers through Identity)."""
    constants = _initializers(graph)
    while casts := [n for n in graph.node if n.op_type in ("Cast", "Identity") and n.input[0] in constants]:
        for node in casts:  # chains fold over several rounds
            value = constants[node.input[0]]
            if node.op_type == "Cast":
                value = value.astype(helper.tensor_dtype_to_np_dtype(next(a.i for a in node.attribute if a.name == "to")))
            constants[node.output[0]] = value
            graph.initializer.append(numpy_helper.from_array(constants[node.output[0]], node.output[0]))
            graph.node.remove(node)


def _initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _broadcast(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _get_axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _fold_weight_quantize(graph: onnx.GraphProto) -> None:
    """QuantizeLinear(float constant) -> its integer codes as an initializer."""
    constants = _initializers(graph)
    for node in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in constants]:
        x, scale, zero_point = (constants[name] for name in node.input[:3])
        axis = _get_axis(node) % x.ndim
        info = np.iinfo(zero_point.dtype)
        codes = np.rint(x / _broadcast(scale, axis, x.ndim)) + _broadcast(zero_point, axis, x.ndim).astype(np.int64)
        codes = np.clip(codes, info.min, info.max).astype(zero_point.dtype)
        graph.initializer.append(numpy_helper.from_array(codes, node.output[0]))
        graph.node.remove(node)
    _drop_unused_initializers(graph)


def _producer(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if tensor in n.output), None)


def _quantize_biases(graph: onnx.GraphProto) -> None:
    """Float Conv/Gemm biases -> int32 codes at scale x_scale * w_scale, zero point 0."""
    constants = _initializers(graph)
    for node in [n for n in graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3 and n.input[2] in constants]:
        x_dq, w_dq = _producer(graph, node.input[0]), _producer(graph, node.input[1])
        if not (x_dq and w_dq and x_dq.op_type == w_dq.op_type == "DequantizeLinear"):
            continue
        x_scale, w_scale = constants[x_dq.input[1]], constants[w_dq.input[1]]
        bias = constants[node.input[2]]
        scale = (x_scale * w_scale).astype(np.float32) * np.ones_like(bias, dtype=np.float32)
        codes = np.rint(bias / scale).clip(-(2**31), 2**31 - 1).astype(np.int32)
        base = node.input[2]
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes, f"{base}_int32"),
                numpy_helper.from_array(scale, f"{base}_int32_scale"),
                numpy_helper.from_array(np.zeros_like(codes), f"{base}_int32_zero_point"),
            ]
        )
        graph.node.append(
            helper.make_node(
                "DequantizeLinear", [f"{base}_int32", f"{base}_int32_scale", f"{base}_int32_zero_point"], [f"{base}_dequantized"], axis=0
            )
        )
        node.input[2] = f"{base}_dequantized"
    _drop_unused_initializers(graph)
    _topological_sort(graph)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _topological_sort(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ExportError("quantized ONNX graph has a cycle or a missing input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
            pending.remove(node)
    del graph.node[:]
    graph.node.extend(ordered)
