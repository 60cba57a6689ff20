"""CIFAR-style ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", 2016).

The ImageNet stem (7x7 stride-2 convolution and max-pool) is replaced by one 3x3 stride-1
convolution, so a 32x32 input reaches the last stage at 4x4. Stages of two BasicBlocks
with widths 64, 128, 256 and 512, global average pooling and one linear layer follow.
With 10 classes the model has 11,173,962 parameters.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from trainables.models import FeatureClassifier, initialize_conv_weights, register_model

__all__ = ["BasicBlock", "ResNet", "build_resnet18"]

logger = logging.getLogger(__name__)

# Channels and BasicBlock count of each stage. The first stage keeps the resolution,
# the others halve it.
RESNET18_WIDTHS = (64, 128, 256, 512)
RESNET18_BLOCKS = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity or 1x1-projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(FeatureClassifier):
    """ResNet with a 3x3 stride-1 stem. Its features are the globally pooled last stage [B, 512]."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )

        # Residual stages: the first keeps the resolution, every later one halves it
        stages = []
        channels = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            layers = [BasicBlock(channels, width, stride)]
            layers += [BasicBlock(width, width, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.stages = nn.Sequential(*stages)

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        initialize_conv_weights(self)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return torch.flatten(self.pool(out), 1)


@register_model("resnet18", convolutional=True)
def build_resnet18(num_classes: int, input_shape: tuple[int, int, int]) -> ResNet:
    """Build the CIFAR-style ResNet-18 for inputs of any size with ``input_shape[0]`` channels."""
    return ResNet(input_shape[0], num_classes, RESNET18_WIDTHS, RESNET18_BLOCKS)
