"""Convolutional networks for the benchmarks, built from code (no downloads, no torchvision).

``efficientnet_lite0``: EfficientNet-Lite0 as published (Tan & Le 2019; the "lite" variant drops
squeeze-and-excitation and uses ReLU6), laid out the way torchvision lays out its convnets
(``features.<stage>.<block>.block.<i>``), with ``ReLU6(inplace=True)`` after every BatchNorm but
the projections. It is the hard case for activation monitoring on a CPU: depthwise convolutions
are cheap, so a forward does little arithmetic per byte of activation (batch 8 at 224 x 224:
about 650 MB of module outputs per forward).

``resnet50``: the torchvision ResNet-50 layout (bottleneck blocks, ``ReLU(inplace=True)``), the
common case: more arithmetic per activation byte.

Weights are random (He init, BatchNorm statistics set to a plausible spread); overhead depends on
shapes and on how many values are zero or tiny, which a trained net's ReLU outputs share.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion, channels, repeats, stride, kernel) per stage, EfficientNet-B0/Lite0
_LITE0 = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
          (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))  # fmt: skip


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int, kernel: int) -> None:
        super().__init__()
        mid = cin * expansion
        layers = [] if expansion == 1 else [_conv_bn(cin, mid, 1)]
        layers += [_conv_bn(mid, mid, kernel, stride, groups=mid), _conv_bn(mid, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        stages: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for expansion, cout, repeats, stride, kernel in _LITE0:
            blocks = []
            for i in range(repeats):
                blocks.append(_MBConv(cin, cout, expansion, stride if i == 0 else 1, kernel))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        stages.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(_Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.01, generator=g)
                m.bias.zero_()
    return model.eval()


def efficientnet_lite0(seed: int = 0) -> nn.Module:
    """EfficientNet-Lite0 (4.65 M parameters), random weights, eval mode."""
    return _init(EfficientNetLite0(), seed)


def resnet50(seed: int = 0) -> nn.Module:
    """ResNet-50 (25.6 M parameters), random weights, eval mode."""
    return _init(ResNet50(), seed)


def images(batch: int, seed: int = 1) -> torch.Tensor:
    """A batch of normalised 224 x 224 RGB inputs."""
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
