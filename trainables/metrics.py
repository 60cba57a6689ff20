"""Evaluation metrics: accuracy and the neural-collapse quantities of the label-noise study.

``nc1`` measures within-class variability collapse (Papyan, Han and Donoho, "Prevalence
of neural collapse during the terminal phase of deep learning training", PNAS 2020).
``dilation`` is its square root, the quantity the memorization-dilation study plots for
test features. ``memorization`` measures how far the features of training samples with
corrupted labels lie from the centroid of their original class.

All functions take tensors on any device, compute in float64 and return Python floats.
Invalid shapes or labels raise ``ValueError`` naming the offending value.
"""

from __future__ import annotations

import logging
import math

import torch

__all__ = ["accuracy", "dilation", "memorization", "nc1"]

logger = logging.getLogger(__name__)

# Singular values of the centred class-mean matrix below this fraction of the largest
# count as zero in the pseudo-inverse, i.e. eigenvalues of Sigma_B below 1e-10 of the
# largest. With balanced classes that matrix has rank K - 1 exactly, and float64
# round-off leaves its last singular value near 1e-16 relative, far below this cut.
PINV_RTOL = 1e-5


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction in [0, 1] of rows of ``logits`` [B, N] whose argmax equals ``labels`` [B].

    Raises:
        ValueError: empty batch, or shapes that do not match.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(
            f"accuracy expects logits [batch, classes] and labels [batch] with batch > 0, "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    correct = logits.argmax(dim=1) == labels.to(logits.device)
    return correct.double().mean().item()


def nc1(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Compute NC1 = tr(Sigma_W Sigma_B^+) / K on penultimate features [n, D].

    Normalisation, following Papyan et al. (2020), with n samples h_i of class c_i,
    class means mu_c and the global mean mu_G over all n samples:

    - Sigma_W = (1/n) sum_i (h_i - mu_{c_i}) (h_i - mu_{c_i})^T, averaged over samples;
    - Sigma_B = (1/K) sum_c (mu_c - mu_G) (mu_c - mu_G)^T, averaged over classes;
    - Sigma_B^+ is the Moore-Penrose pseudo-inverse, computed in float64.

    K is the number of classes with at least one sample: classes without samples are
    skipped, so K equals ``num_classes`` whenever every class occurs. NC1 is 0 when every
    feature equals its class mean, and is unchanged by scaling or shifting all features.

    The D x D matrices are never formed. With M the [K, D] matrix of rows mu_c - mu_G,
    Sigma_B = M^T M / K, so Sigma_B^+ = K M^+ (M^+)^T with M^+ = ``torch.linalg.pinv(M)``
    (singular values below ``PINV_RTOL`` times the largest count as zero), and
    NC1 = ||C M^+||_F^2 / n for the [n, D] matrix C of rows h_i - mu_{c_i}.

    Raises:
        ValueError: mismatched shapes, labels outside [0, num_classes), or fewer than two
            classes with samples (Sigma_B is then zero and NC1 undefined).
    """
    labels = _check_labels("nc1", features, labels, num_classes)
    h = features.detach().to(torch.float64)

    # Class means of the classes that occur
    counts, sums = _class_sums(h, labels, num_classes)
    present = counts > 0
    num_present = int(present.sum().item())
    if num_present < 2:
        raise ValueError(
            f"nc1 needs samples of at least 2 classes, got {num_present}: "
            "pass features of several classes"
        )
    means = sums / counts.clamp(min=1).unsqueeze(1)

    # Pseudo-inverse of the centred class means, which spans Sigma_B
    between = means[present] - h.mean(dim=0)
    between_pinv = torch.linalg.pinv(between, rtol=PINV_RTOL)

    # tr(Sigma_W Sigma_B^+) / K = ||C M^+||_F^2 / n
    centred = h - means[labels]
    projected = centred @ between_pinv
    return (projected.square().sum() / h.shape[0]).item()


def dilation(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Return sqrt(NC1), the dilation of the class clusters (see ``nc1`` for the definition)."""
    return math.sqrt(max(nc1(features, labels, num_classes), 0.0))


def memorization(
    features: torch.Tensor,
    noisy_labels: torch.Tensor,
    clean_labels: torch.Tensor,
    num_classes: int,
) -> float:
    """Measure how far corrupted samples' features lie from their original class, scale-free.

    A sample is corrupted when its noisy label differs from its clean label. The centroid
    mu_c of class c is the mean feature of the correctly labelled samples of class c.
    The result is

        mean over corrupted i of ||h_i - mu_{clean_i}||
        / mean over pairs c < c' of ||mu_c - mu_c'||,

    i.e. the mean Euclidean distance of corrupted samples to their clean-class centroid,
    in units of the mean distance between centroids (classes with correctly labelled
    samples only). Dividing by the centroid spacing, rather than by the within-class
    spread, keeps the value independent of how far the clean classes have collapsed.
    Around 0: corrupted samples sit with their original class, as if never memorised.
    Around 1: they lie about one centroid spacing away, e.g. at the centroid of their
    noisy class, which is where memorising the noisy label pulls them.

    Returns 0.0 when no sample is corrupted, because nothing can have been memorised.

    Raises:
        ValueError: mismatched shapes, labels outside [0, num_classes), a corrupted
            sample whose clean class has no correctly labelled sample, fewer than two
            centroids, or centroids that all coincide.
    """
    noisy_labels = _check_labels("memorization", features, noisy_labels, num_classes)
    clean_labels = _check_labels("memorization", features, clean_labels, num_classes)
    corrupted = noisy_labels != clean_labels
    if not bool(corrupted.any()):
        return 0.0
    h = features.detach().to(torch.float64)

    # Centroids of the correctly labelled samples
    correct = ~corrupted
    counts, sums = _class_sums(h[correct], clean_labels[correct], num_classes)
    centroids = sums / counts.clamp(min=1).unsqueeze(1)
    orphaned = torch.unique(clean_labels[corrupted][counts[clean_labels[corrupted]] == 0])
    if orphaned.numel() > 0:
        raise ValueError(
            f"memorization needs correctly labelled samples of every class with corrupted samples, "
            f"none for class {orphaned[0].item()}: use a larger sample of the training set"
        )

    # Distance of corrupted samples to their clean centroid
    displacement = h[corrupted] - centroids[clean_labels[corrupted]]
    mean_distance = displacement.norm(dim=1).mean()

    # Spacing of the centroids
    present = counts > 0
    if int(present.sum().item()) < 2:
        raise ValueError(
            "memorization needs correctly labelled samples of at least 2 classes to measure "
            "the centroid spacing: use a larger sample of the training set"
        )
    spacing = torch.pdist(centroids[present]).mean()
    if spacing.item() == 0.0:
        raise ValueError("memorization is undefined because all class centroids coincide: check the features")
    return (mean_distance / spacing).item()


def _check_labels(metric: str, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    # Validate features [n, D] and integer labels [n] in [0, num_classes). Return the labels as int64.
    if features.dim() != 2 or labels.shape != features.shape[:1] or features.shape[0] == 0:
        raise ValueError(
            f"{metric} expects features [samples, dims] and labels [samples] with samples > 0, "
            f"got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{metric} expects integer class labels, got {labels.dtype}")
    labels = labels.to(device=features.device, dtype=torch.int64)
    low, high = labels.min().item(), labels.max().item()
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{metric} got label {bad} outside [0, {num_classes}): check num_classes")
    return labels


def _class_sums(h: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Per-class sample counts [K] (float64) and feature sums [K, D].
    counts = torch.bincount(labels, minlength=num_classes).to(h.dtype)
    sums = torch.zeros(num_classes, h.shape[1], dtype=h.dtype, device=h.device)
    sums.index_add_(0, labels, h)
    return counts, sums
