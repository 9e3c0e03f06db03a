"""Post-training quantization: prepare -> calibrate -> bias correction -> error report."""

import contextlib
import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

from deepshrink.compress.quant.calibration import ChannelMeans, correct_biases
from deepshrink.compress.quant.config import PTQ, resolve_reduce_range
from deepshrink.compress.quant.modules import fake_quant_layers, set_quantization
from deepshrink.compress.quant.prepare import calibrate, prepare
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.data import CalibrationSet
from deepshrink.data.datasets import iterate_batches

CALIB_BATCH = 128
BIAS_CORRECTION_SAMPLES = 256


def calibration_batches(ctx: Context, samples: int, calib: Iterable | None = None) -> list[torch.Tensor]:
    """Calibration inputs: the caller's iterable, else the first ``samples`` training images."""
    if calib is None:
        if ctx.data is None:
            raise InputError("quantization needs calibration data: pass calib= or data= (a DataBundle)")
        calib = (x for x, _ in iterate_batches(ctx.data.train.subset(samples), CALIB_BATCH))
    return list(CalibrationSet(calib, max_samples=samples))


def ptq(model: nn.Module, cfg: PTQ, batches: list[torch.Tensor]) -> nn.Module:
    reduce_range = resolve_reduce_range(cfg.reduce_range)
    qmodel = prepare(model, cfg.weight_bits, cfg.activation_bits, cfg.scope, "fixed", cfg.activation_observer, cfg.fold_bn, reduce_range)
    calibrate(qmodel, batches, cfg.weight_observer)
    if cfg.bias_correction:
        correct_bias(qmodel, batches)
    qmodel.quant_report = layer_report(qmodel, batches[0])
    return qmodel


@method("quantize", PTQ, needs=("data?", "calib?"), quantizes=True)
class PTQMethod:
    def torch(self, model: nn.Module, cfg: PTQ, ctx: Context) -> nn.Module:
        return ptq(model, cfg, calibration_batches(ctx, cfg.calib_samples, ctx.calib))

    def restore(self, model: nn.Module, cfg: PTQ, ctx: Context, saved: dict) -> nn.Module:
        return self.torch(copy.deepcopy(model), cfg, ctx)  # calibration only: cheap and deterministic


# -- bias correction -----------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once the last layer of interest has run: the rest of the forward is wasted work."""


@torch.no_grad()
def _mean_outputs(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-output-channel mean of each layer's output over the batches; the
    forward pass stops as soon as every layer has been seen."""
    means = ChannelMeans()
    seen: set[str] = set()

    def hook(name):
        def record(_module, _inputs, output):
            channels = output.transpose(0, 1).flatten(1)  # (C, N*H*W)
            means.add(name, channels.sum(1), channels.shape[1])
            seen.add(name)
            if len(seen) == len(layers):
                raise _StopForward

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers]
    try:
        for batch in batches:
            seen.clear()
            with contextlib.suppress(_StopForward):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return means.means()


@torch.no_grad()
def correct_bias(model: nn.Module, batches: list[torch.Tensor], samples: int = BIAS_CORRECTION_SAMPLES) -> None:
    """Empirical bias correction (Nagel et al. 2019): layer by layer, in order,
    shift each bias so the weight-quantized model's mean output per channel equals
    the float model's, absorbing the systematic part of the weight-quantization
    error. Activations stay float while the shifts are measured: the activation
    ranges were calibrated on the uncorrected model, and folding their clipping
    error into biases (KL-calibrated ranges clip hard) broke resnet20 (9% Top-1).
    A per-channel mean over ``samples`` images x positions is estimated well,
    and each layer costs a forward pass up to that layer. The loop is ``calibration.correct_biases``,
    shared with the ONNX backend."""
    batches = list(CalibrationSet(batches, max_samples=samples))
    layers = fake_quant_layers(model)
    set_quantization(model, False)
    reference = _mean_outputs(model, layers, batches)
    set_quantization(model, True, activations=False)
    try:
        correct_biases([[entry] for entry in layers], reference, lambda group: _mean_outputs(model, group, batches), _shift_bias)
    finally:
        set_quantization(model, True)


def _shift_bias(layer: nn.Module, shift: torch.Tensor) -> None:
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(shift))
    layer.bias += shift


# -- error report --------------------------------------------------------------


def _sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (reference - approx).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


@torch.no_grad()
def layer_report(model: nn.Module, batch: torch.Tensor) -> list[dict]:
    """Per layer: weight bits, weight SQNR and output SQNR (dB) of the quantized model vs float."""
    layers = fake_quant_layers(model)
    outputs: dict[str, dict[str, torch.Tensor]] = {"float": {}, "quant": {}}

    def run(kind: str) -> None:
        handles = [layer.register_forward_hook(lambda m, i, o, n=name: outputs[kind].__setitem__(n, o)) for name, layer in layers]
        try:
            model(batch)
        finally:
            for handle in handles:
                handle.remove()

    set_quantization(model, False)
    run("float")
    set_quantization(model, True)
    run("quant")
    return [
        {
            "layer": name,
            "weight_bits": layer.weight_quant.spec.bits,
            "quantizer": layer.weight_quant.quantizer,
            "weight_sqnr_db": _sqnr_db(layer.weight, layer.weight_quant(layer.weight)),
            "output_sqnr_db": _sqnr_db(outputs["float"][name], outputs["quant"][name]),
        }
        for name, layer in layers
    ]
