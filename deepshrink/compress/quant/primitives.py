"""Quantization primitives: integer grids, scales and zero points, (fake) quantization.

Everything here is a pure tensor function so that PTQ, QAT, export and packing
share one definition of "the int8 value of x". Rounding is half-to-even on
``x * (1 / scale)``, which is bit-identical to PyTorch's fused fake-quant kernels
(used as the fast path) and to what the dequantized model computes.

Per-channel parameters are 1-d tensors broadcast along ``spec.axis``; per-tensor
parameters are 0-d.
"""

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deepshrink.core.config import Config
from deepshrink.core.errors import InputError

# The smallest scale we hand out: keeps constant (all-zero) tensors quantizable and is itself a power of two.
SCALE_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QuantSpec(Config):
    """An integer grid: bit width, signedness, symmetry and granularity of the parameters."""

    bits: int = 8
    symmetric: bool = True
    signed: bool = True
    per_channel: bool = False
    axis: int = 0
    power_of_two: bool = False
    narrow_range: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise InputError(f"bits must be an integer between 2 and 8, got {self.bits!r}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise InputError(f"axis must be an integer, got {self.axis!r}")

    @property
    def qmin(self) -> int:
        low = -(2 ** (self.bits - 1)) if self.signed else 0
        return low + 1 if self.narrow_range else low

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def symmetric_zero_point(self) -> int:
        """The zero point of a symmetric grid: 0 for signed codes, the middle code for unsigned ones."""
        return 0 if self.signed else 2 ** (self.bits - 1)


def _pow2_ceil(scale: Tensor) -> Tensor:
    """The smallest power of two >= scale, exactly (frexp, not log2, so 2**-k stays 2**-k)."""
    mantissa, exponent = torch.frexp(scale)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(scale), exponent).to(torch.float32)


def compute_qparams(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(scale float32, zero_point int32) that map [min_val, max_val], widened to contain 0, onto the grid.

    Including 0 makes 0.0 exactly representable (zero padding, ReLU outputs, pruned weights).
    """
    if min_val.shape != max_val.shape:
        raise InputError(f"min_val and max_val must have the same shape, got {tuple(min_val.shape)} and {tuple(max_val.shape)}")
    low = torch.clamp(min_val.detach().to(torch.float32), max=0.0)
    high = torch.clamp(max_val.detach().to(torch.float32), min=0.0)
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise InputError("quantization range has NaN or infinite bounds")
    qmin, qmax = spec.qmin, spec.qmax
    # symmetric: max|x| maps to the largest code on the short side of the grid (127 for int8, never clipped)
    span = torch.maximum(-low, high) / ((qmax - qmin) // 2) if spec.symmetric else (high - low) / (qmax - qmin)
    scale = torch.clamp(span, min=SCALE_EPS)
    if spec.power_of_two:
        scale = _pow2_ceil(scale)
    if spec.symmetric:
        zero_point = torch.full_like(scale, spec.symmetric_zero_point, dtype=torch.int32)
    else:
        zero_point = torch.clamp(torch.round(qmin - low / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def _channel_axis(x: Tensor, spec: QuantSpec) -> int:
    if not -x.dim() <= spec.axis < x.dim():
        raise InputError(f"axis {spec.axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return spec.axis % x.dim()


def _is_per_channel(x: Tensor, param: Tensor, spec: QuantSpec) -> bool:
    """True when ``param`` holds one value per channel of ``x`` along spec.axis (checked)."""
    if param.numel() == 1 and (param.dim() == 0 or not spec.per_channel):
        return False
    if not spec.per_channel:
        raise InputError(f"a per-tensor spec needs one scale/zero point, got shape {tuple(param.shape)}")
    axis = _channel_axis(x, spec)
    if param.dim() != 1 or param.numel() != x.shape[axis]:
        raise InputError(f"per-channel parameters of shape {tuple(param.shape)} do not match {x.shape[axis]} channels on axis {axis}")
    return True


def _broadcast(x: Tensor, param: Tensor, spec: QuantSpec) -> Tensor:
    """View ``param`` so it broadcasts against ``x`` along the channel axis (or as a scalar)."""
    if not _is_per_channel(x, param, spec):
        return param.reshape(())
    shape = [1] * x.dim()
    shape[_channel_axis(x, spec)] = -1
    return param.reshape(shape)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes (int32) of ``x``, rounded half-to-even and clamped to [qmin, qmax]."""
    s, z = _broadcast(x, scale, spec), _broadcast(x, zero_point, spec)
    codes = torch.round(x.detach() * torch.reciprocal(s.to(torch.float32))) + z
    return torch.clamp(codes, spec.qmin, spec.qmax).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Float32 values of integer codes: (q - zero_point) * scale."""
    s, z = _broadcast(q, scale, spec), _broadcast(q, zero_point, spec)
    return (q.to(torch.float32) - z.to(torch.float32)) * s.to(torch.float32)


def _fused_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """PyTorch's fused kernel: one pass, and its autograd is the clipped straight-through estimator."""
    scale, zero_point = scale.detach().to(torch.float32), zero_point.detach().to(torch.int32)
    if _is_per_channel(x, scale, spec):
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, _channel_axis(x, spec), spec.qmin, spec.qmax)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), spec.qmin, spec.qmax)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """dequantize(quantize(x)) in x's float dtype, without gradient (calibration, evaluation)."""
    with torch.no_grad():
        return _fused_fake_quantize(x.detach(), scale, zero_point, spec)


def fake_quantize_ste(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Fake quantization whose gradient wrt x is 1 where the code is not clipped and 0 where it is (QAT)."""
    return _fused_fake_quantize(x, scale, zero_point, spec)


def _reduce_to(grad: Tensor, like: Tensor, axis: int | None) -> Tensor:
    """Sum an elementwise gradient down to the shape of a 0-d or per-channel parameter."""
    if axis is None:
        return grad.sum().reshape(like.shape)
    dims = [d for d in range(grad.dim()) if d != axis]
    return grad.sum(dim=dims).reshape(like.shape) if dims else grad.reshape(like.shape)


class _LSQ(torch.autograd.Function):
    """LSQ (Esser et al. 2020): out = (clamp(round(x/s) + z) - z) * s with the paper's gradients.

    d out / d s = round(x/s) - x/s inside the grid, (qmin - z) or (qmax - z) where clipped, times g;
    d out / d x = 1 inside, 0 where clipped (decided on x/s, as in the paper).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec, grad_scale: float) -> Tensor:
        s, z = _broadcast(x, scale, spec), _broadcast(x, zero_point, spec).to(x.dtype)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.spec, ctx.grad_scale = spec, grad_scale
        return (torch.clamp(torch.round(x * torch.reciprocal(s)) + z, spec.qmin, spec.qmax) - z) * s

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, scale, zero_point = ctx.saved_tensors
        spec = ctx.spec
        s, z = _broadcast(x, scale, spec), _broadcast(x, zero_point, spec).to(x.dtype)
        v = x / s
        below, above = v <= spec.qmin - z, v >= spec.qmax - z
        inside = ~(below | above)
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            elem = torch.where(inside, torch.round(v) - v, torch.where(below, spec.qmin - z, spec.qmax - z))
            axis = _channel_axis(x, spec) if _is_per_channel(x, scale, spec) else None
            grad_s = _reduce_to(grad_out * elem, scale, axis) * ctx.grad_scale
        return grad_x, grad_s, None, None, None


def lsq_gradient_scale(x: Tensor, scale: Tensor, spec: QuantSpec) -> float:
    """LSQ's g = 1 / sqrt(elements per scale * Qp): keeps the step size's update in proportion to the weights'."""
    return 1.0 / math.sqrt(x.numel() / scale.numel() * spec.qmax)


def lsq_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Fake quantization with a learnable step size (LSQ): ``scale`` receives the paper's gradient."""
    _broadcast(x, scale, spec)  # validate shapes before autograd sees them
    return _LSQ.apply(x, scale, zero_point.detach(), spec, lsq_gradient_scale(x, scale, spec))


def dynamic_fixed_point(x: Tensor, bits: int) -> tuple[Tensor, int]:
    """Ristretto's dynamic fixed point: integer length il = ceil(log2 max|x|) + 1 (sign bit), fractional
    length fl = bits - il, step 2**-fl. Returns (fake-quantized x with a straight-through gradient, fl).

    Unlike ``compute_qparams(power_of_two=True)``, which never clips, this may clip max|x| by < 1 step,
    as Ristretto does, to keep one more fractional bit.
    """
    spec = QuantSpec(bits=bits)
    peak = float(x.detach().abs().max()) if x.numel() else 0.0
    if not math.isfinite(peak):
        raise InputError("dynamic_fixed_point: tensor has NaN or infinite values")
    if peak == 0.0:
        integer_bits = 1
    else:
        mantissa, exponent = math.frexp(peak)
        integer_bits = (exponent - 1 if mantissa == 0.5 else exponent) + 1
    fractional = bits - integer_bits
    scale = torch.tensor(2.0**-fractional, dtype=torch.float32)
    return fake_quantize_ste(x, scale, torch.tensor(0, dtype=torch.int32), spec), fractional


def cast_precision(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` in float16 or bfloat16 (half the bytes; no integer grid)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise InputError(f"cast_precision supports torch.float16 and torch.bfloat16, got {dtype}")
    return copy.deepcopy(model).to(dtype)
