"""4-bit weights in ONNX: constant-weight MatMul/Gemm nodes become ONNX Runtime's ``MatMulNBits``.

``MatMulNBits`` (domain ``com.microsoft``) holds the weight as packed 4-bit
codes ``[N, blocks, block_size / 2]`` (two codes a byte, low nibble first),
one fp32 scale per block and, when asymmetric, packed 4-bit zero points
(default 8). Export goes through the float proxy: the torch model's 4-bit
layers already hold their dequantized weights, so the fp32 export carries
them and each is matched back to its codes by value (as ``torch_policy`` does
for int8), then rewritten.
"""

import hashlib
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from deepshrink.compress.quant.blockwise4 import Blocks4, Blockwise4Linear, blockwise4_layers
from deepshrink.compress.quant.dynamic import dynamic_quant_layers
from deepshrink.compress.quant.onnx_dynamic import WeightType, dynamic_onnx_from_torch
from deepshrink.core.errors import InputError
from deepshrink.export.names import NameGen
from deepshrink.export.onnx import check_exported

MS_DOMAIN = "com.microsoft"


def _key(weight: np.ndarray) -> tuple:
    """Value key of a channel-first ``[N, K]`` weight."""
    array = np.ascontiguousarray(weight, dtype=np.float32)
    return array.shape, hashlib.sha256(array.tobytes()).hexdigest()


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pairs of 4-bit codes along the last axis as bytes, low nibble first (an odd count is padded with 0)."""
    codes = codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _initializers(layer: Blockwise4Linear) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero points or None) in MatMulNBits layout."""
    blocks: Blocks4 = layer.blocks
    packed = pack_nibbles(blocks.codes.numpy())  # [N, blocks, block_size / 2]
    scales = blocks.scale.numpy().astype(np.float32).reshape(-1)
    zeros = None if layer.symmetric else pack_nibbles(blocks.zero.numpy()).reshape(-1)
    return packed, scales, zeros


def rewrite_matmul_nbits(proto: onnx.ModelProto, model: nn.Module) -> list[str]:
    """Replace (in place) every MatMul/Gemm whose weight is one of ``model``'s 4-bit layers; returns the weights rewritten."""
    table = {_key(layer.weight.detach().numpy()): layer for layer in blockwise4_layers(model).values()}
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    names, nodes, rewritten = NameGen(proto), [], {}
    for node in graph.node:
        found = _weight_of(node, inits)
        layer = table.get(_key(found[1])) if found else None
        if layer is None:
            nodes.append(node)
            continue
        weight_name = found[0]
        if weight_name not in rewritten:
            rewritten[weight_name] = _add_constants(graph, inits, names, weight_name, layer)
        nodes.extend(_matmul_nbits(node, rewritten[weight_name], layer, names))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {n for node in graph.node for n in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if rewritten and not any(op.domain == MS_DOMAIN for op in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return list(rewritten)


def _weight_of(node: onnx.NodeProto, inits: dict) -> tuple[str, np.ndarray] | None:
    """(initializer, channel-first weight) of a MatMul or plain Gemm with a constant fp32 2-d weight."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    weight = numpy_helper.to_array(inits[node.input[1]])
    if weight.ndim != 2 or weight.dtype != np.float32:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
        return None
    transposed = node.op_type == "MatMul" or not attrs.get("transB", 0)
    return node.input[1], weight.T if transposed else weight


def _add_constants(graph, inits, names, weight_name: str, layer: Blockwise4Linear) -> tuple[str, str, str | None]:
    packed, scales, zeros = _initializers(layer)
    out = (names(f"{weight_name}_Q4"), names(f"{weight_name}_scales"), names(f"{weight_name}_zero_points") if zeros is not None else None)
    for array, name in zip((packed, scales, zeros), out, strict=True):
        if name is not None:
            graph.initializer.append(numpy_helper.from_array(array, name))
    return out


def _matmul_nbits(node: onnx.NodeProto, constants, layer: Blockwise4Linear, names: NameGen) -> list[onnx.NodeProto]:
    b, scales, zeros = constants
    has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
    out = node.output[0]
    product = names(f"{out}_nobias") if has_bias else out
    inputs = [node.input[0], b, scales] + ([zeros] if zeros else [])
    nodes = [
        helper.make_node(
            "MatMulNBits",
            inputs,
            [product],
            domain=MS_DOMAIN,
            name=names(f"{node.name or out}_MatMulNBits"),
            K=layer.in_features,
            N=layer.out_features,
            bits=4,
            block_size=layer.block_size,
            accuracy_level=0,
        )
    ]
    if has_bias:
        nodes.append(helper.make_node("Add", [product, node.input[2]], [out], name=names(f"{node.name or out}_Bias")))
    return nodes


def nbits_onnx_from_torch(model: nn.Module, export: Callable[[nn.Module], bytes], weight_type: WeightType = "uint8") -> bytes:
    """Export a model with 4-bit layers (and optionally dynamic int8 ones): ``export`` writes the float proxy."""
    if not blockwise4_layers(model):
        raise InputError("the model has no 4-bit layers; apply Blockwise4 first")
    raw = dynamic_onnx_from_torch(model, export, weight_type) if dynamic_quant_layers(model) else export(model)
    proto = onnx.load_from_string(raw)
    rewrite_matmul_nbits(proto, model)
    check_exported(proto, "4-bit ONNX")
    return proto.SerializeToString()
