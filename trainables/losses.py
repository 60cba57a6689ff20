"""Loss registry: cross entropy (ce), label smoothing (ls), label relaxation (lr), MSE (mse).

Every loss is an ``nn.Module`` called as ``loss(logits, targets)`` with logits [B, N]
(float) and class indices [B] (int64), and returns the mean over the batch as a scalar.
``ls`` and ``lr`` take a hyperparameter ``alpha`` in (0, 1), default 0.1, which the
search space tunes under the name ``loss_hyperparameter(name)``.

Shape and dtype errors of the tensors raise ``ValueError``, because they are programming
errors rather than bad study input. Invalid names and alphas raise ``SpecError``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from trainables.errors import SpecError

__all__ = [
    "LOSSES",
    "ClassificationLoss",
    "CrossEntropyLoss",
    "LabelRelaxationLoss",
    "LabelSmoothingLoss",
    "LossEntry",
    "MeanSquaredErrorLoss",
    "available_losses",
    "build_loss",
    "loss_hyperparameter",
]

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.1


class ClassificationLoss(nn.Module):
    """Base class that checks ``(logits [B, N], targets int64 [B])`` before the loss is computed."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.check_logits(logits)
        return self.compute(logits, self.check_class_targets(logits, targets))

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_logits(self, logits: torch.Tensor) -> None:
        """Raise ValueError unless ``logits`` is a float tensor [B, num_classes]."""
        name = type(self).__name__
        if not logits.is_floating_point() or logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"invalid logits for {name}: expected a float tensor of shape [batch, {self.num_classes}], "
                f"got {logits.dtype} {tuple(logits.shape)}"
            )

    def check_class_targets(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Raise ValueError unless ``targets`` is int64 [B] matching the batch of ``logits``."""
        name = type(self).__name__
        if targets.dtype != torch.int64 or targets.shape != logits.shape[:1]:
            raise ValueError(
                f"invalid targets for {name}: expected int64 class indices of shape [{logits.shape[0]}], "
                f"got {targets.dtype} {tuple(targets.shape)}"
            )
        return targets


@dataclass(frozen=True)
class LossEntry:
    """Registered loss: its class and the trial config key of its alpha (None: no alpha)."""

    name: str
    loss_class: type[ClassificationLoss]
    hyperparameter: str | None


LOSSES: dict[str, LossEntry] = {}


def register_loss(
    name: str, *, hyperparameter: str | None = None
) -> Callable[[type[ClassificationLoss]], type[ClassificationLoss]]:
    """Register a loss class under ``name``. With ``hyperparameter`` set, its constructor takes alpha."""

    def decorate(loss_class: type[ClassificationLoss]) -> type[ClassificationLoss]:
        assert name not in LOSSES, f"loss {name!r} registered twice"
        LOSSES[name] = LossEntry(name, loss_class, hyperparameter)
        return loss_class

    return decorate


def available_losses() -> list[str]:
    """Return the registered loss names, sorted."""
    return sorted(LOSSES)


def loss_hyperparameter(name: str) -> str | None:
    """Return the trial config key of the loss's alpha, or None for a loss without one.

    Raises:
        SpecError: ``name`` is not registered.
    """
    return _lookup(name).hyperparameter


def build_loss(name: str, num_classes: int, alpha: float | None = None) -> ClassificationLoss:
    """Build loss ``name`` for ``num_classes`` classes.

    Args:
        name: a registered name (see ``available_losses()``).
        num_classes: number of classes N, at least 2.
        alpha: smoothing or relaxation strength in (0, 1) for ``ls`` and ``lr``, or
            None for 0.1. Must be None for losses without a hyperparameter.

    Raises:
        SpecError: unknown name, N below 2, alpha outside (0, 1), or alpha given to a loss
            that takes none.
    """
    entry = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise SpecError(f"invalid num_classes {num_classes!r} for loss {name!r}: expected an integer >= 2")

    # Losses without a hyperparameter reject alpha rather than ignore it
    if entry.hyperparameter is None:
        if alpha is not None:
            with_alpha = ", ".join(n for n in available_losses() if LOSSES[n].hyperparameter)
            raise SpecError(
                f"loss {name!r} takes no alpha (got {alpha!r}): remove alpha or use one of {with_alpha}"
            )
        return entry.loss_class(num_classes)

    alpha = DEFAULT_ALPHA if alpha is None else _check_alpha(name, entry.hyperparameter, alpha)
    logger.debug("built loss %s with %s=%s for %d classes", name, entry.hyperparameter, alpha, num_classes)
    return entry.loss_class(num_classes, alpha)  # type: ignore[call-arg]


def _lookup(name: str) -> LossEntry:
    try:
        return LOSSES[name]
    except KeyError:
        known = ", ".join(available_losses())
        raise SpecError(f"unknown loss {name!r}: expected one of {known}") from None


def _check_alpha(name: str, hyperparameter: str, alpha: Any) -> float:
    # Accept numpy scalars as well as Python numbers, because search algorithms return either.
    message = f"invalid {hyperparameter} {alpha!r} for loss {name!r}: expected a number in (0, 1)"
    if isinstance(alpha, bool):
        raise SpecError(message)
    try:
        value = float(alpha)
    except (TypeError, ValueError) as err:
        raise SpecError(message) from err
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise SpecError(message)
    return value


@register_loss("ce")
class CrossEntropyLoss(ClassificationLoss):
    """Cross entropy of softmax(logits) against the labelled class, averaged over the batch."""

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


@register_loss("ls", hyperparameter="smoothing_alpha")
class LabelSmoothingLoss(ClassificationLoss):
    """Cross entropy against the smoothed target (1 - alpha) * one_hot(y) + alpha / N.

    Szegedy et al., "Rethinking the Inception Architecture for Computer Vision" (2016).
    The mass alpha is spread over all N classes, the labelled one included, which is the
    definition of ``torch.nn.functional.cross_entropy(..., label_smoothing=alpha)``
    (rather than alpha / (N - 1) over the other classes). Per sample the loss is
    (1 - alpha) * (-log p[y]) + alpha * mean_k(-log p[k]).
    """

    def __init__(self, num_classes: int, alpha: float = DEFAULT_ALPHA) -> None:
        super().__init__(num_classes)
        self.alpha = alpha

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=1)
        labelled = -log_probs.gather(1, targets[:, None]).squeeze(1)
        uniform = -log_probs.mean(dim=1)
        return ((1.0 - self.alpha) * labelled + self.alpha * uniform).mean()


@register_loss("lr", hyperparameter="relaxation_alpha")
class LabelRelaxationLoss(ClassificationLoss):
    """Label relaxation (Lienen and Huellermeier, "From Label Smoothing to Label Relaxation", AAAI 2021).

    The target is the credal set Q = {q : q[y] >= 1 - alpha} instead of one distribution.
    With p = softmax(logits), the loss of a sample is 0 when p lies in Q (p[y] >= 1 - alpha),
    and otherwise KL(r || p), where r is the projection of p onto Q:
    r[y] = 1 - alpha and r[k] = alpha * p[k] / S for k != y, with S = sum_{j != y} p[j].
    Substituting r gives the closed form
    KL(r || p) = (1 - alpha) * log((1 - alpha) / p[y]) + alpha * log(alpha / S).

    The gradient with respect to the logits is p - r. The authors' reference
    implementation builds r under ``torch.no_grad``, treating it as a constant target.
    Differentiating the closed form gives the same gradient, because r minimises
    KL(q || p) over Q, so the projection's own dependence on p contributes nothing.
    Both log p[y] and log S come from log_softmax and a masked logsumexp, so extreme
    logits give neither overflow nor NaN. At p[y] = 1 - alpha exactly, r = p and the
    divergence is 0, so whether the threshold test is strict does not matter.
    """

    def __init__(self, num_classes: int, alpha: float = DEFAULT_ALPHA) -> None:
        super().__init__(num_classes)
        self.alpha = alpha

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=1)
        labelled = F.one_hot(targets, self.num_classes).bool()
        log_labelled = log_probs.gather(1, targets[:, None]).squeeze(1)
        log_other_mass = torch.logsumexp(log_probs.masked_fill(labelled, -math.inf), dim=1)

        alpha = self.alpha
        labelled_term = (1.0 - alpha) * (math.log1p(-alpha) - log_labelled)
        other_term = alpha * (math.log(alpha) - log_other_mass)
        divergence = labelled_term + other_term
        satisfied = log_labelled.detach().exp() >= 1.0 - alpha
        return torch.where(satisfied, torch.zeros_like(divergence), divergence).mean()


@register_loss("mse")
class MeanSquaredErrorLoss(ClassificationLoss):
    """Squared error between the raw logits and one-hot targets, averaged over all B * N entries.

    Class indices are turned into one-hot float targets of exactly the logits' shape. A
    float target tensor is accepted as given only when its shape equals the logits'
    shape, so a wrong shape raises instead of broadcasting.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.check_logits(logits)
        if targets.is_floating_point():
            if targets.shape != logits.shape:
                raise ValueError(
                    f"invalid targets for MeanSquaredErrorLoss: got float targets of shape {tuple(targets.shape)}, "
                    f"expected the logits' shape {tuple(logits.shape)} or int64 class indices"
                )
            return F.mse_loss(logits, targets.to(logits.dtype))
        return self.compute(logits, self.check_class_targets(logits, targets))

    def compute(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(targets, self.num_classes).to(logits.dtype)
        return F.mse_loss(logits, one_hot)
