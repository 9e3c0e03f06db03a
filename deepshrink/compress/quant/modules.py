"""Fake-quant modules: what a quantized model is made of in PyTorch.

``ActQuant`` sits on an activation tensor: it first observes (calibration),
then fake-quantizes with a fixed or learned (LSQ) step. ``QuantConv2d`` and
``QuantLinear`` fake-quantize their weights per output channel. During ONNX
export both emit ``torch.fake_quantize_*`` ops, which the exporter writes as
QuantizeLinear/DequantizeLinear pairs that ONNX Runtime runs on int8 kernels.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from deepshrink.compress.quant.calibration import weight_qparams
from deepshrink.compress.quant.observers import MovingAverageObserver, make_observer
from deepshrink.compress.quant.primitives import SCALE_EPS, QuantSpec, fake_quantize_ste, lsq_fake_quantize

WeightQuantizer = Literal["fixed", "lsq", "binary", "ternary"]
ActMode = Literal["observe", "quantize", "off"]
INT8_RANGE = (-128, 127)  # ONNX's int8: every weight spec of <= 8 bits fits inside it
TWN_THRESHOLD = 0.7  # ternary threshold as a fraction of mean |w| (Li & Liu 2016)


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """A learned step can be pushed through zero by one large SGD step; its magnitude
    is the step, floored so that x / step stays finite (an infinite code makes LSQ's
    step gradient inf - inf = NaN)."""
    return scale.abs().clamp_min(SCALE_EPS)


def _export_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.detach().float().clamp_min(torch.finfo(torch.float32).tiny)


class ActQuant(nn.Module):
    """Per-tensor activation quantizer (uint8 asymmetric by default)."""

    def __init__(self, spec: QuantSpec, observer: str = "mse") -> None:
        super().__init__()
        self.spec = spec
        self.observer_name = observer
        self.observer = make_observer(observer, spec)
        self.mode: ActMode = "observe"
        self.tracker: MovingAverageObserver | None = None  # set by track_range during QAT
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    def freeze(self) -> None:
        """Fix scale and zero point from what the observer saw, then quantize."""
        scale, zero_point = self.observer.qparams()
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        self.mode = "quantize"

    def learn_scale(self, enabled: bool = True) -> None:
        self.scale.requires_grad_(enabled)

    def track_range(self, enabled: bool = True, momentum: float = 0.99) -> None:
        """While training, follow the activations' drifting range with an EMA of batch
        min/max (PyTorch's QAT default), starting from the calibrated range: weights
        that change under QAT change the activations, and a fixed range goes stale."""
        self.tracker = None
        if enabled:
            self.tracker = MovingAverageObserver(self.spec, momentum=momentum)
            with torch.no_grad():
                codes = torch.tensor([self.spec.qmin, self.spec.qmax], dtype=torch.float32) - self.zero_point.float()
                self.tracker.min_val, self.tracker.max_val = (codes * self.scale.detach()).unbind()

    def forward(self, x: torch.Tensor, requant: bool = False) -> torch.Tensor:
        """``requant``: ``x`` is already on this quantizer's grid (it passed a max
        pool or a flatten since), so nothing is observed or tracked; the call only
        puts the Q/DQ pair into the exported graph where ONNX Runtime expects it."""
        if self.mode == "observe":
            if not requant:
                self.observer.update(x.detach())
            return x
        if self.mode == "off":
            return x
        if torch.onnx.is_in_onnx_export():
            return torch.fake_quantize_per_tensor_affine(
                x, float(_export_scale(_positive(self.scale))), int(self.zero_point), self.spec.qmin, self.spec.qmax
            )
        if self.scale.requires_grad:
            return lsq_fake_quantize(x, _positive(self.scale), self.zero_point, self.spec)
        if self.training and self.tracker is not None and not requant:
            self._follow(x)
        return fake_quantize_ste(x, self.scale, self.zero_point, self.spec)

    @torch.no_grad()
    def _follow(self, x: torch.Tensor) -> None:
        self.tracker.update(x.detach())
        scale, zero_point = self.tracker.qparams()
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, observer={self.observer_name}, mode={self.mode}"


class QuantWeight(nn.Module):
    """Per-output-channel weight quantizer shared by QuantConv2d and QuantLinear.

    ``fixed`` keeps the calibrated step, ``lsq`` learns it, ``binary`` is BWN
    (sign x mean |w| per channel) and ``ternary`` is TWN; the last two pass
    gradients straight through to the float weights."""

    def __init__(self, spec: QuantSpec, quantizer: WeightQuantizer, out_channels: int) -> None:
        super().__init__()
        self.spec = spec
        self.quantizer = quantizer
        self.enabled = True
        self.scale = nn.Parameter(torch.ones(out_channels), requires_grad=quantizer == "lsq")
        self.register_buffer("zero_point", torch.zeros(out_channels, dtype=torch.int32))

    def calibrate(self, weight: torch.Tensor, observer: str = "minmax") -> None:
        scale, zero_point = weight_qparams(weight, self.spec, observer)
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.quantizer in ("binary", "ternary"):
            values = _binary(weight) if self.quantizer == "binary" else _ternary(weight)
            return _StraightThrough.apply(weight, values)
        if self.quantizer == "lsq":
            return lsq_fake_quantize(weight, _positive(self.scale), self.zero_point, self.spec)
        return fake_quantize_ste(weight, self.scale, self.zero_point, self.spec)

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, zero point) such that the quantized weight is codes x scale."""
        if self.quantizer in ("binary", "ternary"):
            values = _binary(weight) if self.quantizer == "binary" else _ternary(weight)
            scale = values.detach().abs().flatten(1).amax(1)
            return scale.where(scale > 0, torch.ones_like(scale)), torch.zeros_like(self.zero_point)
        return _export_scale(_positive(self.scale)), self.zero_point

    FROZEN = ("frozen_values", "frozen_scale", "frozen_zero_point")

    def freeze(self, weight: torch.Tensor) -> None:
        """Fix the quantized weight in buffers for the export: the ONNX tracer records
        ops on buffers (plain tensors would be evaluated away into one float constant)."""
        with torch.no_grad():
            scale, zero_point = self.qparams(weight)
            values = self(weight)
        for name, tensor in zip(self.FROZEN, (values, scale, zero_point), strict=True):
            self.register_buffer(name, tensor.detach().clone())

    def unfreeze(self) -> None:
        for name in self.FROZEN:
            self._buffers.pop(name, None)

    def export_weight(self) -> torch.Tensor:
        """The frozen quantized weight as a fake-quant op the ONNX exporter writes as Q/DQ."""
        if "frozen_values" not in self._buffers:
            raise RuntimeError("export_weight needs freeze() first; use frozen_for_export(model)")
        return torch.fake_quantize_per_channel_affine(self.frozen_values, self.frozen_scale, self.frozen_zero_point, 0, *INT8_RANGE)

    def codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes, scale and zero point of the quantized weight (for packing)."""
        with torch.no_grad():
            values = self(weight)
            scale, zero_point = self.qparams(weight)
            shape = (-1,) + (1,) * (weight.ndim - 1)
            codes = torch.round(values / scale.view(shape)) + zero_point.view(shape)
        return codes.to(torch.int32), scale, zero_point

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, quantizer={self.quantizer}"


class _StraightThrough(torch.autograd.Function):
    """Forward the quantized values exactly; pass the gradient to the float weights unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return values.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _per_channel_mean_abs(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    magnitude = weight.abs().flatten(1)
    if mask is None:
        return magnitude.mean(1)
    mask = mask.flatten(1).to(weight.dtype)
    return (magnitude * mask).sum(1) / mask.sum(1).clamp_min(1)


def _binary(weight: torch.Tensor) -> torch.Tensor:
    alpha = _per_channel_mean_abs(weight).detach()
    shape = (-1,) + (1,) * (weight.ndim - 1)
    return torch.where(weight >= 0, 1.0, -1.0) * alpha.view(shape)


def _ternary(weight: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (weight.ndim - 1)
    delta = TWN_THRESHOLD * _per_channel_mean_abs(weight).detach().view(shape)
    keep = weight.abs() > delta
    alpha = _per_channel_mean_abs(weight, keep).detach().view(shape)
    return torch.sign(weight) * keep * alpha


class _QuantizedWeightMixin:
    """The weight a quantized layer computes with: fake-quantized in torch, a Q/DQ pair in ONNX."""

    def quantized_weight(self) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() and self.weight_quant.enabled:
            return self.weight_quant.export_weight()
        return self.weight_quant(self.weight)


class QuantConv2d(_QuantizedWeightMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: QuantSpec, quantizer: WeightQuantizer) -> "QuantConv2d":
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
        )
        new.load_state_dict(conv.state_dict())
        new.weight_quant = QuantWeight(spec, quantizer, conv.out_channels)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantLinear(_QuantizedWeightMixin, nn.Linear):
    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec, quantizer: WeightQuantizer) -> "QuantLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None)
        new.load_state_dict(linear.state_dict())
        new.weight_quant = QuantWeight(spec, quantizer, linear.out_features)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def fake_quant_layers(model: nn.Module):
    """(name, layer) for every weight-quantized layer, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


def act_quantizers(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


@contextmanager
def frozen_for_export(model: nn.Module) -> Iterator[None]:
    """Weights quantized once, as constants, for the duration of an ONNX export."""
    layers = fake_quant_layers(model)
    for _, layer in layers:
        layer.weight_quant.freeze(layer.weight)
    try:
        yield
    finally:
        for _, layer in layers:
            layer.weight_quant.unfreeze()


def set_quantization(model: nn.Module, enabled: bool, activations: bool | None = None) -> None:
    """Switch weight quantizers off (fp32 reference through the same graph) or back on;
    activation quantizers follow ``activations`` (default: the same as the weights)."""
    activations = enabled if activations is None else activations
    for module in model.modules():
        if isinstance(module, ActQuant) and module.mode != "observe":
            module.mode = "quantize" if activations else "off"
        elif isinstance(module, QuantWeight):
            module.enabled = enabled
