"""Quantized models on disk: integer weight codes bit-packed (4-bit weights take
half a byte each), everything else as float32, in one safetensors file that
loads without deepshrink's code paths beyond the bit unpacking."""

from pathlib import Path

import torch
from torch import nn

from deepshrink.compress.quant.modules import ActQuant, fake_quant_layers
from deepshrink.compress.quant.packing import QuantizedTensor, load_quantized, save_quantized
from deepshrink.core.errors import InputError


def _float_state(model: nn.Module, coded: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor a quantized model needs besides the coded weights (biases,
    activation scales and zero points), minus the weight quantizers' own state,
    which the codes carry."""
    state = {}
    for key, value in model.state_dict().items():
        if key in coded or ".weight_quant." in f".{key}":
            continue
        state[key] = value.detach().contiguous()
    return state


def save_quantized_model(model: nn.Module, path: str | Path) -> int:
    """Write a fake-quant model's weights as packed integer codes; returns bytes on disk."""
    quantized = {}
    for name, layer in fake_quant_layers(model):
        codes, scale, zero_point = layer.weight_quant.codes(layer.weight)
        spec = layer.weight_quant.spec
        if layer.weight_quant.quantizer in ("binary", "ternary"):  # codes in {-1, 0, 1}: 2 bits suffice
            spec = type(spec)(**{**spec.to_dict(), "bits": 2})
        quantized[f"{name}.weight"] = QuantizedTensor(codes, scale, zero_point, spec)
    if not quantized:
        raise InputError("the model has no quantized layers to save")
    return save_quantized(path, quantized, _float_state(model, set(quantized)))


@torch.no_grad()
def load_quantized_model(model: nn.Module, path: str | Path) -> nn.Module:
    """Load codes saved by ``save_quantized_model`` into ``model`` (prepared the
    same way); weights become the dequantized values, which re-quantize exactly."""
    quantized, floats, _ = load_quantized(path)
    layers = dict(fake_quant_layers(model))
    for key, tensor in quantized.items():
        name = key.removesuffix(".weight")
        if name not in layers:
            raise InputError(f"{path}: quantized weight {key} has no matching layer in the model")
        layer = layers[name]
        layer.weight.copy_(tensor.dequantize().view_as(layer.weight))
        if layer.weight_quant.quantizer in ("fixed", "lsq"):
            layer.weight_quant.scale.copy_(tensor.scale)
            layer.weight_quant.zero_point.copy_(tensor.zero_point)
    missing, unexpected = model.load_state_dict(floats, strict=False)
    unexpected = [k for k in unexpected if k not in quantized]
    if unexpected:
        raise InputError(f"{path}: tensors {unexpected[:3]} do not belong to the model")
    for quant in model.modules():
        if isinstance(quant, ActQuant):
            quant.mode = "quantize"
    return model
