"""Data-pipeline benchmark: our in-memory tensor pipeline against a per-sample torchvision one.

Measured in one run on real Fashion-MNIST:

1. One training epoch fed by our pipeline against the same epoch fed by the per-sample
   pipeline of the authors' code. Ours prepares uint8 tensors once at the model's input
   shape, cuts batches by indexing and normalises each batch. Theirs runs PIL
   Grayscale(3), Resize(32), ToTensor and Normalize per image, through a DataLoader with 2
   worker processes. Same model, same input shape (3 x 32 x 32), same batch size, same
   optimizer. On a CPU the model's own compute is part of both epochs, so the speed-up
   shrinks as the model grows. The default MLP sizes are the demo study's 3x256 and the
   3x512 of the trial-function comparison.
2. The epoch time of the Ray Tune trial function (reporting and checkpointing included)
   against a plain PyTorch loop over the same tensors and model. The plain loop runs
   twice: with glibc's default allocator settings, and in a child process with the
   settings that trial workers apply (``trainables.allocator``), so that the ratio
   against the second isolates what the trial function adds.

Run: ``python -m bench.data_pipeline [--mlp DEPTHxWIDTH ...] [--resnet-images N]
[--repeats K] [--only pipeline|trial]``. Prints Markdown tables of seconds per epoch and
the ratios. ResNet18 epochs on a CPU take minutes, so they run over the first
``--resnet-images`` training images, the same for both pipelines.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import multiprocessing
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from trainables.allocator import keep_freed_memory
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


def plain_loop_epochs_kept_memory(root: str, epochs: int) -> list[float]:
    """Time plain-loop epochs in a process whose allocator keeps freed memory, as trial workers do.

    The setting cannot be undone, so it runs in a child process of its own.
    """
    bundle, _, _ = load_arrays(root)
    keep_freed_memory()
    return [plain_loop_epoch(bundle, MLP_OPTIONS) for _ in range(epochs)]


def compare_pipelines(args: argparse.Namespace, bundle: DataBundle, raw_images: np.ndarray,
                      raw_labels: np.ndarray) -> None:
    cases = []
    for depth, width in args.mlp:
        options = {"depth": depth, "width": width}
        cases.append((f"MLP {depth}x{width}, 60000 images", "mlp", options, bundle, raw_images, raw_labels))
    if args.resnet_images > 0:
        count = args.resnet_images
        subset = DataBundle(bundle.train_images[:count], bundle.train_labels[:count],
                            bundle.eval_images, bundle.eval_labels, 10, bundle.mean, bundle.std)
        cases.append((f"ResNet18, {count} images", "resnet18", {}, subset, raw_images[:count], raw_labels[:count]))

    # Each repeat times our epoch and theirs back to back, so that a change in machine
    # load hits both alike. The medians over repeats are compared.
    rows = []
    for label, model_name, options, data, images, labels in cases:
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(tensor_epoch(model_name, data, options))
            theirs.append(torchvision_epoch(model_name, images, labels, options))
        rows.append((label, statistics.median(ours), statistics.median(theirs)))

    print("| model, epoch | tensor pipeline (s) | per-sample torchvision (s) | speed-up |")
    print("|---|---|---|---|")
    for label, ours, theirs in rows:
        print(f"| {label} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x |")
    print()


def compare_trial_function(args: argparse.Namespace, bundle: DataBundle) -> None:
    # Rounds alternate the default-allocator loop, the kept-memory loop and the trial, so
    # that a change in machine load hits all three alike. The first epoch of each round
    # warms up allocators and is left out. This process keeps
    # glibc's default allocator settings for the plain loop as users write it, and a
    # child process times the same loop with the settings that trial workers apply.
    plain, plain_kept, trial = [], [], []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as child:
        for _ in range(args.repeats):
            plain.extend([plain_loop_epoch(bundle, MLP_OPTIONS) for _ in range(3)][1:])
            plain_kept.extend(child.submit(plain_loop_epochs_kept_memory, args.root, 3).result()[1:])
            trial.extend(trial_function_epochs(bundle, MLP_OPTIONS, 3)[1:])
    plain_median = statistics.median(plain)
    kept_median = statistics.median(plain_kept)
    trial_median = statistics.median(trial)

    print("| MLP 3x512 epoch incl. validation | seconds | plain loop / trial function |")
    print("|---|---|---|")
    print(f"| plain PyTorch loop, default allocator | {plain_median:.2f} | {plain_median / trial_median:.2f} |")
    print(f"| plain PyTorch loop, freed memory kept | {kept_median:.2f} | {kept_median / trial_median:.2f} |")
    print(f"| trial function (checkpoint + report) | {trial_median:.2f} | 1.00 |")


def mlp_size(text: str) -> tuple[int, int]:
    """Parse ``DEPTHxWIDTH`` (for example ``3x256``) into (depth, width)."""
    depth, separator, width = text.partition("x")
    if not (separator and depth.isdigit() and width.isdigit() and int(depth) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"invalid MLP size {text!r}: expected DEPTHxWIDTH, for example 3x256")
    return int(depth), int(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.expanduser("~/.cache/hpo/data"), help="data root")
    parser.add_argument("--mlp", type=mlp_size, action="append",
                        help="MLP size DEPTHxWIDTH for the pipeline comparison, repeatable (default: 3x256 and 3x512)")
    parser.add_argument("--resnet-images", type=int, default=1024,
                        help="training images per ResNet18 epoch; 0 leaves ResNet18 out")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds per comparison; the tables show the median epoch time")
    parser.add_argument("--only", choices=("pipeline", "trial"),
                        help="run only the pipeline comparison or only the trial-function one")
    args = parser.parse_args()
    args.mlp = args.mlp or [(3, 256), (3, 512)]
    logging.basicConfig(level=logging.WARNING)

    bundle, raw_images, raw_labels = load_arrays(args.root)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.only != "trial":
        compare_pipelines(args, bundle, raw_images, raw_labels)
    if args.only != "pipeline":
        compare_trial_function(args, bundle)


if __name__ == "__main__":
    main()
