"""Quantization: primitives, observers, fake-quant modules, PTQ, QAT, binary/ternary,
mixed precision, packed low-bit storage and QDQ export for ONNX Runtime."""

from deepshrink.compress.quant.blockwise4 import Blockwise4, quantize_blockwise4
from deepshrink.compress.quant.config import PTQ, QAT, MixedPrecision
from deepshrink.compress.quant.dynamic import DynamicQuant, quantize_dynamic
from deepshrink.compress.quant.mixed import allocate_bits, bit_sensitivity, plan_bits
from deepshrink.compress.quant.modules import ActQuant, QuantConv2d, QuantLinear, act_quantizers, fake_quant_layers, set_quantization
from deepshrink.compress.quant.prepare import calibrate, prepare
from deepshrink.compress.quant.ptq import correct_bias, layer_report, ptq
from deepshrink.compress.quant.qat import prepare_qat, qat
from deepshrink.compress.quant.storage import load_quantized_model, save_quantized_model

__all__ = [
    "PTQ",
    "QAT",
    "ActQuant",
    "Blockwise4",
    "DynamicQuant",
    "MixedPrecision",
    "QuantConv2d",
    "QuantLinear",
    "act_quantizers",
    "allocate_bits",
    "bit_sensitivity",
    "calibrate",
    "correct_bias",
    "layer_report",
    "load_quantized_model",
    "plan_bits",
    "prepare",
    "prepare_qat",
    "ptq",
    "qat",
    "quantize_blockwise4",
    "fake_quant_layers",
    "quantize_dynamic",
    "save_quantized_model",
    "set_quantization",
]
