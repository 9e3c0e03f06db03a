"""ONNX backends of dynamic int8 (``DynamicQuant``) and 4-bit weight-only (``Blockwise4``): the same codes as
the torch methods, written straight into a graph that has no PyTorch source (an exported encoder, say).

Dynamic int8 is ``quantize_onnx_dynamic`` (constant-weight MatMul/Gemm -> ORT ``DynamicQuantizeMatMul``,
constant Gather tables -> int8 rows). 4-bit quantizes each constant MatMul/Gemm weight with
``quantize_blocks``, puts the dequantized weight in the graph and lets ``rewrite_matmul_nbits`` (the torch
path's rewrite, which finds layers by weight value) turn those nodes into ``MatMulNBits``; embedding
tables (Gather) are then stored int8 per row.
"""

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from deepshrink.compress.quant.blockwise4 import Blockwise4, Blockwise4Linear, quantize_blocks
from deepshrink.compress.quant.dynamic import DynamicQuant
from deepshrink.compress.quant.onnx_dynamic import RewriteReport, cpu_weight_type, default_policy, quantize_onnx_dynamic
from deepshrink.compress.quant.onnx_nbits import rewrite_matmul_nbits
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, backend
from deepshrink.export.onnx import check_exported
from deepshrink.onnx_in.model import set_initializer


@backend(DynamicQuant, "onnx")
def _dynamic_step(model: onnx.ModelProto, cfg: DynamicQuant, ctx: Context) -> tuple[onnx.ModelProto, dict]:
    report = RewriteReport()
    policy = default_policy(embeddings=cfg.embeddings, exclude=cfg.fallback, reduce_range=cfg.reduce_range)
    weight_type = cpu_weight_type()
    out = quantize_onnx_dynamic(model, policy, weight_type, report)
    if not report.quantized:
        raise InputError("dynamic_quant: the graph has no MatMul/Gemm/Gather with a constant fp32 weight")
    return out, {"weight_type": weight_type, "quantized": report.quantized, "kept_fp32": report.kept_fp32}


def _matmul_weight(node: onnx.NodeProto, inits: dict) -> tuple[str, np.ndarray, bool] | None:
    """(initializer, its array, whether the array is ``[K, N]``) of a MatMul or plain Gemm with a constant fp32 2-d weight."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
        return None
    array = numpy_helper.to_array(inits[node.input[1]])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    plain_gemm = not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
    if array.ndim != 2 or array.dtype != np.float32 or (node.op_type == "Gemm" and not plain_gemm):
        return None
    return node.input[1], array, node.op_type == "MatMul" or not attrs.get("transB", 0)


def _only_matmul_uses(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, bool]]:
    """Weights of MatMul/Gemm nodes that no other node reads (a table tied to a Gather keeps its values)."""
    inits = {init.name: init for init in model.graph.initializer}
    found, other = {}, set()
    for node in model.graph.node:
        weight = _matmul_weight(node, inits)
        if weight is not None:
            found[weight[0]] = weight[1:]
        other.update(node.input[i] for i in range(len(node.input)) if weight is None or i != 1)
    return {name: value for name, value in found.items() if name not in other}


@backend(Blockwise4, "onnx")
def _int4_step(model: onnx.ModelProto, cfg: Blockwise4, ctx: Context) -> tuple[onnx.ModelProto, dict]:
    out = onnx.ModelProto.FromString(model.SerializeToString())
    layers = nn.ModuleList()
    for name, (array, k_by_n) in _only_matmul_uses(out).items():
        if name in cfg.fallback:
            continue
        weight = torch.from_numpy(np.array(array.T if k_by_n else array, dtype=np.float32))  # [N, K], a writable copy
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        layer = Blockwise4Linear(linear, quantize_blocks(weight, cfg.block_size, cfg.symmetric, cfg.search), cfg.block_size, cfg.symmetric)
        dequantized = layer.weight.detach().numpy()
        set_initializer(out, name, np.ascontiguousarray(dequantized.T if k_by_n else dequantized))
        layers.append(layer)
    if not len(layers):
        raise InputError("weight_int4: the graph has no MatMul/Gemm with a constant fp32 weight of its own")
    rewritten = rewrite_matmul_nbits(out, layers)
    check_exported(out, "4-bit ONNX")
    tables = RewriteReport()  # embedding tables (Gather) int8 per row, as the torch path's serving_int4 stores the vocabulary
    out = quantize_onnx_dynamic(out, _tables_only(default_policy(exclude=cfg.fallback)), cpu_weight_type(), tables)
    return out, {"block_size": cfg.block_size, "symmetric": cfg.symmetric, "layers": rewritten, "int8_tables": list(tables.quantized)}


def _tables_only(policy):
    return lambda name, weight, kind: policy(name, weight, kind) if kind == "gather" else None
