"""Tests of label noise: determinism, realised flip rates, types and input errors."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainables.errors import SpecError
from trainables.noise import NOISE_KINDS, NoiseRecord, apply_label_noise, label_vector_sha256

NUM_CLASSES = 10


def balanced_labels(size: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    return (np.arange(size) % num_classes).astype(np.int64)


def expected_flip_rate(kind: str, eta: float, num_classes: int) -> float:
    # uniform redraws the clean label with probability 1/N, and flip never does.
    return eta * (num_classes - 1) / num_classes if kind == "uniform" else eta


# --- determinism -----------------------------------------------------------------------

_SUBPROCESS_SCRIPT = """
import random
import numpy as np
import torch
random.seed(11)
np.random.seed(12)
torch.manual_seed(13)
from trainables.noise import apply_label_noise
labels = (np.arange(50000) % 10).astype(np.int64)
for kind in ("uniform", "flip"):
    noisy, record = apply_label_noise(labels, 0.2, 10, seed=42, kind=kind)
    print(kind, record.sha256, record.num_flipped)
"""


def test_noise_identical_in_other_process():
    labels = balanced_labels(50000)
    expected = {}
    for kind in ("uniform", "flip"):
        _, record = apply_label_noise(labels, 0.2, NUM_CLASSES, seed=42, kind=kind)
        expected[kind] = (record.sha256, str(record.num_flipped))

    env = dict(os.environ, PYTHONHASHSEED="977")
    completed = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr

    lines = completed.stdout.strip().splitlines()
    received = {kind: (sha, flipped) for kind, sha, flipped in (l.split() for l in lines)}
    assert received == expected


def test_noise_ignores_global_rng_state():
    labels = balanced_labels(20000)

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    first, first_record = apply_label_noise(labels, 0.3, NUM_CLASSES, seed=5)

    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    np.random.random(1000)
    second, second_record = apply_label_noise(labels, 0.3, NUM_CLASSES, seed=5)

    assert np.array_equal(first, second)
    assert first_record == second_record


def test_noise_seed_changes_labels():
    labels = balanced_labels(20000)
    _, record_a = apply_label_noise(labels, 0.3, NUM_CLASSES, seed=0)
    _, record_b = apply_label_noise(labels, 0.3, NUM_CLASSES, seed=1)
    assert record_a.sha256 != record_b.sha256


def test_numpy_and_torch_inputs_agree():
    labels = balanced_labels(10000)
    noisy_numpy, record_numpy = apply_label_noise(labels, 0.2, NUM_CLASSES, seed=3)
    noisy_torch, record_torch = apply_label_noise(
        torch.from_numpy(labels), 0.2, NUM_CLASSES, seed=3
    )
    assert np.array_equal(noisy_numpy, noisy_torch.numpy())
    assert record_numpy == record_torch


@pytest.mark.parametrize(
    ("make_labels", "expected_type", "expected_dtype"),
    [
        (lambda a: a.astype(np.int64), np.ndarray, np.dtype(np.int64)),
        (lambda a: a.astype(np.uint8), np.ndarray, np.dtype(np.uint8)),
        (lambda a: torch.from_numpy(a), torch.Tensor, torch.int64),
        (lambda a: torch.from_numpy(a).to(torch.int32), torch.Tensor, torch.int32),
    ],
    ids=["numpy-int64", "numpy-uint8", "torch-int64", "torch-int32"],
)
def test_output_keeps_input_type(make_labels, expected_type, expected_dtype):
    labels = make_labels(balanced_labels(1000))
    noisy, _ = apply_label_noise(labels, 0.5, NUM_CLASSES, seed=0)
    assert isinstance(noisy, expected_type)
    assert noisy.dtype == expected_dtype
    assert tuple(noisy.shape) == (1000,)


def test_input_labels_not_modified():
    labels = balanced_labels(5000)
    original = labels.copy()
    noisy, record = apply_label_noise(labels, 0.5, NUM_CLASSES, seed=0)
    assert np.array_equal(labels, original)
    assert record.num_flipped > 0
    assert not np.array_equal(noisy, labels)


# --- realised noise --------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(NOISE_KINDS))
@pytest.mark.parametrize("eta", [0.1, 0.3])
def test_flip_rate_within_three_standard_errors(kind, eta):
    size = 200_000
    labels = balanced_labels(size)
    noisy, record = apply_label_noise(labels, eta, NUM_CLASSES, seed=7, kind=kind)

    expected = expected_flip_rate(kind, eta, NUM_CLASSES)
    standard_error = math.sqrt(expected * (1 - expected) / size)
    realised = np.count_nonzero(noisy != labels) / size
    assert record.flip_rate == pytest.approx(realised)
    assert record.num_flipped == np.count_nonzero(noisy != labels)
    assert abs(realised - expected) < 3 * standard_error


@pytest.mark.parametrize("kind", sorted(NOISE_KINDS))
def test_replacements_spread_over_classes(kind):
    # Labels of class 0 only: the flipped ones must spread evenly over classes 1..9.
    size = 100_000
    labels = np.zeros(size, dtype=np.int64)
    noisy, record = apply_label_noise(labels, 0.5, NUM_CLASSES, seed=1, kind=kind)

    counts = np.bincount(noisy[noisy != 0], minlength=NUM_CLASSES)[1:]
    share = 1 / (NUM_CLASSES - 1)
    standard_error = math.sqrt(record.num_flipped * share * (1 - share))
    assert np.all(np.abs(counts - record.num_flipped * share) < 4 * standard_error)


@pytest.mark.parametrize("kind", sorted(NOISE_KINDS))
def test_lower_eta_corruption_kept_at_higher_eta(kind):
    labels = balanced_labels(50000)
    low, _ = apply_label_noise(labels, 0.1, NUM_CLASSES, seed=9, kind=kind)
    high, _ = apply_label_noise(labels, 0.3, NUM_CLASSES, seed=9, kind=kind)
    flipped_at_low = low != labels
    assert flipped_at_low.any()
    assert np.array_equal(high[flipped_at_low], low[flipped_at_low])


@pytest.mark.parametrize("kind", sorted(NOISE_KINDS))
def test_zero_eta_flips_nothing(kind):
    labels = balanced_labels(10000)
    noisy, record = apply_label_noise(labels, 0.0, NUM_CLASSES, seed=0, kind=kind)
    assert np.array_equal(noisy, labels)
    assert record.num_flipped == 0
    assert record.flip_rate == 0.0
    assert record.sha256 == label_vector_sha256(labels)


# --- record ----------------------------------------------------------------------------


def test_record_sha256_of_int64_little_endian():
    labels = balanced_labels(1000).astype(np.uint8)
    noisy, record = apply_label_noise(labels, 0.4, NUM_CLASSES, seed=2, kind="flip")
    expected = hashlib.sha256(noisy.astype("<i8").tobytes()).hexdigest()
    assert record.sha256 == expected


def test_record_as_dict_serialisable():
    labels = balanced_labels(1000)
    _, record = apply_label_noise(np.int64(1) * labels, np.float64(0.2), 10, np.int64(4))
    as_dict = record.as_dict()
    assert set(as_dict) == {"kind", "eta", "seed", "num_flipped", "flip_rate", "sha256"}
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["kind"] == "uniform"
    assert as_dict["eta"] == 0.2
    assert as_dict["seed"] == 4
    assert type(as_dict["seed"]) is int
    assert type(as_dict["eta"]) is float
    assert isinstance(record, NoiseRecord)


# --- input errors ----------------------------------------------------------------------


@pytest.mark.parametrize("eta", [-0.1, 1.0, 1.5, float("nan"), "0.1", True])
def test_invalid_eta_rejected(eta):
    with pytest.raises(SpecError, match="eta") as caught:
        apply_label_noise(balanced_labels(100), eta, NUM_CLASSES, seed=0)
    assert repr(eta) in str(caught.value)


def test_unknown_kind_lists_kinds():
    with pytest.raises(SpecError) as caught:
        apply_label_noise(balanced_labels(100), 0.1, NUM_CLASSES, seed=0, kind="gaussian")
    message = str(caught.value)
    assert "'gaussian'" in message
    assert "uniform" in message
    assert "flip" in message


@pytest.mark.parametrize(
    "labels",
    [np.array([0, 1, 10]), np.array([-1, 0, 1]), torch.tensor([0, 3, 12])],
    ids=["too-large", "negative", "tensor-too-large"],
)
def test_labels_outside_range_rejected(labels):
    with pytest.raises(SpecError, match=r"outside \[0, 10\)"):
        apply_label_noise(labels, 0.1, NUM_CLASSES, seed=0)


@pytest.mark.parametrize(
    "labels",
    [np.array([0.0, 1.0]), np.zeros((2, 2), dtype=np.int64), np.array([], dtype=np.int64)],
    ids=["float", "two-dimensional", "empty"],
)
def test_malformed_labels_rejected(labels):
    with pytest.raises(SpecError, match="labels"):
        apply_label_noise(labels, 0.1, NUM_CLASSES, seed=0)


@pytest.mark.parametrize("num_classes", [1, 0, 2.5])
def test_invalid_num_classes_rejected(num_classes):
    with pytest.raises(SpecError, match="num_classes"):
        apply_label_noise(np.zeros(10, dtype=np.int64), 0.1, num_classes, seed=0)


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_invalid_seed_rejected(seed):
    with pytest.raises(SpecError, match="seed"):
        apply_label_noise(balanced_labels(100), 0.1, NUM_CLASSES, seed=seed)
