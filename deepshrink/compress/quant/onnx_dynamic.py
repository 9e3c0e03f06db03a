"""Dynamic int8 ONNX: rewrite an fp32 graph's constant-weight MatMul/Gemm (and Gather) nodes.

Each MatMul ``y = x @ W`` with a constant ``W`` becomes::

    DynamicQuantizeLinear(x) -> x_q (uint8), x_scale, x_zero_point
    MatMulInteger(x_q, W_q, x_zero_point, W_zero_point) -> int32
    Cast(float) -> Mul(x_scale * W_scale) -> y

which ONNX Runtime fuses into ``DynamicQuantizeMatMul`` (integer GEMM kernels).
Weights are symmetric int8 per output channel. By default they are stored as
uint8 with zero point 128 (the same codes shifted by 128), which runs ORT's
u8 x u8 kernels: exact on every CPU. ``weight_type="int8"`` stores them signed
for the u8 x s8 kernels, faster on x86, but on CPUs without VNNI those sum
pairs of products in saturating 16-bit arithmetic, so ORT then no longer
computes exactly what the torch model (``DynamicQuantLinear``) does.

Embedding tables (``Gather`` on a constant float matrix along axis 0) become
int8 rows gathered and multiplied by their gathered per-row scale, so the
table is stored at one byte per value and only the rows used are dequantized.
"""

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from deepshrink.compress.quant.dynamic import dequantized_copy, dynamic_quant_layers, quantize_per_channel
from deepshrink.core.errors import InputError
from deepshrink.core.hardware import cpu_has_vnni
from deepshrink.export.names import NameGen
from deepshrink.export.onnx import check_exported, onnx_bytes

WeightType = Literal["uint8", "int8"]
Kind = Literal["matmul", "gather"]


def cpu_weight_type() -> WeightType:
    """int8 weights where the CPU has VNNI/AMX (ORT's u8 x s8 kernels are exact there, and fastest);
    uint8 elsewhere, where those kernels saturate and the u8 x u8 ones stay exact."""
    return "int8" if cpu_has_vnni() else "uint8"


@dataclass(frozen=True)
class QuantizedWeight:
    """Int8 codes ``[channels, features]`` and one fp32 scale per channel (row)."""

    q: np.ndarray
    scale: np.ndarray


# A policy sees an initializer (name, channel-first fp32 array, how it is used) and
# returns its quantization, or None to keep it in fp32.
Policy = Callable[[str, np.ndarray, Kind], QuantizedWeight | None]


@dataclass
class RewriteReport:
    quantized: dict[str, Kind] = field(default_factory=dict)  # initializer -> how it is used
    kept_fp32: list[str] = field(default_factory=list)  # candidates the policy left in fp32


def default_policy(embeddings: bool = True, exclude: Iterable[str] = (), min_elements: int = 0, reduce_range: bool = False) -> Policy:
    """Quantize every candidate (per channel, symmetric) except ``exclude`` and tiny tensors."""
    excluded = set(exclude)

    def policy(name: str, weight: np.ndarray, kind: Kind) -> QuantizedWeight | None:
        if name in excluded or weight.size < min_elements or (kind == "gather" and not embeddings):
            return None
        q, scale = quantize_per_channel(torch.from_numpy(np.array(weight, dtype=np.float32)), reduce_range)
        return QuantizedWeight(q.numpy(), scale.numpy())

    return policy


def quantize_onnx_dynamic(
    model: onnx.ModelProto | bytes | str | Path,
    policy: Policy | None = None,
    weight_type: WeightType = "uint8",
    report: RewriteReport | None = None,
) -> onnx.ModelProto:
    """The dynamic int8 version of an fp32 ONNX model (checked with ``onnx.checker``, full check)."""
    if weight_type not in ("uint8", "int8"):
        raise InputError(f"weight_type must be 'uint8' or 'int8', got {weight_type!r}")
    proto = _load(model)
    _Rewriter(proto, policy or default_policy(), weight_type, report or RewriteReport()).run()
    check_exported(proto, "dynamic int8 ONNX")
    return proto


def _load(model: onnx.ModelProto | bytes | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return onnx.ModelProto.FromString(model.SerializeToString())
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    path = Path(model)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types on garbage
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None


class _Rewriter:
    """One pass over the graph: candidate nodes are replaced in place, in topological order."""

    def __init__(self, proto: onnx.ModelProto, policy: Policy, weight_type: WeightType, report: RewriteReport) -> None:
        self.graph = proto.graph
        self.policy, self.weight_type, self.report = policy, weight_type, report
        self.inits = {init.name: init for init in self.graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.decisions: dict[str, QuantizedWeight | None] = {}
        self.dynamic_inputs: dict[str, tuple[str, str, str]] = {}  # x -> (x_q, x_scale, x_zero_point)
        self.names = NameGen(proto)

    def run(self) -> None:
        nodes: list[onnx.NodeProto] = []
        for node in self.graph.node:
            nodes.extend(self._rewrite(node) or [node])
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self._drop_unused_initializers()

    # -- candidates ----------------------------------------------------------
    def _candidate(self, node: onnx.NodeProto) -> tuple[str, Kind, bool] | None:
        """(constant weight, use, whether it is stored transposed) of a candidate node, or None."""
        if node.op_type == "MatMul" and self._is_float_matrix(node.input[1]):
            return node.input[1], "matmul", True
        if node.op_type == "Gemm" and self._plain_gemm(node):
            return node.input[1], "matmul", not _attr(node, "transB", 0)
        if node.op_type == "Gather" and _attr(node, "axis", 0) == 0 and self._is_float_matrix(node.input[0]):
            return node.input[0], "gather", False
        return None

    def _uses_as_weight(self, node: onnx.NodeProto, name: str, kind: Kind) -> bool:
        found = self._candidate(node)
        return found is not None and found[:2] == (name, kind) and list(node.input).count(name) == 1

    def _is_float_matrix(self, name: str) -> bool:
        init = self.inits.get(name)
        return init is not None and init.data_type == TensorProto.FLOAT and len(init.dims) == 2 and min(init.dims) > 0

    def _plain_gemm(self, node: onnx.NodeProto) -> bool:
        return (
            self._is_float_matrix(node.input[1])
            and _attr(node, "transA", 0) == 0
            and _attr(node, "alpha", 1.0) == 1.0
            and (len(node.input) < 3 or not node.input[2] or _attr(node, "beta", 1.0) == 1.0)
        )

    def _decide(self, name: str, kind: Kind, transposed: bool) -> QuantizedWeight | None:
        """Ask the policy once per initializer (channel-first weight); shared with a non-candidate use, it stays fp32."""
        if name not in self.decisions:
            uses = self.consumers.get(name, [])
            only_candidates = all(self._uses_as_weight(n, name, kind) for n in uses) and name not in _graph_names(self.graph.output)
            weight = numpy_helper.to_array(self.inits[name])
            weight = weight.T if transposed else weight
            decision = self.policy(name, weight, kind) if only_candidates else None
            if decision is not None:
                _check_decision(name, weight, decision)
                self.report.quantized[name] = kind
            else:
                self.report.kept_fp32.append(name)
            self.decisions[name] = decision
        return self.decisions[name]

    def _rewrite(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        found = self._candidate(node)
        if found is None:
            return None
        name, kind, transposed = found
        decision = self._decide(name, kind, transposed)
        if decision is None:
            return None
        return self._gather(node, name, decision) if kind == "gather" else self._matmul(node, name, decision)

    # -- replacements --------------------------------------------------------
    def _matmul(self, node: onnx.NodeProto, weight: str, qw: QuantizedWeight) -> list[onnx.NodeProto]:
        w_q, w_zp, w_scale = self._matmul_constants(weight, qw)
        out = node.output[0]
        nodes, (x_q, x_scale, x_zp) = self._dynamic_input(node.input[0])
        acc, accf, scale = self.names(f"{out}_acc"), self.names(f"{out}_accf"), self.names(f"{out}_scale")
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        product = self.names(f"{out}_nobias") if has_bias else out
        base = node.name or out
        nodes += [
            helper.make_node("MatMulInteger", [x_q, w_q, x_zp, w_zp], [acc], name=self.names(f"{base}_MatMulInteger")),
            helper.make_node("Cast", [acc], [accf], to=TensorProto.FLOAT, name=self.names(f"{base}_Cast")),
            helper.make_node("Mul", [x_scale, w_scale], [scale], name=self.names(f"{base}_ScaleProduct")),
            helper.make_node("Mul", [accf, scale], [product], name=self.names(f"{base}_Rescale")),
        ]
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [out], name=self.names(f"{base}_Bias")))
        return nodes

    def _matmul_constants(self, weight: str, qw: QuantizedWeight) -> tuple[str, str, str]:
        """Initializers for W_q ``[K, N]``, its zero points and scales (added once per weight)."""
        names = (f"{weight}_quantized", f"{weight}_zero_point", f"{weight}_scale")
        if names[0] in self.inits:
            return names
        codes = qw.q.astype(np.int8).T
        zero = np.zeros(codes.shape[1], np.int8)
        if self.weight_type == "uint8":
            codes, zero = (codes.astype(np.int16) + 128).astype(np.uint8), np.full(codes.shape[1], 128, np.uint8)
        self._add_init(np.ascontiguousarray(codes), names[0])
        self._add_init(zero, names[1])
        self._add_init(qw.scale.astype(np.float32), names[2])
        return names

    def _dynamic_input(self, x: str) -> tuple[list[onnx.NodeProto], tuple[str, str, str]]:
        """One DynamicQuantizeLinear per activation tensor, shared by the MatMuls that read it."""
        if x in self.dynamic_inputs:
            return [], self.dynamic_inputs[x]
        outs = (self.names(f"{x}_quantized"), self.names(f"{x}_scale"), self.names(f"{x}_zero_point"))
        self.dynamic_inputs[x] = outs
        return [helper.make_node("DynamicQuantizeLinear", [x], list(outs), name=self.names(f"{x}_DynamicQuantizeLinear"))], outs

    def _gather(self, node: onnx.NodeProto, table: str, qw: QuantizedWeight) -> list[onnx.NodeProto]:
        q_name, s_name = f"{table}_quantized", f"{table}_row_scale"
        if q_name not in self.inits:
            self._add_init(qw.q.astype(np.int8), q_name)
            self._add_init(qw.scale.astype(np.float32)[:, None], s_name)
        ids, out = node.input[1], node.output[0]
        rows, rowsf, scales = self.names(f"{out}_int8"), self.names(f"{out}_rows"), self.names(f"{out}_row_scale")
        base = node.name or out
        return [
            helper.make_node("Gather", [q_name, ids], [rows], axis=0, name=self.names(f"{base}_GatherInt8")),
            helper.make_node("Cast", [rows], [rowsf], to=TensorProto.FLOAT, name=self.names(f"{base}_Cast")),
            helper.make_node("Gather", [s_name, ids], [scales], axis=0, name=self.names(f"{base}_GatherScale")),
            helper.make_node("Mul", [rowsf, scales], [out], name=self.names(f"{base}_Dequantize")),
        ]

    # -- bookkeeping ---------------------------------------------------------
    def _add_init(self, array: np.ndarray, name: str) -> None:
        init = numpy_helper.from_array(array, name)
        self.graph.initializer.append(init)
        self.inits[name] = init
        self.names.used.add(name)

    def _drop_unused_initializers(self) -> None:
        used = {name for node in self.graph.node for name in node.input} | _graph_names(self.graph.output)
        keep = [init for init in self.graph.initializer if init.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        graph_inputs = [i for i in self.graph.input if i.name not in self.inits or i.name in used]
        del self.graph.input[:]
        self.graph.input.extend(graph_inputs)


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _graph_names(values) -> set[str]:
    return {v.name for v in values}


def _check_decision(name: str, weight: np.ndarray, qw: QuantizedWeight) -> None:
    if qw.q.shape != weight.shape or qw.scale.shape != (weight.shape[0],):
        raise InputError(
            f"quantization for {name!r} has codes {qw.q.shape} and scales {qw.scale.shape}; the weight is {weight.shape} (channel-first)"
        )


# -- from a dynamically quantized torch model -------------------------------------------
def _key(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    return array.shape, hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def torch_policy(model: nn.Module) -> Policy:
    """Quantize exactly the layers ``model`` quantized, with its own codes and scales.

    ONNX export renames and transposes weights, so initializers are matched to
    layers by value: the export of ``dequantized_copy(model)`` holds, for each
    int8 layer, the float weight ``q * scale``; any other weight stays fp32.
    """
    table: dict[tuple, tuple[Kind, QuantizedWeight]] = {}
    for module in dynamic_quant_layers(model).values():
        kind: Kind = "matmul" if hasattr(module, "in_features") else "gather"
        qw = QuantizedWeight(module.qweight.numpy(), module.scale.numpy())
        table[_key(module.dequantized_weight().numpy())] = (kind, qw)

    def policy(name: str, weight: np.ndarray, kind: Kind) -> QuantizedWeight | None:
        found = table.get(_key(weight))
        return found[1] if found is not None and found[0] == kind else None

    return policy


def dynamic_onnx_from_torch(
    model: nn.Module, export: Callable[[nn.Module], bytes], weight_type: WeightType = "uint8", report: RewriteReport | None = None
) -> bytes:
    """Export a ``DynamicQuant`` model: ``export`` writes the float proxy, the rewrite uses the model's int8 codes."""
    if not dynamic_quant_layers(model):
        raise InputError("the model has no dynamically quantized layers; apply DynamicQuant first")
    proxy = dequantized_copy(model)
    return quantize_onnx_dynamic(export(proxy), torch_policy(model), weight_type, report).SerializeToString()


def dynamic_onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], weight_type: WeightType = "uint8") -> bytes:
    """A dynamically quantized model with one float input (an MLP, say) as dynamic int8 ONNX."""
    return dynamic_onnx_from_torch(model, lambda proxy: onnx_bytes(proxy, input_shape), weight_type)
