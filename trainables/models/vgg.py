"""VGG-13 with batch norm and a CIFAR classifier head.

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (2015), configuration B, with batch norm after every convolution. Five
max-pools reduce a 32x32 input to a 512x1x1 map. The ImageNet head (three fully connected
layers of width 4096) is replaced by a single linear layer 512 -> num_classes, so the
penultimate features are the 512 pooled channels of the last convolution. With 10
classes the model has 9,413,066 parameters.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from trainables.errors import SpecError
from trainables.models import FeatureClassifier, initialize_conv_weights, register_model

__all__ = ["VGG", "build_vgg13"]

logger = logging.getLogger(__name__)

# Output channels of each 3x3 convolution, and "M" for a 2x2 max-pool with stride 2.
VGG13_LAYERS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M",
)


class VGG(FeatureClassifier):
    """VGG convolution stack with batch norm, global average pooling and one linear layer.

    The global average pool is the identity on the 1x1 map of a 32x32 input. It lets
    larger inputs yield 512 features as well.
    """

    def __init__(self, in_channels: int, num_classes: int, layers: tuple[int | str, ...]) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        channels = in_channels
        for layer in layers:
            if layer == "M":
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            assert isinstance(layer, int)
            modules += [
                nn.Conv2d(channels, layer, 3, padding=1, bias=False),
                nn.BatchNorm2d(layer),
                nn.ReLU(inplace=True),
            ]
            channels = layer
        self.convolutions = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        initialize_conv_weights(self)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.convolutions(x)), 1)


@register_model("vgg13", convolutional=True)
def build_vgg13(num_classes: int, input_shape: tuple[int, int, int]) -> VGG:
    """Build VGG-13 with batch norm for inputs of at least 32x32 pixels.

    Raises:
        SpecError: height or width below 32, which five max-pools cannot reduce.
    """
    min_size = 2 ** VGG13_LAYERS.count("M")
    channels, height, width = input_shape
    if height < min_size or width < min_size:
        raise SpecError(
            f"input_shape {tuple(input_shape)} is too small for model 'vgg13': "
            f"height and width must be at least {min_size}, so resize the images"
        )
    return VGG(channels, num_classes, VGG13_LAYERS)
