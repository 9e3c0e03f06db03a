"""Dynamic int8 of an encoder for CPU serving: as small and as fast as ONNX Runtime's
``quantize_dynamic``, and closer to the fp32 model.

- Linear layers and the vocabulary table are int8 (``DynamicQuant``); the
  small tables (positions, token types) are rounded to fp16 and stored so.
  On a real model (all-MiniLM-L6-v2) int8 position rows cost more fidelity
  than any single projection: every sentence reads the same rows, so their
  error does not average out. In fp16 they cost ~1% of the file.
- Weights are stored s8 or u8 by the CPU (``cpu_weight_type``), so ORT runs
  its fastest exact kernels.
- Attention is exported in its eager form (matmul, add mask, softmax): the
  SDPA form adds an ``IsNaN``/``Where`` pass over every attention matrix.
"""

import copy
from dataclasses import replace

import onnx
from torch import nn

from deepshrink.compress.quant.blockwise4 import Blockwise4, blockwise4_layers, quantize_blockwise4
from deepshrink.compress.quant.dynamic import DynamicQuant, quantize_dynamic
from deepshrink.compress.quant.half_tables import half_precision_tables, round_to_half
from deepshrink.compress.quant.onnx_dynamic import WeightType, cpu_weight_type
from deepshrink.compress.quant.onnx_nbits import nbits_onnx_from_torch
from deepshrink.export.onnx import check_exported
from deepshrink.transformers.export import encoder_dynamic_onnx, encoder_onnx_bytes


def small_tables(model: nn.Module) -> list[str]:
    """Embedding tables other than the largest (the vocabulary): positions, token types."""
    tables = [(m.weight.numel(), name) for name, m in model.named_modules() if type(m) is nn.Embedding]
    return [name for _, name in sorted(tables, reverse=True)[1:]]


def serving_int8(model: nn.Module, config: DynamicQuant | None = None) -> nn.Module:
    """A copy of ``model``: ``config``'s dynamic int8 (default: every Linear and the vocabulary), small tables in fp16."""
    config = config or DynamicQuant()
    tables = [t for t in small_tables(model) if t not in config.fallback]
    quantized = quantize_dynamic(model, replace(config, fallback=tuple(config.fallback) + tuple(tables)))
    for name in tables:
        round_to_half(quantized.get_submodule(name))
    return quantized


def serving_int4(model: nn.Module, config: Blockwise4 | None = None, fp32: tuple[str, ...] = ()) -> nn.Module:
    """4-bit block-wise Linear weights; the 4-bit config's fallback layers go to dynamic int8, ``fp32`` layers stay fp32;
    vocabulary int8 and small tables fp16 as in ``serving_int8``."""
    config = config or Blockwise4()
    quantized = quantize_blockwise4(model, replace(config, fallback=tuple(config.fallback) + tuple(fp32)))
    return serving_int8(quantized, DynamicQuant(fallback=tuple(blockwise4_layers(quantized)) + tuple(fp32)))


def eager_attention(model: nn.Module) -> nn.Module:
    """A copy that runs attention in its eager form (what gets exported), when the model offers one."""
    model = copy.deepcopy(model)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return model


def serving_onnx(model: nn.Module, token_type_ids: bool = False) -> bytes:
    """The fp32 encoder as ONNX with eager attention."""
    return encoder_onnx_bytes(eager_attention(model), token_type_ids)


def serving_quantized_onnx(quantized: nn.Module, token_type_ids: bool = False, weight_type: WeightType | None = None) -> bytes:
    """A ``serving_int8`` / ``serving_int4`` model as ONNX: eager attention, int8 layers with the CPU-chosen weight type,
    4-bit layers as ``MatMulNBits``, fp16 small tables."""
    weight_type = weight_type or cpu_weight_type()
    if blockwise4_layers(quantized):
        raw = nbits_onnx_from_torch(quantized, lambda proxy: encoder_onnx_bytes(eager_attention(proxy), token_type_ids), weight_type)
    else:
        raw = encoder_dynamic_onnx(eager_attention(quantized), token_type_ids, weight_type)
    proto = onnx.load_from_string(raw)
    half_precision_tables(proto)
    check_exported(proto, "dynamic int8 ONNX")
    return proto.SerializeToString()


def ort_optimized_ops(proto: bytes) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime actually runs (all CPU optimisations applied): the fusions it reached."""
    import tempfile
    from collections import Counter
    from pathlib import Path

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3  # the optimised file is CPU-specific, which is what we want to inspect
        ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
        return dict(Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node))
