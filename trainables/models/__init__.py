"""Model registry: the networks a trial can train, built by name.

Every model is a ``FeatureClassifier``: a feature extractor followed by one linear layer,
so ``forward(x, return_features=True)`` returns the logits together with the
penultimate-layer activations that the neural-collapse metrics are computed on.

Models register themselves with ``@register_model(name, convolutional=...)``. The
keyword-only parameters of the decorated builder are the options a study may set for
that model; ``build_model`` rejects any other option.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainables.errors import SpecError

__all__ = [
    "MODELS",
    "FeatureClassifier",
    "ModelEntry",
    "available_models",
    "build_model",
    "count_parameters",
    "initialize_conv_weights",
    "is_convolutional",
    "register_model",
]

logger = logging.getLogger(__name__)

ModelBuilder = Callable[..., "FeatureClassifier"]


class FeatureClassifier(nn.Module):
    """Base class of every registered model: ``extract_features`` followed by ``classifier``.

    Subclasses set ``self.classifier`` to an ``nn.Linear`` and implement
    ``extract_features(x) -> [B, D]``, where D is ``feature_dim``.
    """

    classifier: nn.Linear

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        """Width D of the penultimate features."""
        return self.classifier.in_features

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Compute the logits [B, num_classes] and, on request, the penultimate features [B, D]."""
        features = self.extract_features(x)
        logits = self.classifier(features)
        if return_features:
            return logits, features
        return logits


@dataclass(frozen=True)
class ModelEntry:
    """Registered model: its builder, whether it is convolutional, and its option names."""

    name: str
    builder: ModelBuilder
    convolutional: bool
    options: tuple[str, ...]


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, *, convolutional: bool) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder(num_classes, input_shape, **options)`` under ``name``.

    The builder's keyword-only parameters become the model's options.
    """

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        assert name not in MODELS, f"model {name!r} registered twice"
        parameters = inspect.signature(builder).parameters.values()
        options = tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)
        MODELS[name] = ModelEntry(name, builder, convolutional, options)
        return builder

    return decorate


def available_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(MODELS)


def is_convolutional(name: str) -> bool:
    """Return whether model ``name`` is convolutional, so it benefits from channels_last.

    Raises:
        SpecError: ``name`` is not registered.
    """
    return _lookup(name).convolutional


def build_model(
    name: str, num_classes: int, input_shape: tuple[int, int, int], **options: Any
) -> FeatureClassifier:
    """Build a freshly initialised model ``name`` for inputs [B, *input_shape].

    Args:
        name: a registered name (see ``available_models()``).
        num_classes: number of output logits, at least 2.
        input_shape: (channels, height, width) of one input image.
        options: model-specific options, e.g. ``depth`` and ``width`` for ``mlp``.

    Raises:
        SpecError: unknown name or option, or an invalid number of classes, input shape or
            option value. The message names the value and the accepted ones.
    """
    entry = _lookup(name)

    # Arguments shared by every model
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise SpecError(f"invalid num_classes {num_classes!r} for model {name!r}: expected an integer >= 2")
    shape = _check_input_shape(name, input_shape)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        accepted = ", ".join(entry.options) if entry.options else "none"
        listed = ", ".join(repr(option) for option in unknown)
        noun = "option" if len(unknown) == 1 else "options"
        raise SpecError(f"unknown {noun} {listed} for model {name!r}: accepted options are {accepted}")

    model = entry.builder(num_classes, shape, **options)
    logger.debug(
        "built model %s for input %s with %d classes, %d parameters",
        name, shape, num_classes, count_parameters(model),
    )
    return model


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def initialize_conv_weights(model: nn.Module) -> None:
    """Apply He initialisation (fan-out, ReLU gain) to every Conv2d and reset batch norm to the identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _lookup(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(available_models())
        raise SpecError(f"unknown model {name!r}: expected one of {known}") from None


def _check_input_shape(name: str, input_shape: Any) -> tuple[int, int, int]:
    valid = (
        isinstance(input_shape, (tuple, list))
        and len(input_shape) == 3
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)
    )
    if not valid:
        raise SpecError(
            f"invalid input_shape {input_shape!r} for model {name!r}: "
            "expected (channels, height, width) as three positive integers"
        )
    return tuple(input_shape)  # type: ignore[return-value]


# Importing the model modules registers them. They import the names defined above,
# so this import comes last.
from trainables.models import mlp, resnet, vgg  # noqa: E402,F401
