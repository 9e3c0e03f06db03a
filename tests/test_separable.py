"""Depthwise-separable substitution: exactness when the conv is separable, the SVD optimum otherwise, cost, ONNX, fine-tuning."""

import pytest
import torch
from torch import nn

from deepshrink.compress.distill import KD
from deepshrink.compress.structure.separable import (
    Separable,
    SeparableConv2d,
    separable_conv,
    separable_factors,
    separable_weight,
    substitute_separable,
)
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import DataBundle, ImageSet
from deepshrink.evaluate import count_compute, evaluate_accuracy
from deepshrink.export import onnx_bytes, ort_session, verify_onnx
from deepshrink.train import TrainConfig, Trainer
from tests.conftest import make_learnable_set

G = torch.Generator().manual_seed(0)


def separable_by_construction(in_c: int, out_c: int, multiplier: int, stride: int = 1) -> nn.Conv2d:
    """A dense conv whose weight is a sum of ``multiplier`` (pointwise x depthwise) products per input channel."""
    conv = nn.Conv2d(in_c, out_c, 3, stride=stride, padding=1)
    depthwise = torch.randn(in_c, multiplier, 9, generator=G)
    pointwise = torch.randn(out_c, in_c, multiplier, generator=G)
    conv.weight.data = torch.einsum("oim,imk->oik", pointwise, depthwise).reshape(out_c, in_c, 3, 3) / 3
    return conv


@pytest.mark.unit
@pytest.mark.parametrize(("multiplier", "stride"), [(1, 1), (1, 2), (2, 1)])
def test_exact_when_the_conv_is_separable(multiplier, stride):
    conv = separable_by_construction(6, 10, multiplier, stride)
    pair = separable_conv(conv, multiplier)
    x = torch.randn(2, 6, 12, 12, generator=G)
    with torch.no_grad():
        expected = conv(x)
        assert torch.allclose(pair(x), expected, atol=1e-5 * expected.abs().max().item())
    assert pair[0].groups == 6 and pair[0].out_channels == 6 * multiplier and pair[1].kernel_size == (1, 1)
    assert (separable_weight(pair) - conv.weight.double()).abs().max().item() < 1e-5


@pytest.mark.unit
def test_error_is_the_discarded_per_channel_energy():
    """Per input channel the pair is the best rank-m approximation of W[:, i] (out x k²): Eckart–Young."""
    conv = nn.Conv2d(5, 8, 3)
    slices = conv.weight.detach().double().permute(1, 0, 2, 3).reshape(5, 8, 9)
    s = torch.linalg.svdvals(slices)
    for m in (1, 3, 8):
        error = (separable_weight(separable_conv(conv, m)) - conv.weight.double()).norm() ** 2
        assert error.item() == pytest.approx((s[:, m:] ** 2).sum().item(), abs=1e-10, rel=1e-6)


@pytest.mark.unit
def test_bad_multipliers_and_convs_raise():
    with pytest.raises(InputError, match=r"multiplier must be in \[1, 8\]"):
        separable_factors(torch.randn(8, 4, 3, 3), 9)
    with pytest.raises(InputError, match="multiplier must be >= 1"):
        Separable(multiplier=0)
    with pytest.raises(InputError, match="already a grouped convolution"):
        separable_conv(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(InputError, match="set finetune"):
        Separable(distill=KD())


def small_vgg() -> nn.Module:
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 8), nn.MaxPool2d(2), *block(8, 16), *block(16, 16), nn.AdaptiveAvgPool2d((7, 1)), nn.Flatten(), nn.Linear(112, 4)
    )


@pytest.mark.unit
def test_substitution_cuts_macs_and_params_and_exports():
    model = small_vgg().eval()
    out, errors = substitute_separable(small_vgg(), Separable(scope=Scope(types=("Conv2d",), exclude="^0$")))
    assert set(errors) == {"4", "7"} and all(0 < e < 1 for e in errors.values())
    assert isinstance(out[4], SeparableConv2d) and isinstance(out[0], nn.Conv2d)
    before, after = count_compute(model, (1, 28, 28)), count_compute(out, (1, 28, 28))
    # conv 8->16 at 14x14: 16*8*9 MACs per pixel become 8*9 + 16*8
    assert before.layers[4].macs - sum(layer.macs for layer in after.layers if layer.name.startswith("4.")) == 196 * (
        16 * 8 * 9 - 8 * 9 - 16 * 8
    )
    assert after.macs < 0.45 * before.macs
    assert sum(p.numel() for p in out.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())
    out.eval()[-1].weight.data *= 50
    x = torch.randn(8, 1, 28, 28, generator=G)
    with torch.no_grad():
        assert out(x).std(0).max() > 1e-3
    assert verify_onnx(out, ort_session(onnx_bytes(out, (1, 28, 28)), threads=1), x) < 1e-4


@pytest.mark.unit
def test_batchnorm_after_a_separable_pair_folds_exactly():
    from deepshrink.compress.structure.fold import fold_batchnorm

    model, _ = substitute_separable(small_vgg(), Separable())
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1, generator=G)
        bn.running_var.uniform_(0.5, 2, generator=G)
        bn.weight.data.uniform_(0.5, 1.5, generator=G)
    folded = fold_batchnorm(model.eval())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 1, 28, 28, generator=G)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    data = make_learnable_set(384, seed=5)

    def part(a: int, b: int) -> ImageSet:
        return ImageSet(data.images[a:b], data.labels[a:b])

    return DataBundle("synthetic", part(0, 256), part(256, 320), part(320, 384), 4, (0.0,), (1.0,))


@pytest.mark.unit
def test_registered_method_fine_tunes_with_kd(bundle):
    model = small_vgg()
    Trainer(model, TrainConfig(epochs=3, batch_size=32, lr=0.05), bundle.train, progress=False).fit()
    base = evaluate_accuracy(model, bundle.test).top1
    cfg = Separable(finetune=TrainConfig(epochs=3, batch_size=32, lr=0.02), distill=KD(temperature=2.0, alpha=0.5))
    out = apply_method(model, cfg, Context(bundle, progress=False))
    assert base >= 90.0 and evaluate_accuracy(out, bundle.test).top1 >= base - 5.0
    assert sum(isinstance(m, SeparableConv2d) for m in out.modules()) == 3
    assert not any(isinstance(m, SeparableConv2d) for m in model.modules())  # the caller's model is untouched
