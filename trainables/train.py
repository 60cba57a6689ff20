"""The epoch loop, checkpointing, the Ray Tune trial function and the retrain function.

Everything here runs without Ray: ``Trainer`` trains one model on in-memory tensors, and
``retrain`` is a plain function. Only ``tune_trial`` talks to Ray Tune, and it imports Ray
lazily so that the rest of the module works where Ray is not installed.

The training setup follows Nguyen et al., "Memorization-Dilation: Modeling Neural Collapse
Under Label Noise", ICLR 2023, appendix A: SGD with Nesterov momentum 0.9, batch size 512,
weight decay 1e-3, and a learning rate multiplied by a tuned multiplier at fixed intervals.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from trainables.allocator import keep_freed_memory
from trainables.errors import SpecError
from trainables.losses import build_loss, loss_hyperparameter
from trainables.metrics import memorization, nc1
from trainables.models import build_model, is_convolutional
from trainables.noise import apply_label_noise

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "trainer.pt"
DEFAULT_ALPHA = 0.1
EVAL_BATCH_SIZE = 2048


@dataclass(frozen=True)
class TrainingSetup:
    """Fixed settings of one training run; the tuned hyperparameters come separately.

    ``epochs`` is how long this run trains. ``schedule_epochs`` is the budget on which the
    learning-rate schedule is defined: the rate is multiplied by the tuned
    ``lr_multiplier`` every ``lr_decay_every`` epochs (default ``schedule_epochs // 5``),
    whatever epoch a Hyperband trial happens to stop at.
    """

    dataset: str
    model: str
    loss: str
    num_classes: int
    input_shape: tuple[int, int, int]
    epochs: int
    schedule_epochs: int | None = None
    batch_size: int = 512
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-3
    lr_decay_every: int | None = None
    model_options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"

    @property
    def decay_interval(self) -> int:
        """Epochs between two multiplications of the learning rate."""
        if self.lr_decay_every is not None:
            return self.lr_decay_every
        budget = self.schedule_epochs if self.schedule_epochs is not None else self.epochs
        return max(1, budget // 5)


@dataclass(frozen=True)
class DataBundle:
    """In-memory data of one training run: uint8 images [N, C, H, W] and int64 labels.

    ``eval_*`` is the validation split for tuning trials and the test set for retrains.
    ``mean`` and ``std`` are per-channel statistics in [0, 1] units used to normalise each
    batch on the device. Arrays are numpy so that Ray's object store hands them to workers
    without copying.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class EpochResult:
    """Metrics of one epoch, as reported to Ray Tune and logged to MLflow."""

    epoch: int
    train_loss: float
    train_accuracy: float
    eval_loss: float
    eval_accuracy: float
    learning_rate: float
    epoch_seconds: float
    samples_per_second: float
    diverged: bool


def resolve_device(name: str = "auto") -> torch.device:
    """Return the device for ``name``: ``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_hyperparameters(loss: str, config: Mapping[str, Any]) -> tuple[float, float, float | None]:
    """Return (learning rate, learning-rate multiplier, loss alpha) from a trial config.

    Raises SpecError when the learning rate is missing or not positive.
    """
    if "learning_rate" not in config:
        raise SpecError(
            f"hyperparameter 'learning_rate' is missing from {sorted(config)}; "
            "add it to the search space or the retrain config"
        )
    learning_rate = float(config["learning_rate"])
    if not learning_rate > 0:
        raise SpecError(f"learning_rate must be positive, got {learning_rate}")
    multiplier = float(config.get("lr_multiplier", 1.0))
    alpha_key = loss_hyperparameter(loss)
    alpha = float(config.get(alpha_key, DEFAULT_ALPHA)) if alpha_key else None
    return learning_rate, multiplier, alpha


def epoch_permutation(seed: int, epoch: int, size: int) -> torch.Tensor:
    """Return the sample order of one epoch, a pure function of (seed, epoch, size).

    Deriving the order from the epoch number, not from a running generator, makes a
    resumed run see exactly the batches an uninterrupted run would have seen.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randperm(size, generator=generator)


def batch_indices(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Cut an epoch's sample order into batches; a last batch of one sample joins the previous.

    Batch normalisation cannot train on a single sample, so such a remainder is merged.
    """
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Wrap a numpy array as a tensor on ``device`` without copying on the CPU."""
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only; training never writes to them.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.to(device) if device.type != "cpu" else tensor


def fits_on_device(arrays: list[np.ndarray], device: torch.device) -> bool:
    """Tell whether the arrays take less than half of the device's free memory."""
    if device.type != "cuda":
        return True
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return sum(array.nbytes for array in arrays) < free_bytes // 2


class Trainer:
    """One model, its optimizer and learning-rate schedule, trained epoch by epoch.

    ``state_dict`` contains everything needed to continue exactly: model, optimizer, scheduler,
    the number of epochs done and the RNG state. The batch order of each epoch depends only
    on (seed, epoch), so an interrupted and resumed run gets the same batches.
    """

    def __init__(self, setup: TrainingSetup, hyperparameters: Mapping[str, Any]):
        self.setup = setup
        self.device = resolve_device(setup.device)
        learning_rate, multiplier, alpha = read_hyperparameters(setup.loss, hyperparameters)

        # Model, loss and optimizer, seeded so that every run of a setup starts alike.
        torch.manual_seed(setup.seed)
        self.model = build_model(
            setup.model, setup.num_classes, setup.input_shape, **dict(setup.model_options)
        ).to(self.device)
        self.channels_last = self.device.type == "cuda" and is_convolutional(setup.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = build_loss(setup.loss, setup.num_classes, alpha)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=learning_rate,
            momentum=setup.momentum,
            nesterov=setup.nesterov,
            weight_decay=setup.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=setup.decay_interval, gamma=multiplier
        )
        self.epoch = 0
        self.autocast = self.device.type == "cuda"
        self._normalisation: tuple[torch.Tensor, torch.Tensor] | None = None

    # Batches ------------------------------------------------------------------------

    def set_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Set the per-channel mean and std (in [0, 1] units) applied to every batch."""
        shape = (1, len(mean), 1, 1)
        self._normalisation = (
            torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape),
            torch.tensor(std, dtype=torch.float32, device=self.device).view(shape),
        )

    def _prepare_batch(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.to(self.device, non_blocking=True).float().div_(255.0)
        if self._normalisation is not None:
            mean, std = self._normalisation
            batch = batch.sub_(mean).div_(std)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _forward(self, batch: torch.Tensor, return_features: bool = False):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(batch, return_features=return_features)

    # Epochs ---------------------------------------------------------------------------

    def train_epoch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, bool]:
        """Train one epoch and return (mean loss, accuracy, diverged).

        The epoch stops at the first batch whose loss is NaN or infinite, and the run is
        then reported as diverged instead of raising.
        """
        self.model.train()
        order = epoch_permutation(self.setup.seed, self.epoch, len(labels))
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        diverged = False
        for index in batch_indices(order, self.setup.batch_size):
            if images.device.type != "cpu":
                index = index.to(images.device)
            batch = self._prepare_batch(images.index_select(0, index))
            targets = labels.index_select(0, index).to(self.device, non_blocking=True)

            logits = self._forward(batch).float()
            loss = self.criterion(logits, targets)
            if not torch.isfinite(loss):
                diverged = True
                break
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

            total_loss += loss.detach().double() * len(index)
            correct += (logits.detach().argmax(dim=1) == targets).sum()
            seen += len(index)

        self.scheduler.step()
        self.epoch += 1
        if diverged:
            return math.nan, math.nan, True
        return (total_loss / seen).item(), correct.item() / seen, False

    @torch.no_grad()
    def evaluate(
        self, images: torch.Tensor, labels: torch.Tensor, return_features: bool = False
    ) -> tuple[float, float, torch.Tensor | None]:
        """Return (mean loss, accuracy, features or None) on a labelled set, in eval mode."""
        self.model.eval()
        total_loss = 0.0
        correct = 0
        features = []
        for start in range(0, len(labels), EVAL_BATCH_SIZE):
            batch = self._prepare_batch(images[start : start + EVAL_BATCH_SIZE])
            targets = labels[start : start + EVAL_BATCH_SIZE].to(self.device)
            if return_features:
                logits, batch_features = self._forward(batch, return_features=True)
                features.append(batch_features.float().cpu())
            else:
                logits = self._forward(batch)
            logits = logits.float()
            total_loss += self.criterion(logits, targets).item() * len(targets)
            correct += (logits.argmax(dim=1) == targets).sum().item()
        count = max(1, len(labels))
        stacked = torch.cat(features) if return_features else None
        return total_loss / count, correct / count, stacked

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # State ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return everything needed to continue training exactly where it stopped."""
        state = {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by ``state_dict``."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save(self, directory: str | os.PathLike, extra: Any = None) -> None:
        """Write the state, and ``extra`` data beside it, into ``directory`` atomically.

        One file contains both, so a process killed while saving leaves the previous
        checkpoint whole and never a state and an ``extra`` from different epochs.
        """
        path = os.path.join(directory, CHECKPOINT_FILE)
        partial = path + ".partial"
        torch.save({**self.state_dict(), "extra": extra}, partial)
        os.replace(partial, path)

    def load(self, directory: str | os.PathLike) -> Any:
        """Restore the state that ``save`` wrote into ``directory`` and return its ``extra``."""
        path = os.path.join(directory, CHECKPOINT_FILE)
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.load_state_dict(state)
        return state.get("extra")


def run_epoch(
    trainer: Trainer,
    train: tuple[torch.Tensor, torch.Tensor],
    evaluation: tuple[torch.Tensor, torch.Tensor],
) -> EpochResult:
    """Train one epoch, evaluate, and return the epoch's metrics (epochs count from 1)."""
    learning_rate = trainer.learning_rate
    started = time.perf_counter()
    train_loss, train_accuracy, diverged = trainer.train_epoch(*train)
    train_seconds = time.perf_counter() - started
    eval_loss, eval_accuracy, _ = trainer.evaluate(*evaluation)
    return EpochResult(
        epoch=trainer.epoch,
        train_loss=train_loss,
        train_accuracy=train_accuracy,
        eval_loss=eval_loss,
        eval_accuracy=eval_accuracy,
        learning_rate=learning_rate,
        epoch_seconds=time.perf_counter() - started,
        samples_per_second=len(train[1]) / train_seconds if train_seconds > 0 else 0.0,
        diverged=diverged,
    )


def place_data(trainer: Trainer, data: DataBundle, train_labels: np.ndarray | None = None):
    """Return ((train images, labels), (eval images, labels)) as tensors for ``trainer``.

    The images go to the GPU once when they fit there; otherwise batches are copied from
    host memory as they are drawn.
    """
    labels = data.train_labels if train_labels is None else train_labels
    arrays = [data.train_images, data.eval_images]
    device = trainer.device if fits_on_device(arrays, trainer.device) else torch.device("cpu")
    trainer.set_normalisation(data.mean, data.std)
    train = (as_tensor(data.train_images, device), as_tensor(labels, device))
    evaluation = (as_tensor(data.eval_images, device), as_tensor(data.eval_labels, device))
    return train, evaluation


def tuning_metrics(result: EpochResult) -> dict[str, Any]:
    """Return the per-epoch report of a tuning trial; ``val_*`` is the validation split."""
    return {
        "epoch": result.epoch,
        "train_loss": result.train_loss,
        "train_accuracy": result.train_accuracy,
        "val_loss": result.eval_loss,
        "val_accuracy": result.eval_accuracy,
        "learning_rate": result.learning_rate,
        "epoch_seconds": result.epoch_seconds,
        "samples_per_second": result.samples_per_second,
        "diverged": result.diverged,
    }


def tune_trial(config: dict[str, Any], setup: TrainingSetup, data: DataBundle) -> None:
    """Train one Ray Tune trial, reporting and checkpointing exactly once per epoch.

    Use it as ``tune.with_parameters(tune_trial, setup=setup, data=bundle)``, so that the
    data travel through Ray's object store. A trial restored from a checkpoint continues
    at the next epoch with the same weights, optimizer state and batch order. A trial whose
    loss diverges reports that epoch with ``diverged=True`` and stops. The trial's worker
    process keeps freed host memory for reuse (see ``trainables.allocator``).
    """
    from ray import tune

    keep_freed_memory()
    trainer = Trainer(setup, config)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)
        logger.info("trial resumed at epoch %d", trainer.epoch)
    train, evaluation = place_data(trainer, data)

    while trainer.epoch < setup.epochs:
        result = run_epoch(trainer, train, evaluation)
        with tempfile.TemporaryDirectory() as directory:
            trainer.save(directory)
            tune.report(tuning_metrics(result), checkpoint=tune.Checkpoint.from_directory(directory))
        if result.diverged:
            logger.warning("trial diverged at epoch %d; stopping it", result.epoch)
            return


def retrain(
    setup: TrainingSetup,
    hyperparameters: Mapping[str, Any],
    data: DataBundle,
    *,
    eta: float,
    seed: int,
    noise_seed: int,
    noise_kind: str = "uniform",
    checkpoint_dir: str | os.PathLike | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
) -> dict[str, Any]:
    """Train a winner on the whole training set under label noise and evaluate it.

    The noisy labels depend only on (clean labels, eta, number of classes, ``noise_seed``),
    so every loss and model of a study trains on the same corrupted set; ``seed`` sets the
    initialisation and batch order. With ``checkpoint_dir`` the run saves after every epoch
    and continues from there when called again. Returns plain data: test accuracy and loss,
    the per-epoch history (``eval_*`` is the test set), the noise record, and the
    neural-collapse quantities NC1 on train (noisy labels) and test features, dilation
    (sqrt of test NC1) and memorization.
    """
    run_setup = replace(setup, seed=seed)
    noisy_labels, noise = apply_label_noise(
        data.train_labels, eta, data.num_classes, noise_seed, kind=noise_kind
    )
    trainer = Trainer(run_setup, hyperparameters)
    history: list[dict[str, Any]] = []
    if checkpoint_dir is not None and os.path.exists(os.path.join(checkpoint_dir, CHECKPOINT_FILE)):
        history = trainer.load(checkpoint_dir) or []
        logger.info("retrain resumed at epoch %d from %s", trainer.epoch, checkpoint_dir)
    train, test = place_data(trainer, data, train_labels=noisy_labels)

    # Train for the full epoch count, saving after every epoch when asked to.
    diverged = any(entry["diverged"] for entry in history)
    started = time.perf_counter()
    while trainer.epoch < run_setup.epochs and not diverged:
        result = run_epoch(trainer, train, test)
        history.append(result.__dict__.copy())
        diverged = result.diverged
        if checkpoint_dir is not None:
            os.makedirs(checkpoint_dir, exist_ok=True)
            trainer.save(checkpoint_dir, extra=history)
        if on_epoch is not None:
            on_epoch(result)

    # Evaluate on the test set and measure collapse on train and test features.
    test_loss, test_accuracy, test_features = trainer.evaluate(*test, return_features=True)
    train_images = train[0]
    _, _, train_features = trainer.evaluate(train_images, train[1], return_features=True)
    clean_labels = torch.from_numpy(np.ascontiguousarray(data.train_labels))
    noisy = torch.from_numpy(np.ascontiguousarray(noisy_labels))
    test_labels = test[1].cpu()
    nc1_test = _finite_or_nan(lambda: nc1(test_features, test_labels, data.num_classes))
    return {
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "epochs": trainer.epoch,
        "diverged": diverged,
        "seconds": time.perf_counter() - started,
        "history": history,
        "noise": noise.as_dict(),
        "nc1_train": _finite_or_nan(lambda: nc1(train_features, noisy, data.num_classes)),
        "nc1_test": nc1_test,
        "dilation": math.sqrt(nc1_test) if nc1_test >= 0 else math.nan,
        "memorization": _finite_or_nan(
            lambda: memorization(train_features, noisy, clean_labels, data.num_classes)
        ),
    }


def _finite_or_nan(compute: Callable[[], float]) -> float:
    """Return ``compute()`` as a float, or NaN when the features are not finite."""
    try:
        value = float(compute())
    except (RuntimeError, ValueError) as err:
        # A diverged model yields NaN features, on which the pseudo-inverse can fail.
        logger.warning("neural-collapse metric failed (%s); recording NaN", err)
        return math.nan
    return value


__all__ = [
    "DataBundle",
    "EpochResult",
    "Trainer",
    "TrainingSetup",
    "epoch_permutation",
    "resolve_device",
    "retrain",
    "run_epoch",
    "tune_trial",
]
