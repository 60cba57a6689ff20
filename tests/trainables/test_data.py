"""Tests of dataset loading, the preprocessing cache, splits and subsets.

Fashion-MNIST is read from the Debian package ``dataset-fashion-mnist``. MNIST, CIFAR-10
and SVHN are not installed here, so small files in their real formats are written to a
temporary data root in torchvision's layout. Only the download itself is replaced by a
stand-in, because the network cannot be reached here.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import inspect
import logging
import math
import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision

from trainables import data as data_module
from trainables.data import (
    DATASETS,
    check_dataset_available,
    find_dataset_files,
    input_shape,
    prepare_dataset,
    stratified_split,
    stratified_subset,
)
from trainables.errors import DataError, SpecError
from trainables.noise import apply_label_noise

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
KNOWN_NAMES = ("mnist", "fashion_mnist", "cifar10", "svhn", "synthetic")


# --- writers of small files in the real formats ------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    content = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as stream:
            stream.write(content)
    else:
        path.write_bytes(content)


@dataclasses.dataclass
class Arrays:
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def random_arrays(seed: int, channels: int, size: int, train: int, test: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return Arrays(
        train_images=rng.integers(0, 256, (train, channels, size, size), dtype=np.uint8),
        train_labels=rng.integers(0, 10, train).astype(np.int64),
        test_images=rng.integers(0, 256, (test, channels, size, size), dtype=np.uint8),
        test_labels=rng.integers(0, 10, test).astype(np.int64),
    )


def write_mnist_files(directory: Path, arrays: Arrays, suffix: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / f"train-images-idx3-ubyte{suffix}", arrays.train_images[:, 0])
    write_idx(directory / f"train-labels-idx1-ubyte{suffix}", arrays.train_labels)
    write_idx(directory / f"t10k-images-idx3-ubyte{suffix}", arrays.test_images[:, 0])
    write_idx(directory / f"t10k-labels-idx1-ubyte{suffix}", arrays.test_labels)


def write_cifar10_files(directory: Path, arrays: Arrays) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    batches = np.array_split(np.arange(arrays.train_labels.size), 5)
    for number, indices in enumerate(batches, start=1):
        batch = {
            "data": arrays.train_images[indices].reshape(len(indices), -1),
            "labels": arrays.train_labels[indices].tolist(),
        }
        (directory / f"data_batch_{number}").write_bytes(pickle.dumps(batch))
    test = {
        "data": arrays.test_images.reshape(arrays.test_labels.size, -1),
        "labels": arrays.test_labels.tolist(),
    }
    (directory / "test_batch").write_bytes(pickle.dumps(test))


def write_svhn_files(directory: Path, arrays: Arrays) -> None:
    # SVHN stores images as [H, W, C, N] and labels the digit 0 as 10.
    directory.mkdir(parents=True, exist_ok=True)
    for split, images, labels in (
        ("train", arrays.train_images, arrays.train_labels),
        ("test", arrays.test_images, arrays.test_labels),
    ):
        stored_labels = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)
        scipy.io.savemat(
            directory / f"{split}_32x32.mat",
            {"X": images.transpose(2, 3, 1, 0), "y": stored_labels},
        )


def assert_matches(prepared, arrays: Arrays) -> None:
    assert torch.equal(prepared.train_images, torch.from_numpy(arrays.train_images))
    assert torch.equal(prepared.train_labels, torch.from_numpy(arrays.train_labels))
    assert torch.equal(prepared.test_images, torch.from_numpy(arrays.test_images))
    assert torch.equal(prepared.test_labels, torch.from_numpy(arrays.test_labels))


def cache_files(root: Path) -> list[Path]:
    return sorted((root / ".cache").glob("*.pt"))


def read_idx_independently(path: Path, header_size: int) -> np.ndarray:
    with gzip.open(path, "rb") as stream:
        return np.frombuffer(stream.read(), dtype=np.uint8, offset=header_size)


# --- real Fashion-MNIST ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fashion-root")


@pytest.fixture(scope="module")
def fashion_native(fashion_root):
    return prepare_dataset("fashion_mnist", fashion_root, (1, 28, 28))


@pytest.fixture(scope="module")
def fashion_convolutional(fashion_root):
    return prepare_dataset("fashion_mnist", fashion_root, (3, 32, 32))


def test_fashion_mnist_sizes_and_classes(fashion_native):
    assert fashion_native.name == "fashion_mnist"
    assert fashion_native.num_classes == 10
    assert fashion_native.train_labels.shape == (60000,)
    assert fashion_native.test_labels.shape == (10000,)
    assert fashion_native.train_labels.dtype == torch.int64
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    assert torch.bincount(fashion_native.train_labels).tolist() == [6000] * 10
    assert torch.bincount(fashion_native.test_labels).tolist() == [1000] * 10


def test_fashion_native_shape_equals_files(fashion_native):
    assert fashion_native.train_images.shape == (60000, 1, 28, 28)
    assert fashion_native.test_images.shape == (10000, 1, 28, 28)
    assert fashion_native.train_images.dtype == torch.uint8
    assert fashion_native.image_shape == (1, 28, 28)

    # Idx headers: 16 bytes for images, 8 for labels.
    images = read_idx_independently(FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz", 16)
    labels = read_idx_independently(FASHION_SYSTEM_DIR / "train-labels-idx1-ubyte.gz", 8)
    assert np.array_equal(fashion_native.train_images.numpy().reshape(-1), images)
    assert np.array_equal(fashion_native.train_labels.numpy(), labels)


def test_fashion_convolutional_shape(fashion_convolutional, fashion_native):
    images = fashion_convolutional.train_images
    assert images.shape == (60000, 3, 32, 32)
    assert fashion_convolutional.test_images.shape == (10000, 3, 32, 32)
    assert images.dtype == torch.uint8
    assert images.is_contiguous()
    assert torch.equal(images[:, 0], images[:, 1])
    assert torch.equal(images[:, 0], images[:, 2])
    assert torch.equal(fashion_convolutional.train_labels, fashion_native.train_labels)

    # Resizing keeps the mean brightness.
    assert fashion_convolutional.mean[0] == pytest.approx(fashion_native.mean[0], abs=0.01)


def test_mean_std_match_pixel_histogram(fashion_convolutional):
    pixels = fashion_convolutional.train_images[:, 0].reshape(-1)
    counts = torch.bincount(pixels, minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum().double()
    mean = (counts.double() * values).sum() / total
    std = ((counts.double() * (values - mean).square()).sum() / total).sqrt()
    assert len(fashion_convolutional.mean) == 3
    assert len(fashion_convolutional.std) == 3
    for channel in range(3):
        assert fashion_convolutional.mean[channel] == pytest.approx(mean.item(), abs=1e-9)
        assert fashion_convolutional.std[channel] == pytest.approx(std.item(), abs=1e-9)


def test_cache_reused_second_time(fashion_root, fashion_native, caplog):
    (cache_path,) = [p for p in cache_files(fashion_root) if "-1x28x28-" in p.name]
    modified = cache_path.stat().st_mtime_ns
    caplog.set_level(logging.DEBUG, logger="trainables.data")

    again = prepare_dataset("fashion_mnist", fashion_root, (1, 28, 28))

    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith(f"reused cache {cache_path}") for m in messages)
    assert not any(m.startswith("built cache") for m in messages)
    assert cache_path.stat().st_mtime_ns == modified
    assert torch.equal(again.train_images, fashion_native.train_images)
    assert again.mean == fashion_native.mean


def test_cache_key_differs_by_shape(fashion_root, fashion_native, fashion_convolutional):
    names = [path.name for path in cache_files(fashion_root)]
    assert len(names) == 2
    assert any(name.startswith("fashion_mnist-1x28x28-") for name in names)
    assert any(name.startswith("fashion_mnist-3x32x32-") for name in names)
    keys = {name.rsplit("-", 1)[1] for name in names}
    assert len(keys) == 2


class _MessageCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _prepare_after_barrier(root: str, barrier, results) -> None:
    # Runs in a spawned process: report whether this process built or reused the cache.
    collector = _MessageCollector()
    logger = logging.getLogger("trainables.data")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(collector)
    barrier.wait(timeout=120)
    prepared = prepare_dataset("fashion_mnist", root, (1, 28, 28))
    built = sum(m.startswith("built cache") for m in collector.messages)
    reused = sum(m.startswith("reused cache") for m in collector.messages)
    digest = hashlib.sha256(prepared.train_images.numpy().tobytes()).hexdigest()
    results.put((built, reused, digest))


def test_concurrent_preparation_builds_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    processes = [
        context.Process(target=_prepare_after_barrier, args=(str(tmp_path), barrier, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    assert sorted((built, reused) for built, reused, _ in outcomes) == [(0, 1), (1, 0)]
    assert outcomes[0][2] == outcomes[1][2]
    (cache_path,) = cache_files(tmp_path)
    assert not list((tmp_path / ".cache").glob("*.tmp"))
    payload = torch.load(cache_path, weights_only=True)
    digest = hashlib.sha256(payload["train_images"].numpy().tobytes()).hexdigest()
    assert digest == outcomes[0][2]


# --- missing data and bad input ------------------------------------------------------------


def test_missing_dataset_names_paths(tmp_path):
    root = tmp_path / "root"
    empty_system_dir = tmp_path / "system"
    empty_system_dir.mkdir()

    assert find_dataset_files("fashion_mnist", root, [empty_system_dir]) is None
    system_dirs = [empty_system_dir]
    for attempt in (
        lambda: prepare_dataset("fashion_mnist", root, (1, 28, 28), system_dirs=system_dirs),
        lambda: check_dataset_available("fashion_mnist", root, False, system_dirs),
    ):
        with pytest.raises(DataError) as caught:
            attempt()
        message = str(caught.value)
        assert "\n" not in message
        assert "fashion_mnist" in message
        assert str(root / "FashionMNIST" / "raw") in message
        assert str(empty_system_dir) in message
        assert "train-images-idx3-ubyte.gz" in message
        assert "apt-get install dataset-fashion-mnist" in message
        assert "data.download: true" in message
    assert not (root / ".cache").exists()


def test_missing_cifar10_message_without_package_hint(tmp_path):
    with pytest.raises(DataError) as caught:
        check_dataset_available("cifar10", tmp_path, False)
    message = str(caught.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "apt-get" not in message


def test_available_from_default_system_dir(tmp_path):
    check_dataset_available("fashion_mnist", tmp_path, False)
    files = find_dataset_files("fashion_mnist", tmp_path)
    assert files["train_images"] == FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz"


def test_available_when_download_allowed(tmp_path):
    check_dataset_available("cifar10", tmp_path / "new" / "root", True)
    assert not (tmp_path / "new").exists()


def test_download_into_unwritable_root_rejected(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="not writable") as caught:
        check_dataset_available("cifar10", blocker / "root", True)
    assert str(blocker / "root") in str(caught.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda root: prepare_dataset("imagenet", root, (3, 32, 32)),
        lambda root: input_shape("imagenet", "mlp"),
        lambda root: find_dataset_files("imagenet", root),
        lambda root: check_dataset_available("imagenet", root, False),
    ],
    ids=["prepare", "input_shape", "find", "check"],
)
def test_unknown_dataset_lists_names(tmp_path, call):
    with pytest.raises(SpecError) as caught:
        call(tmp_path)
    message = str(caught.value)
    assert "'imagenet'" in message
    for name in KNOWN_NAMES:
        assert name in message


@pytest.mark.parametrize(
    ("name", "shape"),
    [("cifar10", (1, 32, 32)), ("fashion_mnist", (2, 28, 28)), ("synthetic", (1, 0, 8)),
     ("synthetic", (1, 8)), ("svhn", "3x32x32"), ("synthetic", "188"),
     ("synthetic", (1, 8.5, 8)), ("synthetic", (True, 8, 8))],
)
def test_invalid_shape_rejected(tmp_path, name, shape):
    with pytest.raises(SpecError, match="invalid image shape"):
        prepare_dataset(name, tmp_path, shape)


# --- input shapes --------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", KNOWN_NAMES)
@pytest.mark.parametrize("model", ["resnet18", "vgg13"])
def test_convolutional_models_take_32x32_rgb(dataset, model):
    assert input_shape(dataset, model) == (3, 32, 32)


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [("mnist", (1, 28, 28)), ("fashion_mnist", (1, 28, 28)), ("cifar10", (3, 32, 32)),
     ("svhn", (3, 32, 32)), ("synthetic", (1, 8, 8))],
)
def test_mlp_takes_native_shape(dataset, expected):
    assert input_shape(dataset, "mlp") == expected
    assert DATASETS[dataset].native_shape == expected


def test_unknown_model_lists_names():
    with pytest.raises(SpecError) as caught:
        input_shape("mnist", "alexnet")
    message = str(caught.value)
    assert "'alexnet'" in message
    for model in ("resnet18", "vgg13", "mlp"):
        assert model in message


def test_registry_complete():
    assert tuple(DATASETS) == KNOWN_NAMES
    assert tuple(data_module.available_datasets()) == KNOWN_NAMES
    for name, info in DATASETS.items():
        assert info.name == name
        assert info.num_classes == 10


# --- file formats, layout and resolution order ---------------------------------------------


def test_layout_matches_torchvision():
    datasets = torchvision.datasets
    assert DATASETS["cifar10"].root_subdir == datasets.CIFAR10.base_folder
    cifar_lists = datasets.CIFAR10.train_list + datasets.CIFAR10.test_list
    cifar_names = {name for name, _ in cifar_lists}
    assert {f.key for f in DATASETS["cifar10"].required_files} == cifar_names
    svhn_names = {datasets.SVHN.split_list[s][1] for s in ("train", "test")}
    assert {f.names[0] for f in DATASETS["svhn"].required_files} == svhn_names
    for name, cls in (("mnist", datasets.MNIST), ("fashion_mnist", datasets.FashionMNIST)):
        assert DATASETS[name].root_subdir == f"{cls.__name__}/raw"
        resource_names = {filename for filename, _ in cls.resources}
        assert {f.names[1] for f in DATASETS[name].required_files} == resource_names


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "svhn"])
def test_download_uses_torchvision_class(name):
    download = DATASETS[name].download
    dataset_class = getattr(torchvision.datasets, download.args[0])
    parameters = inspect.signature(dataset_class).parameters
    assert "download" in parameters
    for split in download.args[1]:
        assert set(split) <= set(parameters)


def test_mnist_files_read_like_torchvision(tmp_path):
    arrays = random_arrays(seed=0, channels=1, size=28, train=120, test=40)
    write_mnist_files(tmp_path / "MNIST" / "raw", arrays)

    prepared = prepare_dataset("mnist", tmp_path, (1, 28, 28))
    reference = torchvision.datasets.MNIST(str(tmp_path), train=True, download=False)

    assert_matches(prepared, arrays)
    assert torch.equal(prepared.train_images[:, 0], reference.data)
    assert torch.equal(prepared.train_labels, reference.targets)


def test_root_layout_preferred_over_system_dir(tmp_path):
    in_root = random_arrays(seed=1, channels=1, size=28, train=60, test=20)
    in_system_dir = random_arrays(seed=2, channels=1, size=28, train=60, test=20)
    write_mnist_files(tmp_path / "root" / "MNIST" / "raw", in_root)
    write_mnist_files(tmp_path / "system", in_system_dir, suffix=".gz")

    system_dirs = [tmp_path / "system"]
    prepared = prepare_dataset("mnist", tmp_path / "root", (1, 28, 28), system_dirs=system_dirs)
    assert_matches(prepared, in_root)

    from_system = prepare_dataset(
        "mnist", tmp_path / "other", (1, 28, 28), system_dirs=system_dirs
    )
    assert_matches(from_system, in_system_dir)


def test_cifar10_batches_read(tmp_path):
    arrays = random_arrays(seed=3, channels=3, size=32, train=100, test=30)
    write_cifar10_files(tmp_path / "cifar-10-batches-py", arrays)
    prepared = prepare_dataset("cifar10", tmp_path, (3, 32, 32))
    assert_matches(prepared, arrays)


def test_svhn_mat_read_with_zero_labels(tmp_path):
    arrays = random_arrays(seed=4, channels=3, size=32, train=100, test=30)
    write_svhn_files(tmp_path, arrays)
    prepared = prepare_dataset("svhn", tmp_path, (3, 32, 32))
    assert_matches(prepared, arrays)
    assert prepared.train_labels.min() == 0
    assert prepared.train_labels.max() == 9


def test_mnist_resized_to_32x32_rgb(tmp_path):
    arrays = random_arrays(seed=5, channels=1, size=28, train=30, test=10)
    arrays.train_images[:] = 200  # a constant image stays constant after resizing
    write_mnist_files(tmp_path / "MNIST" / "raw", arrays)
    prepared = prepare_dataset("mnist", tmp_path, (3, 32, 32))
    assert prepared.train_images.shape == (30, 3, 32, 32)
    assert torch.all(prepared.train_images == 200)
    assert prepared.std == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)
    assert prepared.mean == pytest.approx((200 / 255,) * 3)


@pytest.fixture
def every_dataset(tmp_path, fashion_native):
    # Each dataset's training labels, read through its own loader.
    write_mnist_files(tmp_path / "MNIST" / "raw", random_arrays(6, 1, 28, 2000, 10))
    write_cifar10_files(tmp_path / "cifar-10-batches-py", random_arrays(7, 3, 32, 2000, 10))
    write_svhn_files(tmp_path, random_arrays(8, 3, 32, 2000, 10))
    prepared = {
        name: prepare_dataset(name, tmp_path, input_shape(name, "mlp"))
        for name in ("mnist", "cifar10", "svhn", "synthetic")
    }
    prepared["fashion_mnist"] = fashion_native
    return prepared


def test_noise_reaches_every_dataset(every_dataset):
    assert set(every_dataset) == set(KNOWN_NAMES)
    eta = 0.3
    expected = eta * 9 / 10
    for name, prepared in every_dataset.items():
        labels = prepared.train_labels
        noisy, record = apply_label_noise(labels, eta, prepared.num_classes, seed=0)
        standard_error = math.sqrt(expected * (1 - expected) / labels.numel())
        realised = (noisy != labels).double().mean().item()
        assert abs(realised - expected) < 3 * standard_error, name
        assert record.flip_rate == pytest.approx(realised), name


def test_corrupt_idx_header_rejected(tmp_path):
    directory = tmp_path / "MNIST" / "raw"
    write_mnist_files(directory, random_arrays(9, 1, 28, 10, 5))
    (directory / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DataError, match="invalid idx file") as caught:
        prepare_dataset("mnist", tmp_path, (1, 28, 28))
    assert str(directory / "train-images-idx3-ubyte") in str(caught.value)


def test_truncated_idx_rejected(tmp_path):
    directory = tmp_path / "MNIST" / "raw"
    write_mnist_files(directory, random_arrays(10, 1, 28, 10, 5))
    path = directory / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="declares shape"):
        prepare_dataset("mnist", tmp_path, (1, 28, 28))


def test_truncated_gzip_rejected(tmp_path):
    directory = tmp_path / "MNIST" / "raw"
    write_mnist_files(directory, random_arrays(10, 1, 28, 10, 5), suffix=".gz")
    path = directory / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="cannot read idx file"):
        prepare_dataset("mnist", tmp_path, (1, 28, 28))


def test_label_count_mismatch_rejected(tmp_path):
    arrays = random_arrays(11, 1, 28, 10, 5)
    directory = tmp_path / "MNIST" / "raw"
    write_mnist_files(directory, arrays)
    write_idx(directory / "train-labels-idx1-ubyte", arrays.train_labels[:7])
    with pytest.raises(DataError, match="10 train images but 7 labels"):
        prepare_dataset("mnist", tmp_path, (1, 28, 28))


def test_label_out_of_range_rejected(tmp_path):
    arrays = random_arrays(12, 3, 32, 10, 5)
    arrays.test_labels[0] = 12
    write_cifar10_files(tmp_path / "cifar-10-batches-py", arrays)
    with pytest.raises(DataError, match=r"test labels range from \d+ to 12"):
        prepare_dataset("cifar10", tmp_path, (3, 32, 32))


def test_broken_cifar_pickle_rejected(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10_files(directory, random_arrays(13, 3, 32, 10, 5))
    (directory / "data_batch_3").write_bytes(pickle.dumps({"images": []}))
    with pytest.raises(DataError, match="data_batch_3"):
        prepare_dataset("cifar10", tmp_path, (3, 32, 32))


# --- download (the network is replaced by a stand-in that writes the files) ----------------


def test_download_fetches_missing_files(tmp_path, monkeypatch):
    arrays = random_arrays(14, 1, 28, 50, 10)
    calls = []

    def download_stand_in(root: Path) -> None:
        calls.append(root)
        write_mnist_files(root / "MNIST" / "raw", arrays, suffix=".gz")

    patched = dataclasses.replace(DATASETS["mnist"], download=download_stand_in)
    monkeypatch.setitem(DATASETS, "mnist", patched)
    empty = tmp_path / "empty"
    empty.mkdir()
    root = tmp_path / "root"

    with pytest.raises(DataError, match="data.download: true"):
        prepare_dataset("mnist", root, (1, 28, 28), system_dirs=[empty])
    assert calls == []

    prepared = prepare_dataset("mnist", root, (1, 28, 28), download=True, system_dirs=[empty])
    assert calls == [root]
    assert_matches(prepared, arrays)

    prepare_dataset("mnist", root, (1, 28, 28), download=True, system_dirs=[empty])
    assert calls == [root]


def test_failed_download_names_error(tmp_path, monkeypatch):
    def unreachable(root: Path) -> None:
        raise OSError("network is unreachable")

    patched = dataclasses.replace(DATASETS["svhn"], download=unreachable)
    monkeypatch.setitem(DATASETS, "svhn", patched)
    with pytest.raises(DataError) as caught:
        prepare_dataset("svhn", tmp_path, (3, 32, 32), download=True)
    message = str(caught.value)
    assert "download of dataset svhn" in message
    assert "network is unreachable" in message
    assert str(tmp_path) in message


# --- synthetic dataset and the cache -------------------------------------------------------


def test_synthetic_deterministic(tmp_path):
    first = prepare_dataset("synthetic", tmp_path / "a", (1, 8, 8))
    second = prepare_dataset("synthetic", tmp_path / "b", (1, 8, 8))
    assert first.train_images.shape == (3000, 1, 8, 8)
    assert first.test_images.shape == (1000, 1, 8, 8)
    assert torch.bincount(first.train_labels).tolist() == [300] * 10
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.train_labels, second.train_labels)
    assert torch.equal(first.test_images, second.test_images)
    assert first.mean == second.mean
    assert [p.name for p in cache_files(tmp_path / "a")] == [
        p.name for p in cache_files(tmp_path / "b")
    ]


def test_synthetic_learnable(tmp_path):
    prepared = prepare_dataset("synthetic", tmp_path, (1, 8, 8))
    mean, std = torch.tensor(prepared.mean), torch.tensor(prepared.std)

    def features(images: torch.Tensor) -> torch.Tensor:
        return ((images.float() / 255 - mean) / std).flatten(1)

    train, test = features(prepared.train_images), features(prepared.test_images)
    torch.manual_seed(0)
    model = torch.nn.Linear(train.shape[1], prepared.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(train), prepared.train_labels).backward()
        optimizer.step()

    accuracy = (model(test).argmax(dim=1) == prepared.test_labels).float().mean().item()
    assert accuracy > 0.6


def test_synthetic_at_convolutional_shape(tmp_path):
    native = prepare_dataset("synthetic", tmp_path, (1, 8, 8))
    resized = prepare_dataset("synthetic", tmp_path, input_shape("synthetic", "resnet18"))
    assert resized.train_images.shape == (3000, 3, 32, 32)
    assert resized.train_images.dtype == torch.uint8
    assert torch.equal(resized.train_labels, native.train_labels)
    assert resized.mean[0] == pytest.approx(native.mean[0], abs=0.01)


def test_unreadable_cache_rebuilt(tmp_path, caplog):
    first = prepare_dataset("synthetic", tmp_path, (1, 8, 8))
    (cache_path,) = cache_files(tmp_path)
    cache_path.write_bytes(cache_path.read_bytes()[:1000])
    caplog.set_level(logging.DEBUG, logger="trainables.data")

    second = prepare_dataset("synthetic", tmp_path, (1, 8, 8))

    messages = [record.getMessage() for record in caplog.records]
    assert any("is unreadable" in m and "rebuilding" in m for m in messages)
    assert any(m.startswith("built cache") for m in messages)
    assert torch.equal(first.train_images, second.train_images)
    assert torch.load(cache_path, weights_only=True)["train_images"].shape == (3000, 1, 8, 8)


def test_root_with_tilde_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir("/")
    prepare_dataset("synthetic", "~/data", (1, 8, 8))
    assert len(cache_files(tmp_path / "data")) == 1
    assert data_module.resolve_data_root("~/data") == tmp_path / "data"
    assert data_module.resolve_data_root("relative").is_absolute()


# --- stratified split and subset -----------------------------------------------------------


def imbalanced_labels(seed: int = 0) -> np.ndarray:
    # Class c has 50 + 37 c samples, in random order.
    labels = np.concatenate([np.full(50 + 37 * c, c) for c in range(10)]).astype(np.int64)
    return np.random.default_rng(seed).permutation(labels)


def test_split_stratified():
    labels = imbalanced_labels()
    train_idx, val_idx = stratified_split(labels, 0.2, seed=0)
    for c in range(10):
        in_class = np.count_nonzero(labels == c)
        assert abs(np.count_nonzero(labels[val_idx] == c) - 0.2 * in_class) <= 1
        assert abs(np.count_nonzero(labels[train_idx] == c) - 0.8 * in_class) <= 1


def test_split_disjoint_and_covering():
    labels = imbalanced_labels()
    train_idx, val_idx = stratified_split(labels, 0.2, seed=0)
    assert train_idx.dtype == np.int64
    assert val_idx.dtype == np.int64
    assert np.intersect1d(train_idx, val_idx).size == 0
    covered = np.sort(np.concatenate([train_idx, val_idx]))
    assert np.array_equal(covered, np.arange(labels.size))
    assert np.all(np.diff(train_idx) > 0)
    assert np.all(np.diff(val_idx) > 0)


def test_split_deterministic_per_seed():
    labels = imbalanced_labels()
    first = stratified_split(labels, 0.2, seed=3)
    again = stratified_split(torch.from_numpy(labels), 0.2, seed=3)
    other = stratified_split(labels, 0.2, seed=4)
    assert np.array_equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])
    assert other[1].size == first[1].size


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.0, -0.1, 1.5, True, "0.2", float("nan")])
def test_split_invalid_fraction_rejected(fraction):
    with pytest.raises(SpecError, match="validation_fraction") as caught:
        stratified_split(imbalanced_labels(), fraction, seed=0)
    assert repr(fraction) in str(caught.value)


def test_split_leaving_validation_empty_rejected():
    with pytest.raises(SpecError, match="validation split of 3 samples empty"):
        stratified_split(np.array([0, 1, 2]), 0.2, seed=0)


@pytest.mark.parametrize("seed", [-1, 0.5])
def test_split_invalid_seed_rejected(seed):
    with pytest.raises(SpecError, match="seed"):
        stratified_split(imbalanced_labels(), 0.2, seed=seed)


def test_subset_stratified():
    labels = imbalanced_labels()
    subset = stratified_subset(labels, 500, seed=0)
    assert subset.size == 500
    assert subset.dtype == np.int64
    assert np.unique(subset).size == 500
    assert np.all(np.diff(subset) > 0)
    for c in range(10):
        share = 500 * np.count_nonzero(labels == c) / labels.size
        assert abs(np.count_nonzero(labels[subset] == c) - share) < 1


def test_subset_deterministic_per_seed():
    labels = imbalanced_labels()
    first = stratified_subset(labels, 300, seed=1)
    assert np.array_equal(first, stratified_subset(labels, 300, seed=1))
    assert not np.array_equal(first, stratified_subset(labels, 300, seed=2))


def test_subset_of_everything():
    labels = imbalanced_labels()
    assert np.array_equal(stratified_subset(labels, labels.size, 0), np.arange(labels.size))


@pytest.mark.parametrize("size", [0, -5, 2166, 10.5])
def test_subset_invalid_size_rejected(size):
    labels = imbalanced_labels()  # 2165 samples
    with pytest.raises(SpecError, match="subset size") as caught:
        stratified_subset(labels, size, seed=0)
    assert repr(size) in str(caught.value)
    assert "2165" in str(caught.value)
