"""BatchNorm folding: the folded model computes the same function, on the real zoo and on edge cases."""

import copy

import pytest
import torch
from torch import nn

from deepshrink.compress.structure import fold_batchnorm, foldable_pairs
from deepshrink.core.errors import InputError
from deepshrink.data import load_data
from deepshrink.models import create_model

pytestmark = pytest.mark.unit

ZOO = ["lenet300", "lenet5", "lenet5_caffe", "resnet20", "vgg", "mobilenetv2"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_data("fashion-mnist", test_subset=64).test.images[:64]


def batchnorms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


@pytest.mark.parametrize("name", ZOO)
def test_fold_zoo_models_keeps_outputs(name: str, images: torch.Tensor) -> None:
    model = create_model(name, pretrained=True).eval()
    before = copy.deepcopy(model.state_dict())
    bn_count = len(batchnorms(model))
    folded = fold_batchnorm(model)
    with torch.no_grad():
        reference = model(images)
        diff = float((folded(images) - reference).abs().max())
    # Folding reorders fp32 arithmetic, so the bar is relative to the largest output: 1e-6 is
    # a few ulp of it (measured up to 5e-7 on AVX-512 kernels, mobilenetv2); a wrong fold is off by O(1).
    assert diff < 1e-6 * float(reference.abs().max()), diff
    assert not batchnorms(folded) and foldable_pairs(folded) == []  # every BN in the zoo follows a conv
    assert len(foldable_pairs(model)) == bn_count
    assert not folded.training
    # the caller's model is untouched
    assert len(batchnorms(model)) == bn_count and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fold_linear_and_conv_without_bias_creates_a_bias() -> None:
    model = randomise_bn(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 5),
            nn.BatchNorm1d(5),
            nn.Linear(5, 2),
            nn.BatchNorm1d(2, affine=False),
        ),
        seed=0,
    ).train()
    x = torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert foldable_pairs(model) == [("0", "1"), ("4", "5"), ("6", "7")]
    folded = fold_batchnorm(model)
    assert model.training and model[0].bias is None  # caller's model untouched
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None and folded[0].bias.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    # closed form for the linear pair: W' = W * gamma / std, b' = (b - mean) * gamma / std + beta
    bn, linear = model[5], model[4]
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded[4].weight, linear.weight * factor[:, None])
    torch.testing.assert_close(folded[4].bias, (linear.bias - bn.running_mean) * factor + bn.bias)


class SharedOutput(nn.Module):
    """conv1's output feeds its BN and a skip path; bn2 follows a ReLU; conv3 + bn3 is foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = self.bn2(torch.relu(self.bn1(y) + y))
        return self.bn3(self.conv3(z))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


def test_bn_with_other_users_or_no_conv_stays() -> None:
    model = randomise_bn(SharedOutput(), seed=2).eval()
    assert foldable_pairs(model) == [("conv3", "bn3")]
    folded = fold_batchnorm(model)
    assert batchnorms(folded) == ["bn1", "bn2"]
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert foldable_pairs(randomise_bn(CalledTwice(), seed=4)) == []


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return x


def test_untraceable_model_is_a_clear_error() -> None:
    with pytest.raises(InputError, match="cannot trace Untraceable") as info:
        fold_batchnorm(Untraceable())
    assert "\n" not in str(info.value)
