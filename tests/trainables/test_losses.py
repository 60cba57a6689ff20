"""Tests of the loss registry: hand-computed values per loss, then a contract over every loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from trainables.errors import SpecError
from trainables.losses import available_losses, build_loss, loss_hyperparameter


def softmax_by_hand(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


# Cross entropy


def test_ce_matches_log_sum_exp_by_hand() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, -0.5, 1.5]])
    targets = torch.tensor([0, 2])
    first = -(2.0 - math.log(math.exp(2.0) + math.exp(1.0) + math.exp(0.0)))
    second = -(1.5 - math.log(math.exp(0.5) + math.exp(-0.5) + math.exp(1.5)))
    loss = build_loss("ce", 3)(logits, targets)
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-6)


# Label smoothing


def test_ls_matches_smoothed_target_by_hand() -> None:
    alpha = 0.2
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    p = softmax_by_hand([1.0, 0.0, -1.0])
    target = [(1 - alpha) + alpha / 3, alpha / 3, alpha / 3]
    expected = -sum(t * math.log(q) for t, q in zip(target, p))
    loss = build_loss("ls", 3, alpha)(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.25, 0.9])
@pytest.mark.parametrize("num_classes", [2, 10])
def test_ls_equals_pytorch_label_smoothing(alpha: float, num_classes: int) -> None:
    generator = torch.Generator().manual_seed(num_classes)
    logits = 3 * torch.randn(16, num_classes, generator=generator)
    targets = torch.randint(0, num_classes, (16,), generator=generator)
    expected = F.cross_entropy(logits, targets, label_smoothing=alpha)
    actual = build_loss("ls", num_classes, alpha)(logits, targets)
    assert abs(actual.item() - expected.item()) < 1e-6


def test_ls_default_alpha() -> None:
    logits = torch.tensor([[0.3, -0.2, 1.0, 0.0]])
    targets = torch.tensor([2])
    expected = F.cross_entropy(logits, targets, label_smoothing=0.1)
    assert build_loss("ls", 4)(logits, targets).item() == pytest.approx(expected.item(), abs=1e-6)


# Label relaxation


def relaxation_by_hand(row: list[float], label: int, alpha: float) -> float:
    # KL(r || p) with r the projection of p onto {q : q[label] >= 1 - alpha}.
    p = softmax_by_hand(row)
    if p[label] >= 1 - alpha:
        return 0.0
    other = sum(q for k, q in enumerate(p) if k != label)
    r = [(1 - alpha) if k == label else alpha * q / other for k, q in enumerate(p)]
    return sum(rk * math.log(rk / pk) for rk, pk in zip(r, p))


def test_lr_below_threshold_equals_kl_by_hand() -> None:
    alpha = 0.1
    row = [1.0, 0.0, -1.0]
    p = softmax_by_hand(row)
    assert p[1] < 1 - alpha
    # Written out: r = [0.1 * p0 / (p0 + p2), 0.9, 0.1 * p2 / (p0 + p2)].
    r = [alpha * p[0] / (p[0] + p[2]), 1 - alpha, alpha * p[2] / (p[0] + p[2])]
    expected = sum(rk * math.log(rk / pk) for rk, pk in zip(r, p))
    loss = build_loss("lr", 3, alpha)(torch.tensor([row]), torch.tensor([1]))
    assert expected > 0.5
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_lr_batch_mean_includes_satisfied_rows() -> None:
    alpha = 0.2
    rows = [[4.0, 0.0, 0.0], [0.0, 1.0, 2.0], [-1.0, 3.0, 0.5]]
    labels = [0, 0, 2]
    expected = sum(relaxation_by_hand(r, y, alpha) for r, y in zip(rows, labels)) / 3
    assert relaxation_by_hand(rows[0], 0, alpha) == 0.0
    loss = build_loss("lr", 3, alpha)(torch.tensor(rows), torch.tensor(labels))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_lr_zero_at_threshold() -> None:
    # softmax([0, 0]) = [0.5, 0.5] exactly, so p[y] = 1 - alpha for alpha = 0.5.
    loss = build_loss("lr", 2, 0.5)(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == 0.0


def test_lr_zero_above_threshold() -> None:
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 10.0, -5.0]])
    assert softmax_by_hand([3.0, 0.0, 0.0])[0] > 0.9
    loss = build_loss("lr", 3, 0.1)(logits, torch.tensor([0, 1]))
    assert loss.item() == 0.0


def test_lr_gradient_zero_when_satisfied() -> None:
    logits = torch.tensor([[3.0, 0.0, 0.0]], requires_grad=True)
    build_loss("lr", 3, 0.1)(logits, torch.tensor([0])).backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_lr_gradient_is_p_minus_projection() -> None:
    alpha = 0.1
    row = [1.0, 0.0, -1.0]
    logits = torch.tensor([row, row], requires_grad=True)
    build_loss("lr", 3, alpha)(logits, torch.tensor([1, 1])).backward()
    p = softmax_by_hand(row)
    r = [alpha * p[0] / (p[0] + p[2]), 1 - alpha, alpha * p[2] / (p[0] + p[2])]
    expected = torch.tensor([[(pk - rk) / 2 for pk, rk in zip(p, r)]] * 2)
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_lr_extreme_logits_stay_finite() -> None:
    logits = torch.tensor([[100.0, -100.0, 0.0], [1e4, 0.0, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    loss = build_loss("lr", 3, 0.1)(logits, torch.tensor([1, 0, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # The first row has log p[y] of about -200, so its loss alone is about 0.9 * 200.
    assert loss.item() > 150 / 3


def test_lr_small_alpha_approaches_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 5, generator=generator)
    targets = torch.randint(0, 5, (8,), generator=generator)
    relaxed = build_loss("lr", 5, 1e-6)(logits, targets)
    assert relaxed.item() == pytest.approx(F.cross_entropy(logits, targets).item(), abs=1e-4)


# Mean squared error


def test_mse_on_logits_against_one_hot() -> None:
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([2, 1])
    # The first row contributes 0.25 + 1 + 1 and the second 0, averaged over all 6 entries.
    expected = (0.25 + 1.0 + 1.0 + 0.0) / 6
    assert build_loss("mse", 3)(logits, targets).item() == pytest.approx(expected, abs=1e-7)


def test_mse_accepts_float_targets_of_logits_shape() -> None:
    logits = torch.tensor([[0.5, -1.0, 2.0]])
    one_hot = torch.tensor([[0.0, 0.0, 1.0]])
    loss = build_loss("mse", 3)
    assert loss(logits, one_hot).item() == pytest.approx(loss(logits, torch.tensor([2])).item())


@pytest.mark.parametrize("shape", [(4,), (4, 1), (1, 3), (4, 3, 1)])
def test_mse_rejects_float_targets_of_other_shape(shape: tuple[int, ...]) -> None:
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"logits' shape \(4, 3\)"):
        build_loss("mse", 3)(logits, torch.zeros(shape))


# Tensor checks shared by every loss


@pytest.mark.parametrize("name", available_losses())
def test_rejects_logits_of_wrong_width(name: str) -> None:
    with pytest.raises(ValueError, match=r"shape \[batch, 3\].*\(2, 4\)"):
        build_loss(name, 3)(torch.zeros(2, 4), torch.tensor([0, 1]))


@pytest.mark.parametrize("name", available_losses())
def test_rejects_int32_targets(name: str) -> None:
    with pytest.raises(ValueError, match="int64 class indices.*torch.int32"):
        build_loss(name, 3)(torch.zeros(2, 3), torch.tensor([0, 1], dtype=torch.int32))


@pytest.mark.parametrize("name", available_losses())
def test_rejects_targets_of_wrong_length(name: str) -> None:
    with pytest.raises(ValueError, match=r"shape \[2\].*\(3,\)"):
        build_loss(name, 3)(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


# build_loss and loss_hyperparameter


def test_loss_hyperparameter_names() -> None:
    assert loss_hyperparameter("ls") == "smoothing_alpha"
    assert loss_hyperparameter("lr") == "relaxation_alpha"
    assert loss_hyperparameter("ce") is None
    assert loss_hyperparameter("mse") is None


def test_registry_contains_paper_losses() -> None:
    assert available_losses() == ["ce", "lr", "ls", "mse"]


def test_unknown_loss_lists_names() -> None:
    with pytest.raises(SpecError, match=r"unknown loss 'focal': expected one of ce, lr, ls, mse"):
        build_loss("focal", 10)
    with pytest.raises(SpecError, match="unknown loss 'focal'"):
        loss_hyperparameter("focal")


@pytest.mark.parametrize("name", ["ls", "lr"])
def test_default_alpha_is_one_tenth(name: str) -> None:
    assert build_loss(name, 10).alpha == 0.1


@pytest.mark.parametrize("name", ["ls", "lr"])
@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf"), "small", True])
def test_rejects_alpha_outside_unit_interval(name: str, alpha: object) -> None:
    with pytest.raises(SpecError, match=f"invalid {loss_hyperparameter(name)} {alpha!r}.*in \\(0, 1\\)"):
        build_loss(name, 10, alpha)


def test_accepts_numpy_alpha() -> None:
    loss = build_loss("ls", 10, np.float64(0.25))
    assert loss.alpha == 0.25
    assert type(loss.alpha) is float


@pytest.mark.parametrize("name", ["ce", "mse"])
def test_rejects_alpha_for_loss_without_one(name: str) -> None:
    with pytest.raises(SpecError, match=f"loss '{name}' takes no alpha \\(got 0.1\\).*lr, ls"):
        build_loss(name, 10, 0.1)


@pytest.mark.parametrize("num_classes", [1, 0, 10.0])
def test_rejects_num_classes(num_classes: object) -> None:
    with pytest.raises(SpecError, match=f"invalid num_classes {num_classes!r}"):
        build_loss("ce", num_classes)


# Contract shared by every registered loss


@pytest.mark.parametrize("name", available_losses())
def test_contract_finite_scalar_with_gradient(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=generator, requires_grad=True)
    targets = torch.randint(0, 4, (6,), generator=generator)
    loss = build_loss(name, 4)(logits, targets)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", available_losses())
def test_contract_decreases_under_sgd(name: str) -> None:
    # Toy problem: a linear classifier on four well-separated Gaussian blobs.
    torch.manual_seed(0)
    centres = 3 * torch.eye(4, 8)
    targets = torch.arange(4).repeat_interleave(16)
    inputs = centres[targets] + 0.3 * torch.randn(64, 8)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = build_loss(name, 4)

    initial = loss_fn(model(inputs), targets).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    final = loss_fn(model(inputs), targets).item()

    assert initial > 0
    assert final < 0.8 * initial
