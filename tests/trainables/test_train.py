"""Tests of the epoch loop, checkpoint equivalence, divergence and the retrain function."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables.data import input_shape, prepare_dataset
from trainables.errors import SpecError
from trainables.losses import available_losses, loss_hyperparameter
from trainables.models import available_models
from trainables.train import (
    DataBundle,
    Trainer,
    TrainingSetup,
    batch_indices,
    epoch_permutation,
    place_data,
    retrain,
    run_epoch,
)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
HYPERPARAMETERS = {"learning_rate": 0.05, "lr_multiplier": 0.1}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> DataBundle:
    root = tmp_path_factory.mktemp("data")
    prepared = prepare_dataset("synthetic", root, input_shape("synthetic", "mlp"))
    return DataBundle(
        prepared.train_images.numpy(), prepared.train_labels.numpy(),
        prepared.test_images.numpy(), prepared.test_labels.numpy(),
        prepared.num_classes, prepared.mean, prepared.std,
    )


def mlp_setup(epochs: int = 4, loss: str = "ce", **overrides) -> TrainingSetup:
    options = {"epochs": epochs, "batch_size": 256, "model_options": {"depth": 2, "width": 64}}
    options.update(overrides)
    return TrainingSetup("synthetic", "mlp", loss, 10, input_shape("synthetic", "mlp"), **options)


def train_epochs(trainer: Trainer, data: DataBundle, epochs: int) -> list:
    train, evaluation = place_data(trainer, data)
    return [run_epoch(trainer, train, evaluation) for _ in range(epochs)]


def test_resume_matches_uninterrupted_run(synthetic, tmp_path):
    straight = Trainer(mlp_setup(), HYPERPARAMETERS)
    straight_results = train_epochs(straight, synthetic, 4)

    first = Trainer(mlp_setup(), HYPERPARAMETERS)
    train_epochs(first, synthetic, 2)
    first.save(tmp_path)
    # A fresh process would start from other weights and RNG state; simulate that.
    torch.manual_seed(12345)
    resumed = Trainer(mlp_setup(), HYPERPARAMETERS)
    resumed.load(tmp_path)
    resumed_results = train_epochs(resumed, synthetic, 2)

    assert resumed.epoch == 4
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert resumed_results[-1].train_loss == straight_results[-1].train_loss
    assert resumed.learning_rate == straight.learning_rate


def test_epoch_permutation_depends_on_seed_and_epoch():
    assert torch.equal(epoch_permutation(0, 3, 100), epoch_permutation(0, 3, 100))
    assert not torch.equal(epoch_permutation(0, 3, 100), epoch_permutation(0, 4, 100))
    assert not torch.equal(epoch_permutation(0, 3, 100), epoch_permutation(1, 3, 100))


def test_single_sample_remainder_merged(synthetic):
    batches = batch_indices(torch.arange(257), 128)
    assert [len(batch) for batch in batches] == [128, 129]
    assert torch.equal(torch.cat(batches), torch.arange(257))
    # 3000 training samples with batch size 333 leave a remainder of one sample.
    trainer = Trainer(mlp_setup(batch_size=333), HYPERPARAMETERS)
    assert math.isfinite(train_epochs(trainer, synthetic, 1)[0].train_loss)


def test_schedule_defined_on_full_budget(synthetic):
    # A trial that stops at epoch 3 of a 10-epoch budget decays every 2 epochs, not every 0.
    setup = mlp_setup(epochs=3, schedule_epochs=10)
    trainer = Trainer(setup, {"learning_rate": 0.1, "lr_multiplier": 0.5})
    results = train_epochs(trainer, synthetic, 3)
    rates = [result.learning_rate for result in results]
    assert setup.decay_interval == 2
    assert rates == pytest.approx([0.1, 0.1, 0.05])


def test_explicit_decay_interval_wins():
    assert mlp_setup(epochs=200, lr_decay_every=40).decay_interval == 40
    assert mlp_setup(epochs=200).decay_interval == 40
    assert mlp_setup(epochs=3).decay_interval == 1


def test_divergence_reported_not_raised(synthetic):
    trainer = Trainer(mlp_setup(epochs=3), {"learning_rate": 1e30, "lr_multiplier": 1.0})
    results = train_epochs(trainer, synthetic, 2)
    assert any(result.diverged for result in results)
    assert math.isnan(results[-1].train_loss)


def test_retrain_diverged_result(synthetic):
    result = retrain(mlp_setup(epochs=3), {"learning_rate": 1e30, "lr_multiplier": 1.0}, synthetic,
                     eta=0.0, seed=0, noise_seed=0)
    assert result["diverged"] is True
    assert result["epochs"] < 3 or any(entry["diverged"] for entry in result["history"])


def test_missing_learning_rate_rejected():
    with pytest.raises(SpecError, match="learning_rate"):
        Trainer(mlp_setup(), {"lr_multiplier": 0.1})


def test_negative_learning_rate_rejected():
    with pytest.raises(SpecError, match="-0.1"):
        Trainer(mlp_setup(), {"learning_rate": -0.1})


def test_loss_alpha_taken_from_config(synthetic):
    trainer = Trainer(mlp_setup(loss="ls"), {"learning_rate": 0.1, "smoothing_alpha": 0.2})
    logits = torch.randn(4, 10)
    targets = torch.tensor([0, 1, 2, 3])
    expected = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.2)
    assert trainer.criterion(logits, targets).item() == pytest.approx(expected.item(), abs=1e-6)


def test_retrain_noise_independent_of_training_seed(synthetic):
    setup = mlp_setup(epochs=1)
    first = retrain(setup, HYPERPARAMETERS, synthetic, eta=0.3, seed=0, noise_seed=7)
    second = retrain(setup, HYPERPARAMETERS, synthetic, eta=0.3, seed=1, noise_seed=7)
    assert first["noise"]["sha256"] == second["noise"]["sha256"]
    assert first["noise"]["num_flipped"] > 0


def test_noise_same_for_every_loss_and_model(tmp_path):
    # 256 training images keep one epoch of ResNet18 and VGG13 short on a CPU.
    shas = {}
    for model in available_models():
        shape = input_shape("synthetic", model)
        prepared = prepare_dataset("synthetic", tmp_path, shape)
        data = DataBundle(
            prepared.train_images.numpy()[:256], prepared.train_labels.numpy()[:256],
            prepared.test_images.numpy()[:128], prepared.test_labels.numpy()[:128],
            prepared.num_classes, prepared.mean, prepared.std,
        )
        losses = available_losses() if model == "mlp" else ["ce"]
        for loss in losses:
            setup = TrainingSetup("synthetic", model, loss, 10, shape, epochs=1, batch_size=128)
            hyperparameters = dict(HYPERPARAMETERS)
            if loss_hyperparameter(loss) is not None:
                hyperparameters[loss_hyperparameter(loss)] = 0.1
            result = retrain(setup, hyperparameters, data, eta=0.3, seed=0, noise_seed=5)
            shas[(model, loss)] = result["noise"]["sha256"]

    assert set(available_models()) <= {model for model, _ in shas}
    assert set(available_losses()) <= {loss for _, loss in shas}
    assert len(set(shas.values())) == 1, shas


def test_retrain_deterministic_for_seed(synthetic):
    setup = mlp_setup(epochs=2)
    first = retrain(setup, HYPERPARAMETERS, synthetic, eta=0.1, seed=3, noise_seed=0)
    second = retrain(setup, HYPERPARAMETERS, synthetic, eta=0.1, seed=3, noise_seed=0)
    assert first["test_accuracy"] == second["test_accuracy"]
    assert first["history"][-1]["train_loss"] == second["history"][-1]["train_loss"]


def test_retrain_resumes_from_checkpoint(synthetic, tmp_path):
    hyperparameters = {"learning_rate": 0.05, "lr_multiplier": 0.5}
    full = mlp_setup(epochs=3, lr_decay_every=2)
    straight = retrain(full, hyperparameters, synthetic, eta=0.1, seed=0, noise_seed=0)
    # Stop after 2 epochs, as a killed task would, then run again on the same directory.
    interrupted = mlp_setup(epochs=2, lr_decay_every=2)
    retrain(interrupted, hyperparameters, synthetic, eta=0.1, seed=0, noise_seed=0, checkpoint_dir=tmp_path)
    resumed = retrain(full, hyperparameters, synthetic, eta=0.1, seed=0, noise_seed=0, checkpoint_dir=tmp_path)
    assert len(resumed["history"]) == 3
    assert resumed["epochs"] == 3
    # Epoch 3 ran after the restore with the same weights, batches and learning rate.
    assert resumed["history"][2]["train_loss"] == pytest.approx(straight["history"][2]["train_loss"], rel=1e-6)


def test_retrain_reports_collapse_metrics(synthetic):
    result = retrain(mlp_setup(epochs=2), HYPERPARAMETERS, synthetic, eta=0.2, seed=0, noise_seed=0)
    for key in ("nc1_train", "nc1_test", "dilation", "memorization"):
        assert math.isfinite(result[key]), key
    assert result["dilation"] == pytest.approx(math.sqrt(result["nc1_test"]))
    assert 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_fashion_mnist_mlp_reaches_80_percent(tmp_path):
    import os

    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.fail(f"{FASHION_MNIST_DIR} missing: install it with 'apt-get install dataset-fashion-mnist'")
    shape = input_shape("fashion_mnist", "mlp")
    prepared = prepare_dataset("fashion_mnist", tmp_path, shape)
    data = DataBundle(
        prepared.train_images.numpy(), prepared.train_labels.numpy(),
        prepared.test_images.numpy(), prepared.test_labels.numpy(),
        prepared.num_classes, prepared.mean, prepared.std,
    )
    setup = TrainingSetup("fashion_mnist", "mlp", "ce", 10, shape, epochs=3, batch_size=512,
                          model_options={"depth": 2, "width": 512})
    result = retrain(setup, {"learning_rate": 0.1, "lr_multiplier": 0.1}, data,
                     eta=0.0, seed=0, noise_seed=0)
    assert len(data.train_labels) == 60000
    assert result["test_accuracy"] >= 0.80, result["test_accuracy"]


def test_cuda_path_not_taken_on_cpu(synthetic):
    # The CUDA branch (bf16 autocast, channels_last, data on the GPU) needs a GPU; here we
    # check that the CPU build selects none of it.
    trainer = Trainer(mlp_setup(), HYPERPARAMETERS)
    assert trainer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert trainer.autocast is False
        assert trainer.channels_last is False
    assert np.isfinite(train_epochs(trainer, synthetic, 1)[0].train_loss)
