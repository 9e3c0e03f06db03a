"""Observers: chosen ranges on known distributions, streaming state, errors."""

import math

import pytest
import torch

from deepshrink.compress.quant.observers import (
    HISTOGRAM_BINS,
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from deepshrink.compress.quant.primitives import QuantSpec, fake_quantize
from deepshrink.core.errors import InputError

pytestmark = pytest.mark.unit

UNSIGNED = QuantSpec(symmetric=False, signed=False)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quant_mse(x: torch.Tensor, observer, spec: QuantSpec) -> float:
    scale, zero_point = observer.qparams()
    return float(((fake_quantize(x, scale, zero_point, spec) - x) ** 2).mean())


def test_minmax_on_uniform_data_streams_the_exact_bounds() -> None:
    x = torch.rand(10, 1000, generator=gen(0)) * 4 - 1  # U(-1, 3)
    observer = MinMaxObserver(QuantSpec(symmetric=False))
    for batch in x:
        observer.update(batch)
    low, high = observer.range()
    assert float(low) == float(x.min()) and float(high) == float(x.max())
    assert -1.0 <= float(low) < -0.99 and 2.99 < float(high) <= 3.0
    scale, zero_point = observer.qparams()
    assert math.isclose(float(scale), float(high - low) / 255, rel_tol=1e-6) and int(zero_point) == round(-128 - float(low) / float(scale))


def test_minmax_per_channel_on_axis_1() -> None:
    x = torch.randn(8, 3, 5, generator=gen(1)) * torch.tensor([1.0, 10.0, 0.1])[None, :, None]
    observer = MinMaxObserver(QuantSpec(per_channel=True, axis=1))
    observer.update(x[:4])
    observer.update(x[4:])
    low, high = observer.range()
    torch.testing.assert_close(high, x.amax(dim=(0, 2)).clamp(min=0), rtol=0, atol=0)
    torch.testing.assert_close(low, x.amin(dim=(0, 2)).clamp(max=0), rtol=0, atol=0)
    with pytest.raises(InputError, match="3 channels before, now 4"):
        observer.update(torch.randn(2, 4, 5))


def test_moving_average_follows_the_ema_formula() -> None:
    observer = MovingAverageObserver(QuantSpec(symmetric=False), momentum=0.8)
    bounds = [(-1.0, 2.0), (-3.0, 1.0), (-0.5, 6.0)]
    for low, high in bounds:
        observer.update(torch.tensor([low, (low + high) / 2, high]))
    expected_low, expected_high = bounds[0]
    for low, high in bounds[1:]:
        expected_low = 0.8 * expected_low + 0.2 * low
        expected_high = 0.8 * expected_high + 0.2 * high
    low, high = observer.range()
    assert math.isclose(float(low), expected_low, rel_tol=1e-6) and math.isclose(float(high), expected_high, rel_tol=1e-6)
    per_channel = MovingAverageObserver(QuantSpec(per_channel=True), momentum=0.5)
    per_channel.update(torch.tensor([[1.0, 2.0], [-4.0, 0.0]]))
    per_channel.update(torch.tensor([[3.0, 4.0], [-2.0, 0.0]]))
    torch.testing.assert_close(per_channel.range()[1], torch.tensor([3.0, 0.0]))  # (2 + 4) / 2, widened to 0
    torch.testing.assert_close(per_channel.range()[0], torch.tensor([0.0, -3.0]))
    with pytest.raises(InputError, match="momentum"):
        MovingAverageObserver(QuantSpec(), momentum=1.0)


def test_percentile_on_a_gaussian_matches_the_analytic_quantile() -> None:
    x = torch.randn(1_000_000, generator=gen(2))
    for percentile, z, tolerance in ((99.9, 3.0902, 0.03), (99.99, 3.7190, 0.08)):
        observer = PercentileObserver(QuantSpec(), percentile=percentile)
        for batch in x.split(100_000):
            observer.update(batch)
        low, high = observer.range()
        assert abs(float(high) - z) < tolerance and abs(float(low) + z) < tolerance, (percentile, low, high)


def test_mse_clips_outliers_and_beats_minmax_at_4_bits() -> None:
    x = torch.cat([torch.randn(200_000, generator=gen(3)), torch.tensor([25.0, -20.0, 18.0])])
    spec = QuantSpec(bits=4)
    minmax, mse = MinMaxObserver(spec), MSEObserver(spec)
    for batch in x.split(50_000):
        minmax.update(batch)
        mse.update(batch)
    mse_high = float(mse.range()[1])
    assert 1.5 < mse_high < 4.0 < 25.0 == float(minmax.range()[1])  # Gaussian 4-bit optimum is near 2.5 sigma
    assert quant_mse(x, mse, spec) < 0.2 * quant_mse(x, minmax, spec)


def test_mse_per_channel_is_never_worse_than_minmax_per_channel() -> None:
    w = torch.randn(32, 1024, generator=gen(4)) * (0.5 + 0.5 * torch.rand(32, 1, generator=gen(5)))
    w[::4, 0] = 8.0  # an outlier in every fourth channel
    spec = QuantSpec(bits=4, per_channel=True, axis=0)
    mse, minmax = MSEObserver(spec), MinMaxObserver(spec)
    mse.update(w)
    minmax.update(w)

    def per_channel_error(observer) -> torch.Tensor:
        scale, zero_point = observer.qparams()
        return ((fake_quantize(w, scale, zero_point, spec) - w) ** 2).mean(dim=1)

    assert (per_channel_error(mse) <= per_channel_error(minmax) + 1e-9).all()
    assert (mse.range()[1][::4] < 8.0).all()  # outlier channels clipped
    assert per_channel_error(mse)[::4].mean() < 0.5 * per_channel_error(minmax)[::4].mean()


def test_entropy_clips_a_heavy_tailed_distribution() -> None:
    g = gen(6)
    x = torch.randn(200_000, generator=g) / torch.randn(200_000, 3, generator=g).pow(2).mean(dim=1).sqrt()  # Student t, 3 dof
    spec = QuantSpec()
    observer = EntropyObserver(spec)
    for batch in x.split(50_000):
        observer.update(batch)
    low, high = observer.range()
    assert float(low) == -float(high)  # signed data: symmetric on |x|
    assert float(x.abs().quantile(0.99)) < float(high) < 0.5 * float(x.abs().max())


def test_histogram_memory_is_flat_and_rebinning_is_exact() -> None:
    observer = HistogramObserver(QuantSpec())
    data = []
    for i in range(60):
        batch = torch.randn(2000, generator=gen(100 + i)) * (1 + i / 4)  # the range keeps growing
        observer.update(batch)
        data.append(batch)
        assert observer.histogram.counts.numel() == HISTOGRAM_BINS
    h = observer.histogram
    everything = torch.cat(data)
    assert h.total == everything.numel()
    low, high = observer.range()
    assert float(low) == float(everything.min()) and float(high) == float(everything.max())
    edges = h.edges()
    direct = torch.histc(everything.double(), HISTOGRAM_BINS, float(edges[0]), float(edges[-1]))
    assert float((direct - h.counts).abs().sum()) <= 4  # only values on a bin edge may land one bin over
    assert bool((edges[:-1] <= everything.min()).any()) and float(edges[-1]) >= float(everything.max())


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_post_relu_ranges_start_exactly_at_zero(name: str) -> None:
    x = torch.relu(torch.randn(50_000, generator=gen(7))) + torch.rand(50_000, generator=gen(8)) * 0.01  # min > 0
    observer = make_observer(name, UNSIGNED)
    for batch in x.split(10_000):
        observer.update(batch)
    low, high = observer.range()
    assert float(low) == 0.0 and 1.0 < float(high) <= float(x.max())
    assert int(observer.qparams()[1]) == 0


def test_errors_are_one_line_and_name_the_problem() -> None:
    with pytest.raises(InputError, match="observer has seen no data"):
        MinMaxObserver(QuantSpec()).range()
    with pytest.raises(InputError, match="observer has seen no data"):
        EntropyObserver(QuantSpec()).qparams()
    with pytest.raises(InputError, match="known: entropy, minmax, moving_average, mse, percentile"):
        make_observer("kl", QuantSpec())
    with pytest.raises(InputError, match=r"unknown option\(s\) \['bins'\]"):
        make_observer("percentile", QuantSpec(), bins=10)
    with pytest.raises(InputError, match="per tensor only"):
        make_observer("entropy", QuantSpec(per_channel=True))
    with pytest.raises(InputError, match="NaN"):
        MinMaxObserver(QuantSpec()).update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(InputError, match="axis 3"):
        MinMaxObserver(QuantSpec(per_channel=True, axis=3)).update(torch.zeros(2, 2))


def test_all_zero_data_and_constant_batches() -> None:
    for name in OBSERVERS:
        observer = make_observer(name, UNSIGNED)
        observer.update(torch.zeros(100))
        assert [float(v) for v in observer.range()] == [0.0, 0.0]
        observer.update(torch.full((10,), 2.0))  # first non-zero batch after zeros
        assert float(observer.range()[1]) > 0.0


def test_mse_asymmetric_on_skewed_signed_data_and_extreme_range_growth() -> None:
    g = gen(9)
    x = torch.cat([-torch.rand(20_000, generator=g) * 0.5, torch.empty(80_000).exponential_(generator=g)])  # skewed, long right tail
    spec = QuantSpec(bits=4, symmetric=False)
    mse, minmax = MSEObserver(spec), MinMaxObserver(spec)
    mse.update(x)
    minmax.update(x)
    low, high = (float(v) for v in mse.range())
    assert -0.5 <= low < 0.0 < high < float(x.max())
    assert quant_mse(x, mse, spec) < 0.5 * quant_mse(x, minmax, spec)
    tiny_then_huge = HistogramObserver(QuantSpec())
    tiny_then_huge.update(torch.tensor([1e-30, -1e-30]))
    tiny_then_huge.update(torch.tensor([1e30, -3e29]))  # the width grows by ~2**200 in one step
    assert tiny_then_huge.histogram.total == 4 and torch.equal(torch.stack(tiny_then_huge.range()), torch.tensor([-3e29, 1e30]))
