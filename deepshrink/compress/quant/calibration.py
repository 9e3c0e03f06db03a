"""The numeric core of post-training quantization, shared by the PyTorch PTQ (``ptq.py``) and
the ONNX backend (``onnx_in/quantize.py``): the weight and activation grids, a weight's
scale and zero point from an observer, per-channel output means, and the empirical bias
correction loop (Nagel et al. 2019). Each backend supplies only how it runs its model.
"""

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from deepshrink.compress.quant.observers import make_observer
from deepshrink.compress.quant.primitives import QuantSpec

Layer = TypeVar("Layer")


def weight_spec(bits: int, axis: int = 0, per_channel: bool = True) -> QuantSpec:
    """Symmetric signed weights, per output channel by default, narrow range (-127..127 at 8 bits;
    -128 stays unused, as ONNX Runtime's kernels prefer)."""
    return QuantSpec(bits=bits, symmetric=True, signed=True, per_channel=per_channel, axis=axis, narrow_range=True)


def activation_spec(bits: int) -> QuantSpec:
    """Unsigned asymmetric activations: ONNX Runtime's fast x86 path is uint8 x int8."""
    return QuantSpec(bits=bits, symmetric=False, signed=False)


def weight_qparams(weight: torch.Tensor, spec: QuantSpec, observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of ``weight`` on ``spec``'s grid, from one pass of the named observer."""
    obs = make_observer(observer, spec)
    obs.update(weight.detach())
    return obs.qparams()


class ChannelMeans:
    """Running per-channel means of named tensors, fed with per-channel sums batch by batch
    (memory flat in the number of samples). Sums keep the dtype they arrive in."""

    def __init__(self) -> None:
        self.sums: dict[Hashable, Any] = {}
        self.counts: dict[Hashable, int] = {}

    def add(self, name: Hashable, channel_sums, count: int) -> None:
        self.sums[name] = self.sums.get(name, 0) + channel_sums
        self.counts[name] = self.counts.get(name, 0) + count

    def means(self) -> dict:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


def correct_biases(
    groups: Sequence[Sequence[tuple[Hashable, Layer]]],
    reference: Mapping,
    measure: Callable[[Sequence[tuple[Hashable, Layer]]], Mapping],
    shift_bias: Callable[[Layer, Any], None],
) -> list:
    """Empirical bias correction: group after group (a group's layers never feed each other),
    measure the quantized model's per-channel output means, and shift each layer's bias by
    ``reference - measured`` so later groups see corrected inputs. ``reference`` holds the float
    model's means by key; ``measure(group)`` the quantized model's. Returns the shifts in order."""
    shifts = []
    for group in groups:
        measured = measure(group)
        for key, layer in group:
            shift = reference[key] - measured[key]
            shift_bias(layer, shift)
            shifts.append(shift)
    return shifts
