"""Quantization configs: what a recipe step, a Python call and the CLI all resolve to."""

from dataclasses import dataclass
from typing import Literal

from deepshrink.core.config import Config, Scope
from deepshrink.core.errors import InputError
from deepshrink.core.hardware import cpu_has_vnni
from deepshrink.train import TrainConfig


def resolve_reduce_range(reduce_range: bool | None) -> bool:
    return (not cpu_has_vnni()) if reduce_range is None else reduce_range


ObserverName = Literal["minmax", "moving_average", "percentile", "mse", "entropy"]


def check_bits(name: str, bits: int | None, low: int = 2, high: int = 8) -> None:
    if bits is not None and not low <= bits <= high:
        raise InputError(f"{name} must be between {low} and {high} bits, got {bits}")


@dataclass(frozen=True)
class PTQ(Config):
    """Post-training quantization: weights per channel (or per tensor), activations
    from calibration data. ``activation_bits: null`` quantizes the weights only.

    Activations are unsigned 8-bit with asymmetric ranges (ONNX Runtime's fast
    x86 path is uint8 activations x int8 weights). ``reduce_range`` stores 8-bit
    weights on 7 bits, which ONNX Runtime's kernels need on CPUs without VNNI
    (their 16-bit pair sums overflow otherwise; ORT's own quantizer has the same
    switch); ``null`` turns it on exactly when this CPU lacks VNNI.
    """

    weight_bits: int = 8
    activation_bits: int | None = 8
    per_channel: bool = True
    activation_observer: ObserverName = "mse"
    weight_observer: Literal["minmax", "mse"] = "minmax"
    calib_samples: int = 512
    bias_correction: bool = True
    fold_bn: bool = True
    reduce_range: bool | None = None
    scope: Scope = Scope()

    def __post_init__(self) -> None:
        check_bits("weight_bits", self.weight_bits)
        check_bits("activation_bits", self.activation_bits)
        if self.calib_samples < 1:
            raise InputError(f"calib_samples must be >= 1, got {self.calib_samples}")


@dataclass(frozen=True)
class QAT(Config):
    """Quantization-aware training from a PTQ start: fake-quant in the forward pass,
    straight-through gradients. ``weight_quantizer``: ``lsq`` learns the step size
    (LSQ), ``ste`` keeps calibrated scales, ``binary`` (sign x per-channel mean |w|,
    BWN) and ``ternary`` (TWN threshold 0.7 mean |w|) ignore ``weight_bits``."""

    weight_bits: int = 4
    activation_bits: int | None = 8
    weight_quantizer: Literal["lsq", "ste", "binary", "ternary"] = "lsq"
    layer_bits: dict[str, int] | None = None  # per-layer weight bits (mixed precision)
    keep_first_last: bool = True  # first conv and last linear stay 8-bit, as in the QAT literature
    # Activation ranges while training: "fixed" keeps the calibrated (MSE) steps, "ema" follows an
    # EMA of batch min/max from that start (PyTorch's QAT default), "lsq" learns the steps. At
    # lr 0.001 "fixed" and "ema" gave the same resnet20 Top-1 (w4 93.48 both, w2 91.33 / 91.37);
    # "lsq" drove the logits' step through zero at 2 bits.
    activation_steps: Literal["fixed", "ema", "lsq"] = "fixed"
    calib_samples: int = 512
    # BN is folded into the weights before QAT, so the network trains without BN: at lr 0.01 resnet20
    # diverged (w2 10%, w4 20%); 0.001-0.003 kept w2 at 91-92% after 2 epochs on 10k images.
    finetune: TrainConfig = TrainConfig(epochs=3, lr=0.002, schedule="cosine", weight_decay=0.0)
    reduce_range: bool | None = None  # as in PTQ: 8-bit layers on 7 bits where ORT needs it
    scope: Scope = Scope()

    def __post_init__(self) -> None:
        check_bits("weight_bits", self.weight_bits)
        check_bits("activation_bits", self.activation_bits)
        for name, bits in (self.layer_bits or {}).items():
            check_bits(f"layer_bits.{name}", bits)


@dataclass(frozen=True)
class MixedPrecision(Config):
    """Per-layer weight bit widths chosen from measured sensitivity so that the
    bit-packed file fits ``size_fraction`` of the fp32 parameter bytes, then trained
    with QAT; ``train: false`` stops at the calibrated plan (post-training, no QAT)."""

    size_fraction: float = 1 / 6
    candidate_bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    sensitivity_samples: int = 1000
    sensitivity: Literal["fisher", "loss"] = "fisher"  # see compress/quant/mixed.py
    qat: QAT = QAT()
    train: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.size_fraction <= 1:
            raise InputError(f"size_fraction must be in (0, 1], got {self.size_fraction}")
        for bits in self.candidate_bits:
            check_bits("candidate_bits", bits)
