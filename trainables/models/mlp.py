"""Multilayer perceptron of the memorization experiments: 9 hidden layers of width 2048.

Each hidden layer is Linear -> BatchNorm1d -> ReLU, or Linear -> ReLU without batch norm.
A final linear layer maps the last hidden layer to the logits. Setting
``penultimate_width`` to the number of classes gives the narrow last hidden layer of the
memorization experiments.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from trainables.errors import SpecError
from trainables.models import FeatureClassifier, register_model

__all__ = ["MLP", "build_mlp"]

logger = logging.getLogger(__name__)


class MLP(FeatureClassifier):
    """MLP that flattens the input. Its features are the outputs of the last hidden layer.

    NOTE: with batch norm, a training-mode forward pass needs at least 2 samples per
    batch (BatchNorm1d raises on a single sample), so drop or merge a last batch of one.
    """

    def __init__(
        self, in_features: int, num_classes: int, hidden_widths: tuple[int, ...], batch_norm: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_features
        for width in hidden_widths:
            # The linear bias is redundant in front of batch norm, which has its own shift.
            layers.append(nn.Linear(previous, width, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            previous = width
        self.hidden = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, num_classes)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(torch.flatten(x, 1))


@register_model("mlp", convolutional=False)
def build_mlp(
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    depth: int = 9,
    width: int = 2048,
    batch_norm: bool = True,
    penultimate_width: int | None = None,
) -> MLP:
    """Build an MLP with ``depth`` hidden layers of ``width`` units.

    Args:
        depth: number of hidden layers, at least 1.
        width: units of every hidden layer except possibly the last.
        batch_norm: insert BatchNorm1d between each hidden Linear and its ReLU.
        penultimate_width: units of the last hidden layer (the features), or None for ``width``.

    Raises:
        SpecError: a non-positive or non-integer depth or width, or a non-boolean batch_norm.
    """
    _require_positive_int("depth", depth)
    _require_positive_int("width", width)
    if penultimate_width is not None:
        _require_positive_int("penultimate_width", penultimate_width)
    if not isinstance(batch_norm, bool):
        raise SpecError(f"invalid batch_norm {batch_norm!r} for model 'mlp': expected true or false")

    last = width if penultimate_width is None else penultimate_width
    hidden_widths = (width,) * (depth - 1) + (last,)
    channels, height, image_width = input_shape
    return MLP(channels * height * image_width, num_classes, hidden_widths, batch_norm)


def _require_positive_int(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"invalid {option} {value!r} for model 'mlp': expected a positive integer")
