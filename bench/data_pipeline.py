"""Data-pipeline benchmark: our in-memory tensor pipeline against a per-sample torchvision one.

Measured in one process on real Fashion-MNIST:

1. One training epoch fed by our pipeline against the same epoch fed by the per-sample
   pipeline of the authors' code. Ours prepares uint8 tensors once at the model's input
   shape, cuts batches by indexing and normalises each batch. Theirs runs PIL
   Grayscale(3), Resize(32), ToTensor and Normalize per image, through a DataLoader with 2
   worker processes. Same model, same input shape
   (3 x 32 x 32), same batch size, same optimizer.
2. The epoch time of the Ray Tune trial function (reporting and checkpointing included)
   against a plain PyTorch loop over the same tensors and model.

Run: ``python -m bench.data_pipeline [--resnet-images N] [--repeats K]``. Prints a Markdown
table of seconds per epoch and the ratios. ResNet18 epochs on a CPU take minutes, so they
run over the first ``--resnet-images`` training images, the same for both pipelines.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from trainables.data import prepare_dataset
from trainables.models import build_model
from trainables.train import DataBundle, Trainer, TrainingSetup, place_data

SHAPE = (3, 32, 32)
MLP_OPTIONS = {"depth": 3, "width": 512}
HYPERPARAMETERS = {"learning_rate": 0.05, "lr_multiplier": 0.1}
BATCH_SIZE = 512


def load_arrays(root: str) -> tuple[DataBundle, np.ndarray, np.ndarray]:
    """Return our prepared bundle and the raw 28x28 uint8 images and labels for torchvision."""
    prepared = prepare_dataset("fashion_mnist", root, SHAPE)
    native = prepare_dataset("fashion_mnist", root, (1, 28, 28))
    bundle = DataBundle(
        prepared.train_images.numpy(), prepared.train_labels.numpy(),
        prepared.test_images.numpy()[:1000], prepared.test_labels.numpy()[:1000],
        prepared.num_classes, prepared.mean, prepared.std,
    )
    return bundle, native.train_images.numpy()[:, 0], native.train_labels.numpy()


def torchvision_epoch(model_name: str, images: np.ndarray, labels: np.ndarray, options: dict) -> float:
    """Time one epoch fed by the per-sample PIL pipeline through a DataLoader."""
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Grayscale(3), transforms.Resize(32), transforms.ToTensor(),
        transforms.Normalize((0.2860,) * 3, (0.3530,) * 3),
    ])

    class PerSampleDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, index):
            return transform(Image.fromarray(images[index], mode="L")), int(labels[index])

    loader = torch.utils.data.DataLoader(PerSampleDataset(), batch_size=BATCH_SIZE, shuffle=True, num_workers=2)
    torch.manual_seed(0)
    model = build_model(model_name, 10, SHAPE, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    model.train()
    started = time.perf_counter()
    for batch, targets in loader:
        loss = torch.nn.functional.cross_entropy(model(batch), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def tensor_epoch(model_name: str, bundle: DataBundle, options: dict) -> float:
    """Time one epoch of our pipeline through ``Trainer.train_epoch``."""
    setup = TrainingSetup("fashion_mnist", model_name, "ce", 10, SHAPE, epochs=1,
                          batch_size=BATCH_SIZE, model_options=options)
    trainer = Trainer(setup, HYPERPARAMETERS)
    train, _ = place_data(trainer, bundle)
    started = time.perf_counter()
    trainer.train_epoch(*train)
    return time.perf_counter() - started


def plain_loop_epoch(bundle: DataBundle, options: dict) -> float:
    """Time one epoch plus a validation pass of a plain PyTorch loop over the same tensors."""
    torch.manual_seed(0)
    images = torch.from_numpy(bundle.train_images)
    labels = torch.from_numpy(bundle.train_labels)
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    model = build_model("mlp", 10, SHAPE, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    started = time.perf_counter()
    model.train()
    order = torch.randperm(len(labels))
    for start in range(0, len(order), BATCH_SIZE):
        index = order[start : start + BATCH_SIZE]
        batch = (images[index].float() / 255 - mean) / std
        loss = torch.nn.functional.cross_entropy(model(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        evaluation = (torch.from_numpy(bundle.eval_images).float() / 255 - mean) / std
        model(evaluation).argmax(1)
    return time.perf_counter() - started


def trial_function_epochs(bundle: DataBundle, options: dict, epochs: int) -> list[float]:
    """Return the seconds per epoch of ``tune_trial`` run by Ray Tune as one trial.

    Ray's ``time_this_iter_s`` spans one report to the next: the epoch, the validation
    pass, the checkpoint written and handed to Ray Tune, and the report itself.
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    from trainables.train import tune_trial

    setup = TrainingSetup("fashion_mnist", "mlp", "ce", 10, SHAPE, epochs=epochs,
                          batch_size=BATCH_SIZE, model_options=options)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            trainable = tune.with_resources(
                tune.with_parameters(tune_trial, setup=setup, data=bundle), {"cpu": os.cpu_count()}
            )
            tuner = tune.Tuner(
                trainable, param_space=dict(HYPERPARAMETERS),
                run_config=tune.RunConfig(storage_path=storage, verbose=0),
            )
            result = tuner.fit()[0]
            return [float(value) for value in result.metrics_dataframe["time_this_iter_s"]]
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.expanduser("~/.cache/hpo/data"), help="data root")
    parser.add_argument("--resnet-images", type=int, default=1024, help="training images per ResNet18 epoch")
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per configuration (median)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    bundle, raw_images, raw_labels = load_arrays(args.root)
    subset = DataBundle(bundle.train_images[: args.resnet_images], bundle.train_labels[: args.resnet_images],
                        bundle.eval_images, bundle.eval_labels, 10, bundle.mean, bundle.std)

    # Each repeat times our epoch and theirs back to back, so that a change in machine
    # load hits both alike. The medians over repeats are compared.
    rows = []
    cases = [
        ("MLP 3x512, 60000 images", "mlp", MLP_OPTIONS, bundle, raw_images, raw_labels),
        (f"ResNet18, {args.resnet_images} images", "resnet18", {}, subset,
         raw_images[: args.resnet_images], raw_labels[: args.resnet_images]),
    ]
    for label, model_name, options, data, images, labels in cases:
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(tensor_epoch(model_name, data, options))
            theirs.append(torchvision_epoch(model_name, images, labels, options))
        rows.append((label, statistics.median(ours), statistics.median(theirs)))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print("| model, epoch | tensor pipeline (s) | per-sample torchvision (s) | speed-up |")
    print("|---|---|---|---|")
    for label, ours, theirs in rows:
        print(f"| {label} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x |")

    # Alternate the two so that a change in machine load hits both alike. The first epoch
    # of each round warms up allocators and is left out.
    plain = []
    trial = []
    for _ in range(args.repeats):
        plain.extend([plain_loop_epoch(bundle, MLP_OPTIONS) for _ in range(3)][1:])
        trial.extend(trial_function_epochs(bundle, MLP_OPTIONS, 3)[1:])
    plain_median = statistics.median(plain)
    trial_median = statistics.median(trial)
    print()
    print("| MLP 3x512 epoch incl. validation | seconds | throughput vs plain loop |")
    print("|---|---|---|")
    print(f"| plain PyTorch loop | {plain_median:.2f} | 1.00 |")
    print(f"| trial function (checkpoint + report) | {trial_median:.2f} | {plain_median / trial_median:.2f} |")


if __name__ == "__main__":
    main()
