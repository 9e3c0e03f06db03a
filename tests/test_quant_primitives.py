"""Quantization primitives and bit packing: error bounds, closed forms, exact round trips."""

import math

import pytest
import torch
from torch import nn

from deepshrink.compress.quant.packing import QuantizedTensor, load_quantized, pack_codes, packed_size, save_quantized, unpack_codes
from deepshrink.compress.quant.primitives import (
    SCALE_EPS,
    QuantSpec,
    cast_precision,
    compute_qparams,
    dequantize,
    dynamic_fixed_point,
    fake_quantize,
    fake_quantize_ste,
    lsq_fake_quantize,
    quantize,
)
from deepshrink.core.errors import InputError

pytestmark = pytest.mark.unit

GRANULARITIES = {"tensor": (False, 0), "axis0": (True, 0), "axis1": (True, 1)}


def channel_view(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Broadcast a per-channel (or 0-d) parameter against x along axis, for the tests' own reference math."""
    if t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def minmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if not spec.per_channel:
        return x.min(), x.max()
    rows = x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
    return rows.min(dim=1).values, rows.max(dim=1).values


def sample(seed: int = 0) -> torch.Tensor:
    """Channels of different widths and offsets, so per-channel parameters differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 7, generator=g)
    return x * torch.linspace(0.1, 3.0, 6)[:, None, None] + torch.linspace(-1, 2, 5)[None, :, None]


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step(granularity: str, signed: bool, symmetric: bool) -> None:
    per_channel, axis = GRANULARITIES[granularity]
    x = sample()
    for bits in range(2, 9):
        spec = QuantSpec(bits=bits, symmetric=symmetric, signed=signed, per_channel=per_channel, axis=axis)
        low, high = minmax(x, spec)
        scale, zero_point = compute_qparams(low, high, spec)
        assert scale.shape == low.shape and scale.dtype == torch.float32 and zero_point.dtype == torch.int32
        q = quantize(x, scale, zero_point, spec)
        assert q.dtype == torch.int32 and int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
        s = channel_view(scale, x, axis)
        assert ((dequantize(q, scale, zero_point, spec) - x).abs() <= s * (0.5 + 1e-5)).all(), bits
        # far outside the range: clipped to the grid's ends
        z = channel_view(zero_point, x, axis)
        top, bottom = (spec.qmax - z) * s, (spec.qmin - z) * s
        for far, end in ((x.abs() + 100 * s * 2**bits, top), (-x.abs() - 100 * s * 2**bits, bottom)):
            assert torch.equal(dequantize(quantize(far, scale, zero_point, spec), scale, zero_point, spec), end.expand_as(x))
        # zero is exactly representable
        zeros = torch.zeros_like(x)
        assert torch.equal(dequantize(quantize(zeros, scale, zero_point, spec), scale, zero_point, spec), zeros)


def test_quant_spec_grid_limits_and_validation() -> None:
    assert (QuantSpec().qmin, QuantSpec().qmax) == (-128, 127)
    assert (QuantSpec(narrow_range=True).qmin, QuantSpec(narrow_range=True).qmax) == (-127, 127)
    assert (QuantSpec(signed=False).qmin, QuantSpec(signed=False).qmax) == (0, 255)
    assert (QuantSpec(bits=4, signed=False).qmin, QuantSpec(bits=4, signed=False).qmax) == (0, 15)
    assert (QuantSpec(bits=2).qmin, QuantSpec(bits=2).qmax) == (-2, 1)
    for bad in (1, 9, 8.0, True):
        with pytest.raises(InputError, match="bits"):
            QuantSpec(bits=bad)
    assert QuantSpec.from_dict({"bits": 4, "per_channel": True}) == QuantSpec(bits=4, per_channel=True)


def test_qparams_closed_forms() -> None:
    # symmetric signed: max|x| -> 127; unsigned symmetric: zero point 128
    scale, zp = compute_qparams(torch.tensor(-2.54), torch.tensor(1.0), QuantSpec())
    assert math.isclose(float(scale), 2.54 / 127, rel_tol=1e-6) and int(zp) == 0
    assert int(compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), QuantSpec(signed=False))[1]) == 128
    # asymmetric: scale = (max - min) / 255, zero point = round(qmin - min / scale)
    scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), QuantSpec(symmetric=False, signed=False))
    assert math.isclose(float(scale), 4.0 / 255, rel_tol=1e-6) and int(zp) == round(255 / 4)
    # post-ReLU range: zero point exactly 0; a positive-only range is widened to 0
    assert int(compute_qparams(torch.tensor(0.5), torch.tensor(6.0), QuantSpec(symmetric=False, signed=False))[1]) == 0
    # constant (all-zero) tensors get the smallest scale, not a division by zero
    scale, zp = compute_qparams(torch.tensor(0.0), torch.tensor(0.0), QuantSpec(symmetric=False, signed=False))
    assert float(scale) == SCALE_EPS and int(zp) == 0
    with pytest.raises(InputError, match="same shape"):
        compute_qparams(torch.zeros(3), torch.zeros(2), QuantSpec(per_channel=True))


def test_per_channel_scale_follows_each_channels_own_max() -> None:
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))
    x = x / x.abs().amax(dim=(0, 2), keepdim=True) * torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])[None, :, None]
    spec = QuantSpec(bits=8, per_channel=True, axis=1)
    scale, zero_point = compute_qparams(*minmax(x, spec), spec)
    torch.testing.assert_close(scale, torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0]) / 127, rtol=1e-6, atol=0)
    error = (fake_quantize(x, scale, zero_point, spec) - x).abs().amax(dim=(0, 2))
    assert (error <= scale * 0.5 * (1 + 1e-5)).all()
    with pytest.raises(InputError, match="5 channels on axis 1|do not match"):
        quantize(x, scale[:3], zero_point[:3], spec)
    with pytest.raises(InputError, match="per-tensor spec"):
        quantize(x, scale, zero_point, QuantSpec())


def test_fake_quantize_equals_dequantize_of_quantize_and_has_no_gradient() -> None:
    x = sample(2).requires_grad_()
    for spec in (QuantSpec(bits=5, symmetric=False), QuantSpec(bits=3, per_channel=True, axis=1)):
        scale, zero_point = compute_qparams(*minmax(x.detach() * 0.7, spec), spec)  # some values clip
        out = fake_quantize(x, scale, zero_point, spec)
        assert not out.requires_grad
        assert torch.equal(out, dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec))
        assert torch.equal(fake_quantize_ste(x, scale, zero_point, spec).detach(), out)


def test_power_of_two_scales_are_exact_powers_of_two() -> None:
    x = sample(3)
    for spec in (
        QuantSpec(power_of_two=True),
        QuantSpec(bits=4, power_of_two=True, per_channel=True),
        QuantSpec(power_of_two=True, symmetric=False),
    ):
        plain = QuantSpec(**{**spec.to_dict(), "power_of_two": False})
        scale, zero_point = compute_qparams(*minmax(x, spec), spec)
        reference, _ = compute_qparams(*minmax(x, spec), plain)
        mantissa, _ = torch.frexp(scale)
        assert (mantissa == 0.5).all()  # exactly 2**k
        assert (scale >= reference).all() and (scale < 2 * reference).all()  # the next power of two up
        error = (fake_quantize(x, scale, zero_point, spec) - x).abs()
        assert (error <= channel_view(scale, x, spec.axis) * (0.5 + 1e-6)).all()  # rounding up never clips
    exact = compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), QuantSpec(bits=2, power_of_two=True))[0]
    assert float(exact) == 1.0  # already a power of two: unchanged


@pytest.mark.parametrize(("peak", "fractional"), [(3.7, 5), (1.0, 7), (0.3, 8), (100.0, 0), (0.0, 7)])
def test_dynamic_fixed_point_fractional_length_from_max_abs(peak: float, fractional: int) -> None:
    x = torch.linspace(-peak, peak, 101)
    out, fl = dynamic_fixed_point(x, 8)
    assert fl == fractional  # il = ceil(log2 max|x|) + 1 sign bit, fl = 8 - il
    step = 2.0**-fl
    assert torch.equal(torch.round(out / step) * step, out)  # on the 2**-fl grid
    inside = x.abs() <= 127 * step
    assert ((out - x).abs()[inside] <= step / 2 + 1e-7).all()
    assert dynamic_fixed_point(torch.tensor([5.0]), 4)[1] == 4 - 4  # ceil(log2 5) = 3, +1


def test_ste_gradient_is_one_inside_and_zero_where_clipped() -> None:
    spec = QuantSpec(bits=4)  # codes -8..7
    scale, zero_point = torch.tensor(0.5), torch.tensor(0, dtype=torch.int32)
    x = torch.tensor([0.3, -3.9, 3.4, 3.9, -4.4, 10.0, -10.0], requires_grad=True)
    fake_quantize_ste(x, scale, zero_point, spec).sum().backward()
    # round(x / 0.5) = 1, -8, 7, 8 (clipped), -9 (clipped), 20, -20
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    pc = QuantSpec(bits=4, per_channel=True, axis=0)
    s = torch.tensor([0.01, 0.2, 1.0])  # channel 0 mostly clipped, channel 2 never
    fake_quantize_ste(w, s, torch.zeros(3, dtype=torch.int32), pc).sum().backward()
    expected = ((torch.round(w.detach() / s[:, None]) >= -8) & (torch.round(w.detach() / s[:, None]) <= 7)).float()
    assert torch.equal(w.grad, expected) and w.grad[2].eq(1).all() and w.grad[0].sum() < 4


def test_lsq_scale_gradient_matches_the_paper() -> None:
    spec = QuantSpec(bits=4)  # Qn = 8, Qp = 7
    x = torch.tensor([0.3, -1.2, 5.0, -6.0, 2.26], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    out = lsq_fake_quantize(x, scale, torch.tensor(0, dtype=torch.int32), spec)
    torch.testing.assert_close(out, fake_quantize(x, scale, torch.tensor(0, dtype=torch.int32), spec))
    upstream = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])
    (out * upstream).sum().backward()
    # v = x/s = 0.6, -2.4, 10 (>= Qp), -12 (<= -Qn), 4.52: d/ds = round(v) - v inside, Qp above, -Qn below
    per_element = torch.tensor([1 - 0.6, -2 + 2.4, 7.0, -8.0, 5 - 4.52])
    g = 1 / math.sqrt(5 * 7)
    assert math.isclose(float(scale.grad), float((per_element * upstream).sum()) * g, rel_tol=1e-5)
    assert x.grad.tolist() == [1.0, 2.0, 0.0, 0.0, 3.0]


def test_lsq_per_channel_gradient_matches_a_channel_by_channel_reference() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 2, 4, generator=g)
    spec = QuantSpec(bits=3, per_channel=True, axis=1)  # Qn = 4, Qp = 3
    scale = torch.tensor([0.3, 0.8], requires_grad=True)
    zero_point = torch.zeros(2, dtype=torch.int32)
    upstream = torch.randn(3, 2, 4, generator=g)
    (lsq_fake_quantize(w, scale, zero_point, spec) * upstream).sum().backward()
    for c in range(2):
        v = w[:, c] / scale[c].detach()
        d = torch.where(v <= -4, -4.0, torch.where(v >= 3, 3.0, torch.round(v) - v))
        expected = float((d * upstream[:, c]).sum()) / math.sqrt(12 * 3)
        assert math.isclose(float(scale.grad[c]), expected, rel_tol=1e-5)


def test_cast_precision_copies_in_half_types_only() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    for dtype in (torch.float16, torch.bfloat16):
        half = cast_precision(model, dtype)
        assert all(p.dtype == dtype for p in half.parameters())
        torch.testing.assert_close(half[0].weight.float(), model[0].weight.detach(), rtol=1e-2, atol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(InputError, match="float16 and torch.bfloat16"):
        cast_precision(model, torch.int8)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_pack_round_trip_and_dense_length(bits: int, signed: bool) -> None:
    low = -(2 ** (bits - 1)) if signed else 0
    g = torch.Generator().manual_seed(bits)
    for count in (0, 1, 7, 13, 1001):
        codes = torch.randint(low, low + 2**bits, (count,), generator=g, dtype=torch.int32)
        data = pack_codes(codes, bits, signed)
        assert len(data) == math.ceil(count * bits / 8) == packed_size(count, bits)
        assert torch.equal(unpack_codes(data, bits, signed, count), codes)
    extreme = torch.tensor([low, low + 2**bits - 1] * 3, dtype=torch.int32)
    assert torch.equal(unpack_codes(pack_codes(extreme, bits, signed), bits, signed, 6), extreme)


def test_pack_layout_is_little_endian_and_errors_are_clear() -> None:
    assert pack_codes(torch.tensor([1, 2, 3]), 4, signed=False) == bytes([0x21, 0x03])  # low nibble first
    assert pack_codes(torch.tensor([0, 1, 2, 3]), 2, signed=False) == bytes([0b11100100])
    assert pack_codes(torch.tensor([-8, 7]), 4, signed=True) == bytes([0xF0])  # offset by 8: 0 and 15
    with pytest.raises(InputError, match="out of range"):
        pack_codes(torch.tensor([16]), 4, signed=False)
    with pytest.raises(InputError, match="too short"):
        unpack_codes(b"\x00", 4, signed=False, count=3)
    with pytest.raises(InputError, match="bits"):
        pack_codes(torch.tensor([0]), 9, signed=False)
    with pytest.raises(InputError, match="integer codes"):
        pack_codes(torch.tensor([0.5]), 4, signed=False)


def test_quantized_tensor_from_float() -> None:
    w = sample(5)
    q = QuantizedTensor.from_float(w, QuantSpec(bits=4, per_channel=True, axis=0))
    assert q.scale.shape == (6,) and q.codes.shape == w.shape
    assert ((q.dequantize() - w).abs() <= q.scale[:, None, None] * (0.5 + 1e-5)).all()
    given = QuantizedTensor.from_float(w, QuantSpec(bits=8, signed=False), scale=torch.tensor(0.05))
    assert int(given.zero_point) == 128  # unsigned symmetric grid
    with pytest.raises(InputError, match="needs zero_point"):
        QuantizedTensor.from_float(w, QuantSpec(symmetric=False), scale=torch.tensor(0.05))


def test_save_load_round_trip_is_exact_and_dense(tmp_path) -> None:
    g = torch.Generator().manual_seed(6)
    tensors = {
        "fc.weight": (torch.randn(300, 100, generator=g), QuantSpec(bits=4, per_channel=True)),
        "conv.weight": (torch.randn(16, 8, 3, 3, generator=g), QuantSpec(bits=3, symmetric=False, per_channel=True, axis=0)),
        "act": (torch.rand(1001, generator=g), QuantSpec(bits=8, symmetric=False, signed=False)),
    }
    quantized = {name: QuantizedTensor.from_float(x, spec) for name, (x, spec) in tensors.items()}
    floats = {"fc.bias": torch.randn(300, generator=g), "steps": torch.tensor([1, 2, 3])}
    path = tmp_path / "model.safetensors"
    size = save_quantized(path, quantized, floats, {"model": "lenet300"})
    assert size == path.stat().st_size and not list(tmp_path.glob("*.tmp"))
    loaded, loaded_floats, metadata = load_quantized(path)
    assert metadata == {"model": "lenet300"}
    for name, q in quantized.items():
        r = loaded[name]
        assert (
            r.spec == q.spec and torch.equal(r.codes, q.codes) and torch.equal(r.scale, q.scale) and torch.equal(r.zero_point, q.zero_point)
        )
        assert torch.equal(r.dequantize(), q.dequantize())
    assert all(torch.equal(loaded_floats[k], v) for k, v in floats.items()) and set(loaded_floats) == set(floats)
    payload = sum(packed_size(q.codes.numel(), q.spec.bits) + 8 * q.scale.numel() for q in quantized.values())
    payload += 300 * 4 + 3 * 8
    assert payload <= size <= payload + 2048  # header (JSON index + metadata) is all that is added
    assert packed_size(30000, 4) == 15000  # the 4-bit weights take half a byte each


def test_load_rejects_missing_truncated_and_foreign_files(tmp_path) -> None:
    path = tmp_path / "q.safetensors"
    save_quantized(path, {"w": QuantizedTensor.from_float(torch.randn(64, 64), QuantSpec(bits=4))}, {})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    for name in ("cut", "junk", "absent"):
        with pytest.raises(InputError, match=f"{name}.safetensors") as info:
            load_quantized(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="reserved"):
        save_quantized(path, {}, {}, {"deepshrink.quantized": "x"})
