"""Datasets, the preprocessing cache, stratified splits and subsets.

A dataset is read from its files once, converted to uint8 tensors [N, C, H, W] at the
input shape of the model, and cached under ``<root>/.cache/``. Trials get these tensors
(through Ray's object store) and never read dataset files themselves. Normalisation
happens later, per batch, on the trial's device, with the per-channel mean and std stored
in ``PreparedData``.

Files are looked for, in this order:

1. the data root in the layout torchvision 0.29 uses: ``<root>/MNIST/raw``,
   ``<root>/FashionMNIST/raw`` (idx files, plain or ``.gz``),
   ``<root>/cifar-10-batches-py`` (pickled batches), ``<root>/{train,test}_32x32.mat``
   (SVHN);
2. system dataset directories with the same file names side by side, by default
   ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``) and
   ``/usr/share/datasets/mnist``;
3. a torchvision download into the root, only when downloads are allowed.

The files are read with numpy, pickle and scipy. torchvision serves only for downloads.

Paper setup (Nguyen et al., ICLR 2023, appendix A): ResNet18 and VGG13 take CIFAR-style
3 x 32 x 32 inputs, so MNIST and Fashion-MNIST images are repeated to 3 channels and
resized to 32 x 32 for them. The MLP takes each dataset at its native shape.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from trainables.errors import DataError, SpecError

__all__ = [
    "CONVOLUTIONAL_INPUT_SHAPE",
    "DATASETS",
    "DatasetInfo",
    "PreparedData",
    "RawData",
    "available_datasets",
    "check_dataset_available",
    "find_dataset_files",
    "input_shape",
    "prepare_dataset",
    "resolve_data_root",
    "stratified_split",
    "stratified_subset",
]

logger = logging.getLogger(__name__)

CONVOLUTIONAL_INPUT_SHAPE: tuple[int, int, int] = (3, 32, 32)
"""Input shape (channels, height, width) of resnet18 and vgg13 on every dataset."""

CACHE_FORMAT_VERSION = 1
"""Part of every cache key. Bump it when the conversion or the cache layout changes."""

_CONVERSION_CHUNK = 4096  # images resized at a time, to bound the float32 buffer

ShapeCHW = tuple[int, int, int]


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawData:
    """A dataset as stored in its files: uint8 images [N, C, H, W] and int64 labels [N]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class RequiredFile:
    """One file a dataset needs: a key for the loader and the file names accepted for it."""

    key: str
    names: tuple[str, ...]


DatasetFiles = dict[str, Path]
"""Resolved files of a dataset: ``RequiredFile.key`` -> path."""


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset the service can train on.

    ``channels``, ``height`` and ``width`` give the native image shape. ``load`` reads
    the files found for ``required_files`` and returns the raw arrays, with the labels read
    the way that dataset stores them. ``root_subdir`` is where torchvision puts the files
    under a data root. ``system_dirs`` are the default system directories, and ``download``
    fetches the files into a data root (None: no download exists). ``install_hint`` names a
    system package that provides the files, if one exists.
    """

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    load: Callable[[DatasetFiles], RawData]
    required_files: tuple[RequiredFile, ...] = ()
    root_subdir: str = ""
    system_dirs: tuple[str, ...] = ()
    download: Callable[[Path], None] | None = None
    install_hint: str | None = None

    @property
    def native_shape(self) -> ShapeCHW:
        """Native image shape (channels, height, width)."""
        return (self.channels, self.height, self.width)


# ---------------------------------------------------------------------------------------
# Readers of the file formats
# ---------------------------------------------------------------------------------------

_IDX_UINT8 = 0x08  # idx type code of unsigned bytes, the only type MNIST files use


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (MNIST format, plain or gzip-compressed) of unsigned bytes."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            buffer = stream.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"cannot read idx file {path} ({err}): replace it with an intact copy"
        ) from err

    # Header: two zero bytes, the type code, the number of dimensions, then each
    # dimension as a big-endian int32.
    if len(buffer) < 4 or buffer[0] != 0 or buffer[1] != 0 or buffer[2] != _IDX_UINT8:
        raise DataError(
            f"invalid idx file {path} (no unsigned-byte idx header): "
            "replace it with an intact copy"
        )
    ndim = buffer[3]
    header_size = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(buffer, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(buffer, dtype=np.uint8, offset=header_size)
    if data.size != int(np.prod(dims)):
        raise DataError(
            f"invalid idx file {path} (header declares shape {dims} but the file "
            f"contains {data.size} data bytes): replace it with an intact copy"
        )
    # Copy out of the read-only bytes so that torch.from_numpy gets a writable array.
    return data.reshape(dims).copy()


def _load_idx_dataset(files: DatasetFiles) -> RawData:
    # MNIST and Fashion-MNIST: images [N, 28, 28], labels [N] in separate idx files.
    return RawData(
        train_images=_read_idx(files["train_images"])[:, None],
        train_labels=_read_idx(files["train_labels"]).astype(np.int64),
        test_images=_read_idx(files["test_images"])[:, None],
        test_labels=_read_idx(files["test_labels"]).astype(np.int64),
    )


def _read_cifar_batches(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        # NOTE: unpickling runs code stored in the file, so only read trusted batches.
        try:
            with open(path, "rb") as stream:
                batch = pickle.load(stream, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        except (
            OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError
        ) as err:
            raise DataError(
                f"cannot read CIFAR-10 batch {path} ({err!r}): replace it with an intact copy"
            ) from err
    return np.concatenate(images), np.concatenate(labels)


_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))


def _load_cifar10(files: DatasetFiles) -> RawData:
    # Pickled dicts with "data" (uint8 [10000, 3072], channel-major) and "labels" (list).
    train_images, train_labels = _read_cifar_batches(
        [files[name] for name in _CIFAR10_TRAIN_BATCHES]
    )
    test_images, test_labels = _read_cifar_batches([files["test_batch"]])
    return RawData(train_images, train_labels, test_images, test_labels)


def _read_svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io  # noqa: PLC0415 - only SVHN needs scipy

    try:
        mat = scipy.io.loadmat(path)
        images = np.asarray(mat["X"], dtype=np.uint8)
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"cannot read SVHN file {path} ({err!r}): replace it with an intact copy"
        ) from err

    # "X" is [H, W, C, N], and "y" labels the digit 0 as 10. torchvision maps 10 to 0 and
    # exposes the result as `.labels` (not `.targets`). This reader maps it the same way.
    images = np.ascontiguousarray(images.transpose(3, 2, 0, 1))
    labels = np.where(labels == 10, 0, labels)
    return images, labels


def _load_svhn(files: DatasetFiles) -> RawData:
    train_images, train_labels = _read_svhn_split(files["train"])
    test_images, test_labels = _read_svhn_split(files["test"])
    return RawData(train_images, train_labels, test_images, test_labels)


# The synthetic dataset: class prototypes plus Gaussian pixel noise, fixed seed.
SYNTHETIC_SEED = 20230501
SYNTHETIC_TRAIN_SIZE = 3000
SYNTHETIC_TEST_SIZE = 1000
# Grey levels. At 120 a logistic regression reaches about 86% test accuracy, measured
# with 300 full-batch SGD steps, so the data is learnable but not trivially separable.
_SYNTHETIC_NOISE_STD = 120.0


def _load_synthetic(files: DatasetFiles) -> RawData:
    """Generate the synthetic dataset: 10 classes of 1 x 8 x 8 uint8 images.

    Each class has a random prototype image, and each sample is its prototype plus
    Gaussian noise, clipped to [0, 255]. Classes are balanced. The generator is seeded by
    ``SYNTHETIC_SEED``, so every call returns the same arrays.
    """
    del files  # needs none
    rng = np.random.default_rng(SYNTHETIC_SEED)
    prototypes = rng.uniform(48.0, 208.0, size=(10, 1, 8, 8))

    def draw(size: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(size) % 10).astype(np.int64)
        pixels = prototypes[labels] + rng.normal(0.0, _SYNTHETIC_NOISE_STD, (size, 1, 8, 8))
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), labels

    train_images, train_labels = draw(SYNTHETIC_TRAIN_SIZE)
    test_images, test_labels = draw(SYNTHETIC_TEST_SIZE)
    return RawData(train_images, train_labels, test_images, test_labels)


# ---------------------------------------------------------------------------------------
# Downloads (torchvision, imported only when a download is requested)
# ---------------------------------------------------------------------------------------


def _download_with_torchvision(
    class_name: str, splits: tuple[dict[str, object], ...], root: Path
) -> None:
    """Download a dataset into ``root`` with the torchvision class ``class_name``.

    ``splits`` contains the keyword arguments that select each split (train and test).
    NOTE: the tests replace this function because the network is not reachable there, so
    only the class names and keyword arguments are checked against torchvision.
    """
    import torchvision.datasets  # noqa: PLC0415 - needed only for downloads

    dataset_class = getattr(torchvision.datasets, class_name)
    for split in splits:
        dataset_class(str(root), download=True, **split)


_TRAIN_AND_TEST = ({"train": True}, {"train": False})


def _idx_files() -> tuple[RequiredFile, ...]:
    # torchvision keeps both the .gz and the extracted file; either is enough here.
    stems = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    return tuple(RequiredFile(key, (stem, f"{stem}.gz")) for key, stem in stems.items())


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist", num_classes=10, channels=1, height=28, width=28,
        load=_load_idx_dataset,
        required_files=_idx_files(),
        root_subdir="MNIST/raw",
        system_dirs=("/usr/share/datasets/mnist",),
        download=partial(_download_with_torchvision, "MNIST", _TRAIN_AND_TEST),
    ),
    "fashion_mnist": DatasetInfo(
        name="fashion_mnist", num_classes=10, channels=1, height=28, width=28,
        load=_load_idx_dataset,
        required_files=_idx_files(),
        root_subdir="FashionMNIST/raw",
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        download=partial(
            _download_with_torchvision, "FashionMNIST", _TRAIN_AND_TEST
        ),
        install_hint="apt-get install dataset-fashion-mnist",
    ),
    "cifar10": DatasetInfo(
        name="cifar10", num_classes=10, channels=3, height=32, width=32,
        load=_load_cifar10,
        required_files=tuple(
            RequiredFile(name, (name,)) for name in (*_CIFAR10_TRAIN_BATCHES, "test_batch")
        ),
        root_subdir="cifar-10-batches-py",
        download=partial(_download_with_torchvision, "CIFAR10", _TRAIN_AND_TEST),
    ),
    "svhn": DatasetInfo(
        name="svhn", num_classes=10, channels=3, height=32, width=32,
        load=_load_svhn,
        required_files=(
            RequiredFile("train", ("train_32x32.mat",)),
            RequiredFile("test", ("test_32x32.mat",)),
        ),
        download=partial(
            _download_with_torchvision, "SVHN", ({"split": "train"}, {"split": "test"})
        ),
    ),
    "synthetic": DatasetInfo(
        name="synthetic", num_classes=10, channels=1, height=8, width=8,
        load=_load_synthetic,
    ),
}
"""Dataset name -> DatasetInfo."""


def available_datasets() -> list[str]:
    """Return the names of the registered datasets, in registry order."""
    return list(DATASETS)


def _lookup_dataset(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except (KeyError, TypeError) as err:
        known = ", ".join(DATASETS)
        raise SpecError(f"unknown dataset {name!r}: expected one of {known}") from err


# ---------------------------------------------------------------------------------------
# Input shapes
# ---------------------------------------------------------------------------------------


def _convolutional_shape(info: DatasetInfo) -> ShapeCHW:
    del info  # the same for every dataset
    return CONVOLUTIONAL_INPUT_SHAPE


def _native_shape(info: DatasetInfo) -> ShapeCHW:
    return info.native_shape


_MODEL_INPUT_SHAPES: dict[str, Callable[[DatasetInfo], ShapeCHW]] = {
    "resnet18": _convolutional_shape,
    "vgg13": _convolutional_shape,
    "mlp": _native_shape,
}


def input_shape(dataset: str, model: str) -> ShapeCHW:
    """Return the input shape (channels, height, width) of ``model`` on ``dataset``.

    (3, 32, 32) for resnet18 and vgg13 on every dataset, as in Nguyen et al. (ICLR 2023),
    appendix A. The dataset's native shape for mlp.

    Raises:
        SpecError: unknown dataset or model; the message lists the known names.
    """
    info = _lookup_dataset(dataset)
    try:
        rule = _MODEL_INPUT_SHAPES[model]
    except (KeyError, TypeError) as err:
        known = ", ".join(_MODEL_INPUT_SHAPES)
        raise SpecError(f"unknown model {model!r}: expected one of {known}") from err
    return rule(info)


# ---------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------


def resolve_data_root(root: str | os.PathLike[str]) -> Path:
    """Return ``root`` with ``~`` expanded, made absolute (trials change their cwd)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(root))))


def _search_dirs(
    info: DatasetInfo, root: Path, system_dirs: Sequence[str | os.PathLike[str]] | None
) -> list[Path]:
    if system_dirs is None:
        system_dirs = info.system_dirs
    elif isinstance(system_dirs, (str, os.PathLike)):
        system_dirs = [system_dirs]
    return [root / info.root_subdir] + [resolve_data_root(d) for d in system_dirs]


def _match_files(info: DatasetInfo, directory: Path) -> DatasetFiles | None:
    files: DatasetFiles = {}
    for required in info.required_files:
        found = next(
            (directory / n for n in required.names if (directory / n).is_file()), None
        )
        if found is None:
            return None
        files[required.key] = found
    return files


def find_dataset_files(
    name: str,
    root: str | os.PathLike[str],
    system_dirs: Sequence[str | os.PathLike[str]] | None = None,
) -> DatasetFiles | None:
    """Return the files of dataset ``name`` (key -> path), or None when they are missing.

    Looks in ``<root>/<torchvision layout>``, then in each system directory
    (``system_dirs``, or the dataset's defaults when None), and returns the first directory
    that contains every required file. The synthetic dataset needs no files and returns {}.
    Reads no file contents.

    Raises:
        SpecError: unknown dataset name.
    """
    info = _lookup_dataset(name)
    for directory in _search_dirs(info, resolve_data_root(root), system_dirs):
        files = _match_files(info, directory)
        if files is not None:
            return files
    return None


def _missing_message(
    info: DatasetInfo, root: Path, system_dirs: Sequence[str | os.PathLike[str]] | None
) -> str:
    searched = ", ".join(str(d) for d in _search_dirs(info, root, system_dirs))
    expected = ", ".join(" or ".join(f.names) for f in info.required_files)
    remedies = []
    if info.install_hint:
        remedies.append(f"install it with '{info.install_hint}'")
    remedies.append(f"put the files under {root / info.root_subdir}")
    if info.download is not None:
        remedies.append("set data.download: true")
    return (
        f"dataset {info.name} not found in {searched} (expected files {expected}): "
        f"{', or '.join(remedies)}"
    )


def _ensure_writable_root(info: DatasetInfo, root: Path) -> None:
    # The nearest existing ancestor decides whether the root can be created.
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise DataError(
            f"data root {root} for dataset {info.name} is not writable "
            f"({existing} is not a writable directory): choose another data.root"
        )


def check_dataset_available(
    name: str,
    root: str | os.PathLike[str],
    download: bool,
    system_dirs: Sequence[str | os.PathLike[str]] | None = None,
) -> None:
    """Check, without reading the data, that ``prepare_dataset`` can find dataset ``name``.

    Passes when the files are present (see ``find_dataset_files``), or when ``download``
    is true, the dataset can be downloaded, and the data root is writable.

    Raises:
        SpecError: unknown dataset name.
        DataError: files missing and no download possible (the message names every path
            searched and the remedies), or an unwritable data root for a download.
    """
    info = _lookup_dataset(name)
    root_path = resolve_data_root(root)
    if find_dataset_files(name, root_path, system_dirs) is not None:
        return
    if download and info.download is not None:
        _ensure_writable_root(info, root_path)
        return
    raise DataError(_missing_message(info, root_path, system_dirs))


def _resolve_files(
    info: DatasetInfo,
    root: Path,
    download: bool,
    system_dirs: Sequence[str | os.PathLike[str]] | None,
) -> DatasetFiles:
    files = find_dataset_files(info.name, root, system_dirs)
    if files is not None:
        return files
    if not (download and info.download is not None):
        raise DataError(_missing_message(info, root, system_dirs))

    # Download under a lock: processes downloading into one root at once corrupt it.
    _ensure_writable_root(info, root)
    lock_path = _cache_dir(info, root) / f"{info.name}.download.lock"
    with FileLock(str(lock_path)):
        files = find_dataset_files(info.name, root, system_dirs)
        if files is None:
            logger.info("downloading dataset %s into %s", info.name, root)
            try:
                info.download(root)
            except (OSError, RuntimeError, ValueError, tarfile.TarError) as err:
                raise DataError(
                    f"download of dataset {info.name} into {root} failed ({err}): "
                    f"check network access, or put the files under {root / info.root_subdir}"
                ) from err
            files = find_dataset_files(info.name, root, system_dirs)
    if files is None:
        raise DataError(
            f"download of dataset {info.name} into {root} finished but files are still "
            f"missing under {root / info.root_subdir}: delete that directory and download "
            "again, or put the files there yourself"
        )
    return files


# ---------------------------------------------------------------------------------------
# Conversion and cache
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    """A dataset converted to the model's input shape, ready for ``ray.put``.

    Images are uint8 tensors [N, C, H, W], labels int64 tensors [N]. ``mean`` and ``std``
    contain one value per channel, in [0, 1] units (pixel / 255), computed on all training
    images (validation split included). Normalise each batch with them on the device.
    """

    name: str
    num_classes: int
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> ShapeCHW:
        """Image shape (channels, height, width)."""
        channels, height, width = self.train_images.shape[1:]
        return (int(channels), int(height), int(width))


def _validate_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SpecError(f"invalid seed {seed!r}: expected a non-negative integer")


def _validate_shape(info: DatasetInfo, shape: Sequence[int]) -> ShapeCHW:
    is_integer_triple = (
        isinstance(shape, (tuple, list))
        and len(shape) == 3
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shape)
    )
    if not is_integer_triple:
        raise SpecError(
            f"invalid image shape {shape!r}: expected three integers (channels, height, width)"
        )
    channels, height, width = (int(v) for v in shape)
    if min(channels, height, width) < 1:
        raise SpecError(f"invalid image shape {tuple(shape)}: every size must be >= 1")

    # Grayscale can be repeated to 3 channels, but colour is never reduced to 1.
    allowed_channels = (1, 3) if info.channels == 1 else (info.channels,)
    if channels not in allowed_channels:
        allowed = " or ".join(str(c) for c in allowed_channels)
        raise SpecError(
            f"invalid image shape {tuple(shape)} for dataset {info.name}: "
            f"use {allowed} channels"
        )
    return (channels, height, width)


def _validate_raw(info: DatasetInfo, raw: RawData, files: DatasetFiles) -> None:
    where = ", ".join(str(p) for p in files.values()) or "generated data"
    splits = (
        ("train", raw.train_images, raw.train_labels),
        ("test", raw.test_images, raw.test_labels),
    )
    for split, images, labels in splits:
        if images.dtype != np.uint8 or images.shape[1:] != info.native_shape:
            raise DataError(
                f"dataset {info.name} {split} images have shape {images.shape[1:]} and "
                f"dtype {images.dtype}, expected {info.native_shape} uint8, in {where}: "
                "replace the files with intact copies"
            )
        if labels.shape != (images.shape[0],):
            raise DataError(
                f"dataset {info.name} has {images.shape[0]} {split} images but "
                f"{labels.shape[0]} labels in {where}: replace the files with intact copies"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
            raise DataError(
                f"dataset {info.name} {split} labels range from {labels.min()} to "
                f"{labels.max()}, outside [0, {info.num_classes}), in {where}: "
                "replace the files with intact copies"
            )


def _digest_raw(raw: RawData) -> str:
    digest = hashlib.sha256()
    for array in (raw.train_images, raw.train_labels, raw.test_images, raw.test_labels):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _cache_dir(info: DatasetInfo, root: Path) -> Path:
    directory = root / ".cache"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create cache directory {directory} for dataset {info.name} ({err}): "
            "choose a writable data.root"
        ) from err
    return directory


def _cache_path(info: DatasetInfo, root: Path, shape: ShapeCHW, raw: RawData) -> Path:
    key_text = f"v{CACHE_FORMAT_VERSION}|{info.name}|{shape}|{_digest_raw(raw)}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    shape_text = "x".join(str(v) for v in shape)
    return _cache_dir(info, root) / f"{info.name}-{shape_text}-{key}.pt"


def _convert_images(images: np.ndarray, shape: ShapeCHW) -> torch.Tensor:
    """Resize uint8 images [N, C, H, W] to ``shape``, repeating 1 channel to 3 if needed.

    Resizing is bilinear with antialiasing, in float32, rounded back to uint8.
    """
    channels, height, width = shape
    source = torch.from_numpy(np.ascontiguousarray(images))
    output = torch.empty((source.shape[0], channels, height, width), dtype=torch.uint8)
    resize = tuple(source.shape[2:]) != (height, width)
    for start in range(0, source.shape[0], _CONVERSION_CHUNK):
        chunk = source[start:start + _CONVERSION_CHUNK]
        if resize:
            resized = F.interpolate(
                chunk.float(), size=(height, width), mode="bilinear",
                align_corners=False, antialias=True,
            )
            chunk = resized.round_().clamp_(0, 255).to(torch.uint8)
        output[start:start + chunk.shape[0]] = chunk.expand(-1, channels, -1, -1)
    return output


def _channel_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return per-channel mean and (population) std of uint8 images, in [0, 1] units."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_squares = torch.zeros(images.shape[1], dtype=torch.float64)
    for start in range(0, images.shape[0], _CONVERSION_CHUNK):
        chunk = images[start:start + _CONVERSION_CHUNK].to(torch.float64) / 255.0
        total += chunk.sum(dim=(0, 2, 3))
        total_squares += chunk.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_squares / count - mean.square()).clamp_(min=0.0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _convert(info: DatasetInfo, raw: RawData, shape: ShapeCHW) -> PreparedData:
    train_images = _convert_images(raw.train_images, shape)
    mean, std = _channel_statistics(train_images)
    return PreparedData(
        name=info.name,
        num_classes=info.num_classes,
        train_images=train_images,
        train_labels=torch.from_numpy(raw.train_labels.astype(np.int64)),
        test_images=_convert_images(raw.test_images, shape),
        test_labels=torch.from_numpy(raw.test_labels.astype(np.int64)),
        mean=mean,
        std=std,
    )


_CACHED_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")


def _write_cache(path: Path, data: PreparedData, shape: ShapeCHW) -> None:
    payload = {
        "format_version": CACHE_FORMAT_VERSION,
        "name": data.name,
        "num_classes": data.num_classes,
        "shape": list(shape),
        "mean": list(data.mean),
        "std": list(data.std),
        **{field: getattr(data, field) for field in _CACHED_TENSORS},
    }

    # Write a temporary file next to the cache and rename it, so that readers never
    # see a partial file.
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    os.close(descriptor)
    try:
        torch.save(payload, temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; other users may share the root
        os.replace(temporary, path)
    except (OSError, RuntimeError) as err:
        raise DataError(
            f"cannot write cache {path} for dataset {data.name} ({err}): "
            "free disk space or choose a writable data.root"
        ) from err
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _read_cache(path: Path, shape: ShapeCHW) -> PreparedData | None:
    """Return the cached data, or None when the cache is missing or unusable."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        data = PreparedData(
            name=payload["name"],
            num_classes=int(payload["num_classes"]),
            mean=tuple(float(v) for v in payload["mean"]),
            std=tuple(float(v) for v in payload["std"]),
            **{field: payload[field] for field in _CACHED_TENSORS},
        )
        valid = (
            payload["format_version"] == CACHE_FORMAT_VERSION
            and tuple(payload["shape"]) == shape
            and data.image_shape == shape
            and data.test_images.shape[1:] == data.train_images.shape[1:]
            and data.train_images.dtype == torch.uint8
            and data.test_images.dtype == torch.uint8
            and data.train_labels.shape == (data.train_images.shape[0],)
            and data.test_labels.shape == (data.test_images.shape[0],)
        )
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError,
            pickle.UnpicklingError) as err:
        logger.warning("cache %s is unreadable (%r): rebuilding it", path, err)
        return None
    if not valid:
        logger.warning("cache %s does not match its key: rebuilding it", path)
        return None
    return data


def prepare_dataset(
    name: str,
    root: str | os.PathLike[str],
    shape: Sequence[int],
    *,
    download: bool = False,
    system_dirs: Sequence[str | os.PathLike[str]] | None = None,
) -> PreparedData:
    """Load dataset ``name`` as uint8 tensors at ``shape`` (channels, height, width).

    Finds the files in the order the module docstring gives, and reads them.
    ``system_dirs``, when given, replaces the dataset's default system directories. The
    images are converted once: grayscale is repeated to 3 channels when ``shape`` has 3
    channels, then resized bilinearly with antialiasing. The result is cached in ``<root>/.cache/`` under a key made of the
    raw arrays' content, the name, the shape and ``CACHE_FORMAT_VERSION``, and later calls
    reuse it. A file lock makes concurrent processes build the cache once.
    ``root`` may start with ``~``.

    Raises:
        SpecError: unknown dataset name, or a shape the dataset cannot be converted to.
        DataError: files missing (the message names every path searched and the remedies),
            unreadable or inconsistent, a failed download, or an unwritable data root.
    """
    # Resolve the dataset, the shape and the root.
    info = _lookup_dataset(name)
    shape = _validate_shape(info, shape)
    root_path = resolve_data_root(root)

    # Find and read the files. Their content is part of the cache key.
    files = _resolve_files(info, root_path, download, system_dirs)
    raw = info.load(files)
    _validate_raw(info, raw, files)
    cache_path = _cache_path(info, root_path, shape, raw)

    # Reuse the cache, else build it under the lock. A finished cache only ever
    # appears by an atomic rename, so reading it without the lock is safe.
    data = _read_cache(cache_path, shape)
    if data is not None:
        logger.debug("reused cache %s for dataset %s", cache_path, name)
        return data
    with FileLock(f"{cache_path}.lock"):
        data = _read_cache(cache_path, shape)
        if data is not None:
            logger.debug(
                "reused cache %s for dataset %s, built by another process", cache_path, name
            )
            return data
        started = time.perf_counter()
        data = _convert(info, raw, shape)
        _write_cache(cache_path, data, shape)
    logger.info(
        "built cache %s for dataset %s at shape %s in %.1f s",
        cache_path, name, shape, time.perf_counter() - started,
    )
    return data


# ---------------------------------------------------------------------------------------
# Stratified splits and subsets
# ---------------------------------------------------------------------------------------


def _labels_to_numpy(labels: np.ndarray | torch.Tensor | Sequence[int]) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise SpecError(
            f"invalid labels of shape {array.shape} and dtype {array.dtype}: "
            "expected a non-empty 1-D vector of integer class indices"
        )
    return array


def _indices_by_class(labels: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Return, for each class in ascending order, its sample indices in random order."""
    return [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]


def stratified_split(
    labels: np.ndarray | torch.Tensor | Sequence[int],
    validation_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into training and validation indices, stratified by class.

    Each class with n samples gives round(n * validation_fraction) of them, chosen at
    random, to the validation split, so class proportions in both splits match those of
    ``labels`` within one sample per class. The same labels, fraction and seed give the
    same split. Returns two sorted, disjoint int64 index arrays that cover every sample.

    Raises:
        SpecError: validation_fraction outside (0, 1), labels that are not a non-empty
            1-D integer vector, or a fraction that leaves one of the splits empty.
    """
    if isinstance(validation_fraction, bool) or not (
        isinstance(validation_fraction, (int, float, np.floating))
        and 0.0 < float(validation_fraction) < 1.0
    ):
        raise SpecError(
            f"invalid validation_fraction {validation_fraction!r}: expected a number in (0, 1)"
        )
    _validate_seed(seed)
    array = _labels_to_numpy(labels)

    # Take the validation share of each class from a seeded permutation.
    rng = np.random.default_rng(seed)
    train_parts, validation_parts = [], []
    for indices in _indices_by_class(array, rng):
        count = int(np.floor(indices.size * validation_fraction + 0.5))
        validation_parts.append(indices[:count])
        train_parts.append(indices[count:])
    train_idx = np.sort(np.concatenate(train_parts)).astype(np.int64)
    validation_idx = np.sort(np.concatenate(validation_parts)).astype(np.int64)

    if train_idx.size == 0 or validation_idx.size == 0:
        raise SpecError(
            f"validation_fraction {validation_fraction} leaves the "
            f"{'training' if train_idx.size == 0 else 'validation'} split of "
            f"{array.size} samples empty: choose a fraction nearer 0.5 or use more samples"
        )
    return train_idx, validation_idx


def stratified_subset(
    labels: np.ndarray | torch.Tensor | Sequence[int],
    size: int,
    seed: int,
) -> np.ndarray:
    """Return ``size`` sorted int64 sample indices, stratified by class.

    Each class gets its proportional share of ``size``, rounded by the largest-remainder
    method so that the shares add up to ``size`` exactly. Each share is within one sample
    of size * (class count / number of labels). The samples of a class are chosen at
    random by ``seed``.

    Raises:
        SpecError: size below 1 or above the number of labels, or labels that are not a
            non-empty 1-D integer vector.
    """
    array = _labels_to_numpy(labels)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not (
        1 <= size <= array.size
    ):
        raise SpecError(
            f"invalid subset size {size!r}: expected an integer from 1 to {array.size}, "
            "the number of samples"
        )

    _validate_seed(seed)

    # Largest-remainder apportionment of size over the classes.
    rng = np.random.default_rng(seed)
    by_class = _indices_by_class(array, rng)
    exact = np.array([indices.size for indices in by_class]) * size / array.size
    shares = np.floor(exact).astype(np.int64)
    leftover = size - int(shares.sum())
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[:leftover]] += 1

    chosen = [indices[:share] for indices, share in zip(by_class, shares, strict=True)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
