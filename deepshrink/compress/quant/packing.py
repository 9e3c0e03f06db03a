"""Quantized tensors on disk: dense bit packing and a plain safetensors layout.

A 4-bit model should take 4 bits per weight on disk, not the 8 that an int8
container would use, and it should load without deepshrink: the file is an
ordinary safetensors file with, per quantized tensor, the packed codes (uint8),
the scale (float32) and the zero point (int32), and a JSON description of the
grid in the safetensors metadata.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from deepshrink.compress.quant.primitives import QuantSpec, compute_qparams, dequantize, quantize
from deepshrink.core.errors import InputError
from deepshrink.core.files import write_safetensors

METADATA_KEY = "deepshrink.quantized"
SUFFIXES = (".codes", ".scale", ".zero_point")


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise InputError(f"bits must be an integer between 2 and 8, got {bits!r}")


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take when packed: ceil(count * bits / 8)."""
    return math.ceil(count * bits / 8)


def pack_codes(codes: Tensor, bits: int, signed: bool) -> bytes:
    """Pack integer codes densely, little-endian: code i occupies bits [i*bits, (i+1)*bits) of the stream,
    least significant bit first (4-bit: low nibble first). Signed codes are offset by 2**(bits-1) first."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise InputError(f"pack_codes needs integer codes, got {codes.dtype}")
    offset = 2 ** (bits - 1) if signed else 0
    values = codes.detach().reshape(-1).to(torch.int64) + offset
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        kind = "signed" if signed else "unsigned"
        raise InputError(f"codes out of range for {kind} {bits}-bit packing: [{int(values.min()) - offset}, {int(values.max()) - offset}]")
    array = values.to(torch.uint8).numpy()
    if bits == 8:
        return array.tobytes()
    stream = np.unpackbits(array[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, signed: bool, count: int) -> Tensor:
    """The inverse of pack_codes: ``count`` codes as int32 (1-d)."""
    _check_bits(bits)
    if count < 0:
        raise InputError(f"count must be >= 0, got {count}")
    need = packed_size(count, bits)
    if len(data) < need:
        raise InputError(f"packed data too short: {count} codes of {bits} bits need {need} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8, count=need)
    if bits == 8:
        values = raw.astype(np.int32)
    else:
        stream = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
        values = np.packbits(stream, axis=1, bitorder="little").reshape(count).astype(np.int32)
    offset = 2 ** (bits - 1) if signed else 0
    return torch.from_numpy(values) - offset


@dataclass
class QuantizedTensor:
    """Integer codes with the grid that gives them meaning."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    spec: QuantSpec

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.spec)

    @classmethod
    def from_float(cls, x: Tensor, spec: QuantSpec, scale: Tensor | None = None, zero_point: Tensor | None = None) -> "QuantizedTensor":
        """Quantize ``x``; without ``scale``, min-max parameters (per tensor or per channel, as the spec says)."""
        if scale is None:
            if zero_point is not None:
                raise InputError("zero_point given without scale")
            scale, zero_point = compute_qparams(*_min_max(x, spec), spec)
        elif zero_point is None:
            if not spec.symmetric:
                raise InputError("an asymmetric spec needs zero_point along with scale")
            zero_point = torch.full_like(scale, spec.symmetric_zero_point, dtype=torch.int32)
        scale, zero_point = scale.detach().to(torch.float32), zero_point.detach().to(torch.int32)
        return cls(quantize(x, scale, zero_point, spec), scale, zero_point, spec)


def _min_max(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    x = x.detach().to(torch.float32)
    if x.numel() == 0:
        raise InputError("cannot quantize an empty tensor")
    if not spec.per_channel:
        low, high = torch.aminmax(x)
        return low, high
    if not -x.dim() <= spec.axis < x.dim():
        raise InputError(f"axis {spec.axis} is out of range for a tensor of shape {tuple(x.shape)}")
    low, high = torch.aminmax(x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1), dim=1)
    return low, high


def _describe(q: QuantizedTensor) -> dict:
    return {**q.spec.to_dict(), "shape": list(q.codes.shape)}


def save_quantized(
    path: str | Path, quantized: dict[str, QuantizedTensor], floats: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> int:
    """Write quantized and float tensors to one safetensors file, atomically. Returns its size in bytes."""
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for name, q in quantized.items():
        tensors[f"{name}.codes"] = torch.frombuffer(bytearray(pack_codes(q.codes, q.spec.bits, q.spec.signed)), dtype=torch.uint8)
        tensors[f"{name}.scale"] = q.scale.detach().to(torch.float32).contiguous()
        tensors[f"{name}.zero_point"] = q.zero_point.detach().to(torch.int32).contiguous()
    for name, tensor in floats.items():
        if name in tensors:
            raise InputError(f"float tensor {name!r} clashes with a quantized tensor's entry")
        tensors[name] = tensor.detach().contiguous()
    extra = dict(metadata or {})
    if METADATA_KEY in extra:
        raise InputError(f"metadata key {METADATA_KEY!r} is reserved")
    extra[METADATA_KEY] = json.dumps({name: _describe(q) for name, q in quantized.items()}, sort_keys=True)
    write_safetensors(path, tensors, extra)
    return path.stat().st_size


def _restore(name: str, info: dict, tensors: dict[str, Tensor]) -> QuantizedTensor:
    shape = [int(d) for d in info.pop("shape")]
    spec = QuantSpec.from_dict(info)
    count = math.prod(shape)
    codes = unpack_codes(tensors.pop(f"{name}.codes").numpy().tobytes(), spec.bits, spec.signed, count).reshape(shape)
    return QuantizedTensor(codes, tensors.pop(f"{name}.scale"), tensors.pop(f"{name}.zero_point"), spec)


def load_quantized(path: str | Path) -> tuple[dict[str, QuantizedTensor], dict[str, Tensor], dict[str, str]]:
    """Read a file written by save_quantized: (quantized tensors, float tensors, user metadata)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: quantized weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        described = json.loads(metadata.pop(METADATA_KEY))
        quantized = {name: _restore(name, dict(info), tensors) for name, info in described.items()}
    except Exception as exc:  # safetensors, JSON, missing keys, bad shapes: all mean the file is not what we wrote
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a valid deepshrink quantized file ({reason})") from None
    return quantized, tensors, metadata
