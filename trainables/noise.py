"""Symmetric label noise, as a pure function of the clean labels and a noise seed.

Kinds of noise (``NOISE_KINDS``):

- ``uniform`` (default): with probability eta a label is replaced by one drawn uniformly
  from all N classes, so the replacement can equal the clean label and the expected flip
  rate is eta (N - 1) / N. This is the noise of the code of Nguyen et al.,
  "Memorization-Dilation: Modeling Neural Collapse Under Label Noise" (ICLR 2023).
- ``flip``: with probability eta a label is replaced by one drawn uniformly from the
  other N - 1 classes, so the expected flip rate is eta.

The only source of randomness is ``numpy.random.default_rng(seed)``. The same labels, eta,
number of classes, seed and kind give byte-identical noisy labels in any process, whatever
the state of the global random generators of Python, NumPy or torch. Every kind draws the
same two vectors for a given seed, whatever eta is: one uniform number per sample, which
decides whether the sample is corrupted (number < eta), and one replacement label per
sample. So the samples corrupted at a lower eta are corrupted, with the same noisy label,
at every higher eta.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from trainables.errors import SpecError

__all__ = ["NOISE_KINDS", "NoiseRecord", "apply_label_noise", "label_vector_sha256"]

logger = logging.getLogger(__name__)

LabelsT = TypeVar("LabelsT", np.ndarray, torch.Tensor)


def _draw_from_all_classes(
    rng: np.random.Generator, labels: np.ndarray, num_classes: int
) -> np.ndarray:
    return rng.integers(0, num_classes, size=labels.shape[0], dtype=np.int64)


def _draw_from_other_classes(
    rng: np.random.Generator, labels: np.ndarray, num_classes: int
) -> np.ndarray:
    # An offset in [1, N) added modulo N is uniform over the N - 1 other classes.
    offsets = rng.integers(1, num_classes, size=labels.shape[0], dtype=np.int64)
    return (labels + offsets) % num_classes


NOISE_KINDS: dict[str, Callable[[np.random.Generator, np.ndarray, int], np.ndarray]] = {
    "uniform": _draw_from_all_classes,
    "flip": _draw_from_other_classes,
}
"""Noise kind -> function drawing one replacement label per sample (int64)."""


@dataclass(frozen=True)
class NoiseRecord:
    """Record of one application of label noise, for the tracking store.

    ``flip_rate`` is the realised fraction of labels that differ from the clean ones
    (``num_flipped`` / number of labels). ``sha256`` is the hex SHA-256 digest of the noisy
    label vector as little-endian int64 bytes (see ``label_vector_sha256``).
    """

    kind: str
    eta: float
    seed: int
    num_flipped: int
    flip_rate: float
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a dict of plain Python values."""
        return asdict(self)


def label_vector_sha256(labels: np.ndarray | torch.Tensor) -> str:
    """Return the hex SHA-256 digest of a label vector as little-endian int64 bytes."""
    array = _to_numpy(labels).astype("<i8", copy=False)
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def apply_label_noise(
    labels: LabelsT,
    eta: float,
    num_classes: int,
    seed: int,
    kind: str = "uniform",
) -> tuple[LabelsT, NoiseRecord]:
    """Corrupt each label with probability ``eta`` and return the noisy labels and a record.

    ``labels`` is a 1-D integer numpy array or torch tensor with values in
    [0, num_classes). The noisy labels come back as the same type, with the same dtype
    (and device, for a tensor). The input is not modified. ``kind`` is a key of
    ``NOISE_KINDS`` (see the module docstring for what each kind draws).

    Raises:
        SpecError: eta outside [0, 1), an unknown kind, num_classes below 2, a negative or
            non-integer seed, or labels that are empty, not 1-D, not integers or outside
            [0, num_classes). The message names the value.
    """
    # Validate every input before drawing anything.
    draw_replacements = _lookup_kind(kind)
    _validate_eta(eta)
    _validate_num_classes(num_classes)
    _validate_seed(seed)
    clean = _to_numpy(labels)
    _validate_labels(clean, num_classes)

    # Draw the corruption mask and the replacement labels from the seed alone.
    clean = clean.astype(np.int64, copy=False)
    rng = np.random.default_rng(seed)
    corrupted = rng.random(clean.shape[0]) < eta
    replacements = draw_replacements(rng, clean, num_classes)
    noisy = np.where(corrupted, replacements, clean)

    # Record what was realised.
    num_flipped = int(np.count_nonzero(noisy != clean))
    record = NoiseRecord(
        kind=kind,
        eta=float(eta),
        seed=int(seed),
        num_flipped=num_flipped,
        flip_rate=num_flipped / clean.shape[0],
        sha256=label_vector_sha256(noisy),
    )
    logger.debug(
        "label noise %s eta=%s seed=%s: %s of %s labels flipped",
        kind, eta, seed, num_flipped, clean.shape[0],
    )
    return _like(noisy, labels), record


def _lookup_kind(kind: str) -> Callable[[np.random.Generator, np.ndarray, int], np.ndarray]:
    try:
        return NOISE_KINDS[kind]
    except (KeyError, TypeError) as err:
        known = ", ".join(NOISE_KINDS)
        raise SpecError(f"unknown noise kind {kind!r}: expected one of {known}") from err


def _validate_eta(eta: float) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)):
        raise SpecError(f"invalid noise level eta {eta!r}: expected a number in [0, 1)")
    if not 0.0 <= float(eta) < 1.0:
        raise SpecError(f"invalid noise level eta {eta!r}: expected a number in [0, 1)")


def _validate_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise SpecError(f"invalid num_classes {num_classes!r}: expected an integer >= 2")
    if num_classes < 2:
        raise SpecError(f"invalid num_classes {num_classes!r}: expected an integer >= 2")


def _validate_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpecError(f"invalid noise seed {seed!r}: expected a non-negative integer")


def _validate_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.ndim != 1 or labels.shape[0] == 0:
        raise SpecError(
            f"invalid labels of shape {tuple(labels.shape)}: expected a non-empty 1-D vector"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise SpecError(
            f"invalid labels of dtype {labels.dtype}: expected integer class indices"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise SpecError(
            f"labels range from {low} to {high}, outside [0, {num_classes}): "
            f"check num_classes {num_classes} against the dataset"
        )


def _to_numpy(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def _like(noisy: np.ndarray, original: LabelsT) -> LabelsT:
    if isinstance(original, torch.Tensor):
        return torch.from_numpy(noisy).to(dtype=original.dtype, device=original.device)
    return noisy.astype(np.asarray(original).dtype, copy=False)
