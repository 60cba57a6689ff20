"""Tests of accuracy, NC1, dilation and memorization against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables.metrics import accuracy, dilation, memorization, nc1

# Accuracy


def test_accuracy_by_hand() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    labels = torch.tensor([0, 0, 0])
    assert accuracy(logits, labels) == pytest.approx(2 / 3)


def test_accuracy_bounds() -> None:
    logits = torch.eye(4)
    assert accuracy(logits, torch.arange(4)) == 1.0
    assert accuracy(logits, torch.tensor([1, 2, 3, 0])) == 0.0


@pytest.mark.parametrize(
    ("logits_shape", "labels_shape"),
    [((3, 2), (2,)), ((0, 2), (0,)), ((3,), (3,))],
)
def test_accuracy_rejects_shapes(logits_shape: tuple[int, ...], labels_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="accuracy expects"):
        accuracy(torch.zeros(logits_shape), torch.zeros(labels_shape, dtype=torch.int64))


# NC1


def test_nc1_two_classes_by_hand() -> None:
    # Class 0: (0, 1), (2, -1), mean (1, 0). Class 1: (4, 2), (6, 0), mean (5, 1).
    features = torch.tensor([[0.0, 1.0], [2.0, -1.0], [4.0, 2.0], [6.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])

    # Global mean (3, 0.5). Centred class means are -v and v with v = (2, 0.5), |v|^2 = 4.25.
    # Sigma_B = v v^T = [[4, 1], [1, 0.25]], so Sigma_B^+ = v v^T / |v|^4 = Sigma_B / 18.0625.
    # Every deviation is +-(1, -1), so Sigma_W = [[1, -1], [-1, 1]].
    sigma_w = np.array([[1.0, -1.0], [-1.0, 1.0]])
    sigma_b_pinv = np.array([[4.0, 1.0], [1.0, 0.25]]) / 18.0625
    expected = np.trace(sigma_w @ sigma_b_pinv) / 2
    # tr = v^T Sigma_W v / |v|^4 = (2 - 0.5)^2 / 18.0625.
    assert expected == pytest.approx(2.25 / 18.0625 / 2)

    assert nc1(features, labels, 2) == pytest.approx(expected, rel=1e-12)


def test_nc1_zero_at_class_means() -> None:
    means = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 3.0, 0.0], [0.5, 0.5, -4.0]])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    assert nc1(means[labels], labels, 3) == pytest.approx(0.0, abs=1e-12)


def test_nc1_orthogonal_spread_is_zero() -> None:
    # Within-class spread along y only, class means differ along x only.
    features = torch.tensor([[-1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [1.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert nc1(features, labels, 2) == pytest.approx(0.0, abs=1e-12)


def reference_nc1(features: np.ndarray, labels: np.ndarray, rank: int | None = None) -> float:
    # Direct D x D computation. With ``rank``, keep only the top eigenpairs of Sigma_B.
    classes = np.unique(labels)
    means = {c: features[labels == c].mean(axis=0) for c in classes}
    global_mean = features.mean(axis=0)
    sigma_w = sum(np.outer(h - means[c], h - means[c]) for h, c in zip(features, labels)) / len(labels)
    sigma_b = sum(np.outer(means[c] - global_mean, means[c] - global_mean) for c in classes) / len(classes)
    if rank is None:
        sigma_b_pinv = np.linalg.pinv(sigma_b)
    else:
        values, vectors = np.linalg.eigh(sigma_b)
        top_values, top_vectors = values[-rank:], vectors[:, -rank:]
        sigma_b_pinv = top_vectors @ np.diag(1.0 / top_values) @ top_vectors.T
    return float(np.trace(sigma_w @ sigma_b_pinv) / len(classes))


def test_nc1_unbalanced_matches_direct_formula() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0] * 5 + [1] * 9 + [2] * 16)
    features = torch.randn(30, 4, generator=generator) + 2 * torch.randn(3, 4, generator=generator)[labels]
    expected = reference_nc1(features.double().numpy(), labels.numpy())
    assert nc1(features, labels, 3) == pytest.approx(expected, rel=1e-9)


def test_nc1_rank_deficient_between_covariance() -> None:
    # Balanced classes in 20 dimensions: Sigma_B has rank exactly K - 1 = 2.
    generator = torch.Generator().manual_seed(2)
    labels = torch.arange(3).repeat(4)
    features = torch.randn(12, 20, generator=generator) + 3 * torch.randn(3, 20, generator=generator)[labels]
    expected = reference_nc1(features.double().numpy(), labels.numpy(), rank=2)
    assert nc1(features, labels, 3) == pytest.approx(expected, rel=1e-8)


def test_nc1_invariant_to_scale_and_shift() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 2, 3] * 5)
    features = torch.randn(20, 6, generator=generator, dtype=torch.float64)
    features += torch.randn(4, 6, generator=generator, dtype=torch.float64)[labels]
    base = nc1(features, labels, 4)
    assert base > 0
    assert nc1(7.0 * features + 3.0, labels, 4) == pytest.approx(base, rel=1e-9)


def test_nc1_skips_classes_without_samples() -> None:
    generator = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 1, 2] * 4)
    features = torch.randn(12, 5, generator=generator) + torch.randn(3, 5, generator=generator)[labels]
    assert nc1(features, labels, 5) == pytest.approx(nc1(features, labels, 3), rel=1e-12)


def test_nc1_float32_and_float64_agree() -> None:
    generator = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 1] * 6)
    features = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    assert nc1(features.float(), labels, 2) == pytest.approx(nc1(features, labels, 2), rel=1e-5)


def test_nc1_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        nc1(torch.randn(4, 2), torch.zeros(4, dtype=torch.int64), 3)


@pytest.mark.parametrize("bad_label", [-1, 3])
def test_nc1_rejects_label_out_of_range(bad_label: int) -> None:
    with pytest.raises(ValueError, match=f"label {bad_label} outside \\[0, 3\\)"):
        nc1(torch.randn(3, 2), torch.tensor([0, 1, bad_label]), 3)


def test_nc1_rejects_float_labels() -> None:
    with pytest.raises(ValueError, match="integer class labels, got torch.float32"):
        nc1(torch.randn(3, 2), torch.tensor([0.0, 1.0, 1.0]), 2)


def test_nc1_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"got \(4, 2\) and \(3,\)"):
        nc1(torch.randn(4, 2), torch.tensor([0, 1, 1]), 2)


def test_dilation_is_square_root_of_nc1() -> None:
    features = torch.tensor([[0.0, 1.0], [2.0, -1.0], [4.0, 2.0], [6.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert dilation(features, labels, 2) == pytest.approx(math.sqrt(2.25 / 18.0625 / 2), rel=1e-12)


# Memorization


def test_memorization_two_classes_by_hand() -> None:
    # Correct class 0: (0, 0), (2, 0), centroid (1, 0). Correct class 1: (4, 3), (4, 5),
    # centroid (4, 4). Centroid spacing |(3, 4)| = 5.
    # Corrupted: clean 0 at (4, 4) with distance 5, clean 1 at (4, 1) with distance 3. Mean 4.
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 3.0], [4.0, 5.0], [4.0, 4.0], [4.0, 1.0]])
    clean = torch.tensor([0, 0, 1, 1, 0, 1])
    noisy = torch.tensor([0, 0, 1, 1, 1, 0])
    assert memorization(features, noisy, clean, 2) == pytest.approx(4 / 5, rel=1e-12)


def test_memorization_three_classes_by_hand() -> None:
    # Centroids (1, 0), (4, 4), (1, 4): pairwise distances 5, 3, 4, mean 4.
    # Corrupted distances to the clean centroid: 5, 3 and 2, mean 10 / 3.
    features = torch.tensor(
        [[0.0, 0.0], [2.0, 0.0], [4.0, 3.0], [4.0, 5.0], [1.0, 4.0], [4.0, 4.0], [4.0, 1.0], [1.0, 2.0]]
    )
    clean = torch.tensor([0, 0, 1, 1, 2, 0, 1, 2])
    noisy = torch.tensor([0, 0, 1, 1, 2, 1, 0, 0])
    assert memorization(features, noisy, clean, 3) == pytest.approx((10 / 3) / 4, rel=1e-12)


def test_memorization_one_at_noisy_centroid() -> None:
    # A corrupted sample placed exactly on its noisy class's centroid is one spacing away.
    features = torch.tensor([[0.0, 0.0], [0.0, 2.0], [6.0, 1.0], [6.0, 1.0]])
    clean = torch.tensor([0, 0, 1, 0])
    noisy = torch.tensor([0, 0, 1, 1])
    assert memorization(features, noisy, clean, 2) == pytest.approx(1.0, rel=1e-12)


def test_memorization_zero_without_corruption() -> None:
    labels = torch.tensor([0, 1, 1])
    assert memorization(torch.randn(3, 4), labels, labels.clone(), 2) == 0.0


def test_memorization_invariant_to_scale_and_shift() -> None:
    generator = torch.Generator().manual_seed(6)
    clean = torch.tensor([0, 1, 2] * 6)
    noisy = clean.clone()
    noisy[[0, 4, 8]] = torch.tensor([1, 2, 0])
    features = torch.randn(18, 5, generator=generator, dtype=torch.float64)
    features += 3 * torch.randn(3, 5, generator=generator, dtype=torch.float64)[clean]
    base = memorization(features, noisy, clean, 3)
    assert base > 0
    assert memorization(0.1 * features - 2.0, noisy, clean, 3) == pytest.approx(base, rel=1e-9)


def test_memorization_rejects_class_without_correct_samples() -> None:
    features = torch.randn(4, 2)
    clean = torch.tensor([0, 0, 1, 2])
    noisy = torch.tensor([0, 0, 0, 2])
    with pytest.raises(ValueError, match="none for class 1"):
        memorization(features, noisy, clean, 3)


def test_memorization_rejects_coinciding_centroids() -> None:
    features = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    clean = torch.tensor([0, 1, 0])
    noisy = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="centroids coincide"):
        memorization(features, noisy, clean, 2)


def test_memorization_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match=r"got \(3, 2\) and \(2,\)"):
        memorization(torch.randn(3, 2), torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 2)
