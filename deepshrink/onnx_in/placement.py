"""Where static int8 puts its QuantizeLinear/DequantizeLinear pairs.

The placement ONNX Runtime fuses into integer kernels (QLinearConv, QGemm,
QLinearMatMul, QLinearAdd, QLinearGlobalAveragePool), the rule of the PyTorch
path (``compress/quant/prepare.py``) plus global average pooling: every
activation input of a quantized Conv/Gemm/MatMul, of a two-activation Add and
of a global average pool is on the uint8 grid, and so is their output (after
its ReLU when a ReLU is the only consumer), unless only the graph output reads
it (a classifier's logits stay float: QGemm writes float).
Ops that keep values on the grid (max pooling, flatten, reshape, ReLU, ...)
pass the grid on: a pair after them reuses their input's scale, no new range.
"""

from dataclasses import dataclass, field

import onnx

from deepshrink.onnx_in.model import consumers, graph_inputs
from deepshrink.onnx_in.weights import WeightRef

GRID_KEEPING = {"MaxPool", "Flatten", "Reshape", "Relu", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
# Global average pooling runs on uint8 (QLinearGlobalAveragePool, channels last) when its input and output
# are on the grid; in float it would need the NHWC tensor transposed back first.
POOLING = {"GlobalAveragePool"}
FLOAT = onnx.TensorProto.FLOAT


@dataclass
class Placement:
    """``points``: tensors that get a Q/DQ pair, in graph order; ``source[t]``: the tensor whose
    observed range ``t`` uses (itself, or the input of the grid-keeping ops it came through)."""

    points: list[str] = field(default_factory=list)
    source: dict[str, str] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)  # names of the nodes that run on integers

    @property
    def observed(self) -> list[str]:
        return [t for t in self.points if self.source[t] == t]


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of tensors known to be float32 (graph inputs/outputs, value_info after shape inference)."""
    graph = model.graph
    values = (*graph.input, *graph.output, *graph.value_info)
    return {v.name for v in values if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type == FLOAT}


def _sole_relu(node: onnx.NodeProto, users: dict[str, list[onnx.NodeProto]], outputs: set[str]) -> str:
    """The tensor to quantize after ``node``: its ReLU's output when a ReLU is its only reader."""
    out = node.output[0]
    readers = users.get(out, [])
    if len(readers) == 1 and readers[0].op_type == "Relu" and out not in outputs:
        return readers[0].output[0]
    return out


def _is_quantized(node: onnx.NodeProto, weights: set[str], floats: set[str], initializers: set[str]) -> bool:
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in ("Conv", "Gemm", "MatMul"):
        return len(node.input) > 1 and node.input[1] in weights
    if node.op_type == "Add":
        return len(node.input) == 2 and all(t in floats and t not in initializers for t in node.input)
    return node.op_type in POOLING and node.input[0] in floats


def _activation_inputs(node: onnx.NodeProto) -> list[str]:
    return list(node.input) if node.op_type == "Add" else [node.input[0]]


def plan_placement(model: onnx.ModelProto, refs: list[WeightRef]) -> Placement:
    """The Q/DQ points of ``model`` (shape-inferred) for the weight layers ``refs``."""
    users = consumers(model)
    outputs = {o.name for o in model.graph.output}
    initializers = {t.name for t in model.graph.initializer}
    floats = float_tensors(model) | {i.name for i in graph_inputs(model)}
    weights = {ref.initializer for ref in refs}
    plan = Placement()

    def need(tensor: str) -> None:
        plan.source.setdefault(tensor, tensor)
        if tensor not in plan.points:
            plan.points.append(tensor)

    for index, node in enumerate(model.graph.node):
        if _is_quantized(node, weights, floats, initializers):
            for tensor in _activation_inputs(node):
                need(tensor)
            out = _sole_relu(node, users, outputs)
            if users.get(out):
                need(out)
            plan.nodes.append(node.name or f"{node.op_type}_{index}")
        elif node.op_type in GRID_KEEPING and node.input and node.input[0] in plan.source and node.output[0] not in plan.source:
            plan.source[node.output[0]] = plan.source[node.input[0]]
    # A grid-keeping op's output that no quantized op reads needs no pair of its own.
    plan.source = {t: s for t, s in plan.source.items() if t in plan.points}
    return plan
