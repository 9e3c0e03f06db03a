"""The model zoo: small, clean definitions sized for 1x28x28 inputs.

Every builder takes ``in_channels`` and ``num_classes`` and works for any input
of at least 28x28 (CIFAR's 3x32x32 included): the convolutional models end in
global average pooling, and the MLPs take ``input_size``.
"""

from collections.abc import Callable

import torch
from torch import nn

from deepshrink.core.registry import Registry

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")
ZOO_INPUT_SIDE = 28  # the default input side; the MLP/LeNet builders take another as input_size


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


@MODELS.register("lenet300")
def lenet300(in_channels: int = 1, num_classes: int = 10, input_size: int = ZOO_INPUT_SIDE) -> nn.Module:
    """LeNet-300-100: the fully connected MNIST network of the Deep Compression paper."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * input_size * input_size, 300),
        nn.ReLU(inplace=True),
        nn.Linear(300, 100),
        nn.ReLU(inplace=True),
        nn.Linear(100, num_classes),
    )


def _lenet(in_channels: int, num_classes: int, input_size: int, convs: tuple[int, int], fcs: tuple[int, ...], pad: int):
    # Spatial size after two (conv5 + pool2) stages, so the first Linear matches the input size.
    side = ((input_size + 2 * pad - 4) // 2 - 4) // 2
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, convs[0], 5, padding=pad),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(convs[0], convs[1], 5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
    ]
    width = convs[1] * side * side
    for hidden in fcs:
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("lenet5")
def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = ZOO_INPUT_SIDE) -> nn.Module:
    """Classic LeNet-5 (6/16 convs, 120/84 fc); padding 2 so 28x28 sees the 32x32 geometry."""
    return _lenet(in_channels, num_classes, input_size, (6, 16), (120, 84), pad=2)


@MODELS.register("lenet5_caffe")
def lenet5_caffe(in_channels: int = 1, num_classes: int = 10, input_size: int = ZOO_INPUT_SIDE) -> nn.Module:
    """Caffe's LeNet-5 (conv 20/50, fc 500): the ~431K-weight model in Deep Compression."""
    return _lenet(in_channels, num_classes, input_size, (20, 50), (500,), pad=0)


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 1x1 conv + BN when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet (He et al. 2016): 3 stages of 16/32/64 channels, 6n+2 layers."""

    def __init__(self, depth: int, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, width))
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1) for b in range(blocks)]))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@MODELS.register("resnet20")
def resnet20(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    return ResNetCifar(20, in_channels, num_classes)


# VGG-11's layer pattern at half width; the fourth pool leaves 1x1 maps for 28x28 inputs.
VGG11_HALF = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256)


class VGG(nn.Module):
    def __init__(self, cfg=VGG11_HALF, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_bn_relu(cin, item)
                cin = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(cin, 256), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@MODELS.register("vgg")
def vgg(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """VGG-11 with BN at half width (32..256 channels), sized for 28x28."""
    return VGG(VGG11_HALF, in_channels, num_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn_relu(cin, hidden, kernel=1)
        layers += _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


# (expansion, out channels, repeats, first stride): MobileNetV2's table with the
# early strides removed, since 28x28 inputs are 8x smaller than ImageNet's after the stem.
MOBILENETV2_28 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 0.5, last_channels: int = 640) -> None:
        super().__init__()

        def scaled(c: int) -> int:  # keep channel counts multiples of 8, as the paper does
            return max(8, int(c * width + 4) // 8 * 8)

        cin = scaled(32)
        layers: list[nn.Module] = _conv_bn_relu(in_channels, cin)
        for expand, cout, repeats, stride in MOBILENETV2_28:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, scaled(cout), stride if i == 0 else 1, expand))
                cin = scaled(cout)
        layers += _conv_bn_relu(cin, last_channels, kernel=1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@MODELS.register("mobilenetv2")
def mobilenetv2(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """MobileNetV2 at width 0.5 with strides adapted to 28x28."""
    return MobileNetV2(in_channels, num_classes)


# -- students for knowledge distillation (no pretrained weights: they are trained by distilling) --
@MODELS.register("resnet8")
def resnet8(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """ResNet-8: resnet20 with one block per stage (~78K params, ~30% of its MACs), a KD student."""
    return ResNetCifar(8, in_channels, num_classes)


@MODELS.register("resnet20_thin")
def resnet20_thin(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """resnet20 at half width (8/16/32 channels): same depth, ~1/4 of the params and MACs."""
    return ResNetCifar(20, in_channels, num_classes, width=8)


@MODELS.register("lenet_small")
def lenet_small(in_channels: int = 1, num_classes: int = 10, input_size: int = ZOO_INPUT_SIDE) -> nn.Module:
    """A small LeNet (4/8 convs, one 32-unit hidden layer, ~8K params), a KD student."""
    return _lenet(in_channels, num_classes, input_size, (4, 8), (32,), pad=2)


# VGG-11 pattern at a quarter of the original widths (half of vgg's).
VGG11_QUARTER = (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128)


@MODELS.register("vgg_small")
def vgg_small(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """vgg at half its widths (16..128 channels, ~1/4 of the conv params and MACs), a KD student."""
    return VGG(VGG11_QUARTER, in_channels, num_classes)


@MODELS.register("mobilenetv2_small")
def mobilenetv2_small(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """MobileNetV2 at width 0.25 with a 320-channel head, a KD student for mobilenetv2."""
    return MobileNetV2(in_channels, num_classes, width=0.25, last_channels=320)


# The student each pretrained model distils into when a recipe asks for ``student: {model: auto}``.
STUDENTS = {
    "lenet300": "lenet_small",
    "lenet5": "lenet_small",
    "lenet5_caffe": "lenet_small",
    "resnet20": "resnet8",
    "vgg": "vgg_small",
    "mobilenetv2": "mobilenetv2_small",
}
