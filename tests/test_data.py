"""Tests of sparsebench.data: verified MNIST fetching, IDX parsing, loading, LIBSVM files."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from sparsebench import data
from sparsebench.data import (
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    ChecksumError,
    DatasetError,
    fetch_mnist,
    load_libsvm_regression,
    load_mnist,
    md5sum,
    read_idx,
    write_idx,
)

OFFICIAL_NAMES = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]


def copy_mirror(synthetic_mnist, folder: Path) -> Path:
    """A private, editable copy of the synthetic mirror folder."""
    shutil.copytree(synthetic_mnist.dir, folder)
    return folder


# --------------------------------------------------------------------------------------------
# Constants


def test_official_files_and_mirrors_come_from_torchvision():
    assert dict(torchvision.datasets.MNIST.resources) == MNIST_FILES
    assert sorted(MNIST_FILES) == sorted(OFFICIAL_NAMES)
    assert MNIST_FILES[TRAIN_IMAGES] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert list(torchvision.datasets.MNIST.mirrors) == data.MNIST_MIRRORS
    assert (MNIST_MEAN, MNIST_STD) == (0.1307, 0.3081)


# --------------------------------------------------------------------------------------------
# IDX files


def test_idx_round_trip(tmp_path):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = np.array([0, 9, 3, 3, 7], dtype=np.uint8)
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels.gz", labels)

    assert torch.equal(read_idx(tmp_path / "images.gz"), images)
    back = read_idx(tmp_path / "labels.gz")
    assert back.dtype == torch.uint8 and back.tolist() == [0, 9, 3, 3, 7]

    raw_images = gzip.decompress((tmp_path / "images.gz").read_bytes())
    raw_labels = gzip.decompress((tmp_path / "labels.gz").read_bytes())
    assert struct.unpack(">IIII", raw_images[:16]) == (2051, 5, 28, 28)
    assert struct.unpack(">II", raw_labels[:8]) == (2049, 5)
    assert len(raw_images) == 16 + 5 * 28 * 28


def test_write_idx_is_deterministic_and_reads_plain_idx(tmp_path):
    labels = torch.tensor([1, 2, 3], dtype=torch.int64)  # integer values 0-255 are accepted
    write_idx(tmp_path / "a.gz", labels)
    write_idx(tmp_path / "b.gz", labels.to(torch.uint8))
    assert md5sum(tmp_path / "a.gz") == md5sum(tmp_path / "b.gz")
    (tmp_path / "plain").write_bytes(gzip.decompress((tmp_path / "a.gz").read_bytes()))
    assert read_idx(tmp_path / "plain").tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "c.gz", torch.tensor([0.5]))
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "c.gz", np.array([300]))


def test_read_idx_bad_magic_names_the_file(tmp_path):
    path = tmp_path / "bad-magic.gz"
    path.write_bytes(gzip.compress(struct.pack(">II", 0x00000D01, 1) + b"\x00" * 8))
    with pytest.raises(DatasetError, match="bad-magic.gz.*magic"):
        read_idx(path)


def test_read_idx_truncated_gzip_names_the_file(synthetic_mnist, tmp_path):
    whole = (synthetic_mnist.dir / TRAIN_IMAGES).read_bytes()
    path = tmp_path / TRAIN_IMAGES
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match=f"{TRAIN_IMAGES}.*truncated"):
        read_idx(path)


def test_read_idx_size_mismatch_names_the_file(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(struct.pack(">IIII", 2051, 2, 28, 28) + b"\x00" * 784))
    with pytest.raises(DatasetError, match=r"short.gz.*\(2, 28, 28\) need 1584 bytes.*800"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="nothing.gz"):
        read_idx(tmp_path / "nothing.gz")


# --------------------------------------------------------------------------------------------
# fetch_mnist from a local folder


def test_fetch_from_local_folder_verifies_and_reuses(synthetic_mnist, tmp_path, monkeypatch):
    dest = tmp_path / "raw"
    assert fetch_mnist(dest, synthetic_mnist.dir, synthetic_mnist.checksums) == dest
    assert sorted(os.listdir(dest)) == sorted(OFFICIAL_NAMES)  # no temporary files left
    for name in OFFICIAL_NAMES:
        assert (dest / name).read_bytes() == (synthetic_mnist.dir / name).read_bytes()
    mtimes = {name: (dest / name).stat().st_mtime_ns for name in OFFICIAL_NAMES}

    def no_copy(*args, **kwargs):
        raise AssertionError("a verified file was fetched again")

    monkeypatch.setattr(data.shutil, "copyfile", no_copy)
    fetch_mnist(dest, synthetic_mnist.dir, synthetic_mnist.checksums)
    assert {name: (dest / name).stat().st_mtime_ns for name in OFFICIAL_NAMES} == mtimes


def test_fetch_from_file_url(synthetic_mnist, tmp_path):
    dest = fetch_mnist(tmp_path / "raw", synthetic_mnist.dir.as_uri(), synthetic_mnist.checksums)
    assert {name: md5sum(dest / name) for name in OFFICIAL_NAMES} == synthetic_mnist.checksums


def test_fetch_replaces_a_corrupt_file_in_dest(synthetic_mnist, tmp_path):
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / TEST_LABELS).write_bytes(b"half a download")
    fetch_mnist(dest, synthetic_mnist.dir, synthetic_mnist.checksums)
    assert md5sum(dest / TEST_LABELS) == synthetic_mnist.checksums[TEST_LABELS]


def test_wrong_checksum_names_file_and_both_md5s_and_leaves_nothing(synthetic_mnist, tmp_path):
    wrong = "0123456789abcdef0123456789abcdef"
    checksums = {**synthetic_mnist.checksums, TRAIN_LABELS: wrong}
    dest = tmp_path / "raw"
    with pytest.raises(ChecksumError) as caught:
        fetch_mnist(dest, synthetic_mnist.dir, checksums)
    message = str(caught.value)
    assert TRAIN_LABELS in message
    assert str(synthetic_mnist.dir) in message
    assert f"MD5 {synthetic_mnist.checksums[TRAIN_LABELS]} but expected {wrong}" in message
    assert isinstance(caught.value, ValueError)
    assert not (dest / TRAIN_LABELS).exists()
    assert not [p for p in os.listdir(dest) if p.endswith(".part")]
    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == message


def test_official_checksums_are_the_default(synthetic_mnist, tmp_path):
    with pytest.raises(ChecksumError, match=f"expected {MNIST_FILES[TRAIN_IMAGES]}"):
        fetch_mnist(tmp_path / "raw", synthetic_mnist.dir)


def test_truncated_file_in_mirror_is_rejected(synthetic_mnist, tmp_path):
    mirror = copy_mirror(synthetic_mnist, tmp_path / "mirror")
    whole = (mirror / TEST_IMAGES).read_bytes()
    (mirror / TEST_IMAGES).write_bytes(whole[: len(whole) // 2])
    dest = tmp_path / "raw"
    with pytest.raises(ChecksumError, match=f"{TEST_IMAGES} from .*mirror.*: MD5 .* but expected"):
        fetch_mnist(dest, mirror, synthetic_mnist.checksums)
    assert not (dest / TEST_IMAGES).exists()


def test_missing_file_in_mirror_names_file_and_folder(synthetic_mnist, tmp_path):
    mirror = copy_mirror(synthetic_mnist, tmp_path / "mirror")
    (mirror / TEST_LABELS).unlink()
    with pytest.raises(DatasetError, match=f"mirror folder {mirror} has no file {TEST_LABELS}"):
        fetch_mnist(tmp_path / "raw", mirror, synthetic_mnist.checksums)
    with pytest.raises(DatasetError, match="does not exist"):
        fetch_mnist(tmp_path / "raw", tmp_path / "no-such-mirror", synthetic_mnist.checksums)


def test_bad_arguments(synthetic_mnist, tmp_path):
    with pytest.raises(DatasetError, match="unsupported mirror"):
        fetch_mnist(tmp_path / "raw", "ftp://example.org/mnist/", synthetic_mnist.checksums)
    with pytest.raises(DatasetError, match="unknown files"):
        fetch_mnist(tmp_path / "raw", synthetic_mnist.dir, {"mnist.npz": "0" * 32})


# --------------------------------------------------------------------------------------------
# fetch_mnist over HTTP (a local server stands in for a mirror)


def test_fetch_over_http(synthetic_mnist, serve_directory, tmp_path):
    url = serve_directory(synthetic_mnist.dir)
    dest = fetch_mnist(tmp_path / "raw", url, synthetic_mnist.checksums)
    assert {name: md5sum(dest / name) for name in OFFICIAL_NAMES} == synthetic_mnist.checksums
    assert sorted(os.listdir(dest)) == sorted(OFFICIAL_NAMES)


def test_http_404_is_a_clear_error(synthetic_mnist, serve_directory, tmp_path):
    mirror = copy_mirror(synthetic_mnist, tmp_path / "mirror")
    (mirror / TRAIN_LABELS).unlink()
    url = serve_directory(mirror)
    dest = tmp_path / "raw"
    with pytest.raises(DatasetError, match=f"{TRAIN_LABELS} from {url}{TRAIN_LABELS}.*404"):
        fetch_mnist(dest, url, synthetic_mnist.checksums)
    assert not (dest / TRAIN_LABELS).exists()
    assert not [p for p in os.listdir(dest) if p.endswith(".part")]


def test_default_mirrors_are_tried_in_turn(synthetic_mnist, serve_directory, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken, good = serve_directory(empty), serve_directory(synthetic_mnist.dir)

    monkeypatch.setattr(data, "MNIST_MIRRORS", [broken, good])
    dest = fetch_mnist(tmp_path / "raw", checksums=synthetic_mnist.checksums)
    assert {name: md5sum(dest / name) for name in OFFICIAL_NAMES} == synthetic_mnist.checksums

    monkeypatch.setattr(data, "MNIST_MIRRORS", [broken, empty])
    with pytest.raises(DatasetError, match=f"(?s){TRAIN_IMAGES} from any mirror.*404.*{empty}"):
        fetch_mnist(tmp_path / "raw2", checksums=synthetic_mnist.checksums)


# --------------------------------------------------------------------------------------------
# load_mnist


def test_load_mnist_shapes_dtypes_and_normalisation(synthetic_mnist):
    mnist = load_mnist(synthetic_mnist.dir)
    n_train, n_test = synthetic_mnist.train_samples, synthetic_mnist.test_samples
    assert mnist.train.images.shape == (n_train, 784) and mnist.test.images.shape == (n_test, 784)
    assert mnist.train.images.dtype == torch.float32 and mnist.train.labels.dtype == torch.int64
    assert len(mnist.train) == n_train and len(mnist.test) == n_test

    raw = read_idx(synthetic_mnist.dir / TRAIN_IMAGES)[7].double().flatten()
    expected = (raw / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(mnist.train.images[7].double(), expected, atol=1e-6)
    assert mnist.train.images[7].mean().item() == pytest.approx(expected.mean().item(), abs=1e-6)
    assert mnist.train.images[7].std().item() == pytest.approx(expected.std().item(), abs=1e-6)
    assert mnist.train.images.min().item() >= -MNIST_MEAN / MNIST_STD - 1e-6
    assert mnist.train.images.max().item() <= (1 - MNIST_MEAN) / MNIST_STD + 1e-6

    labels = read_idx(synthetic_mnist.dir / TEST_LABELS).long()
    assert torch.equal(mnist.test.labels, labels)


def test_load_mnist_subset_is_fixed_sorted_and_test_set_complete(synthetic_mnist):
    full = load_mnist(synthetic_mnist.dir)
    a = load_mnist(synthetic_mnist.dir, train_samples=100, subset_seed=3)
    b = load_mnist(synthetic_mnist.dir, train_samples=100, subset_seed=3)
    c = load_mnist(synthetic_mnist.dir, train_samples=100, subset_seed=4)
    assert a.train.images.shape == (100, 784) and a.train.labels.shape == (100,)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.equal(a.test.images, full.test.images)
    assert torch.equal(a.test.labels, full.test.labels)

    indices = data.subset_indices(synthetic_mnist.train_samples, 100, 3)
    assert torch.all(indices[1:] > indices[:-1])  # distinct, in original order
    assert torch.equal(a.train.images, full.train.images[indices])
    assert torch.equal(a.train.labels, full.train.labels[indices])
    everything = load_mnist(synthetic_mnist.dir, train_samples=synthetic_mnist.train_samples)
    assert torch.equal(everything.train.images, full.train.images)


@pytest.mark.parametrize("size", [0, -1, 601])
def test_load_mnist_rejects_bad_subset_size(synthetic_mnist, size):
    with pytest.raises(DatasetError, match="subset size"):
        load_mnist(synthetic_mnist.dir, train_samples=size)


def test_load_mnist_validates_files(synthetic_mnist, tmp_path):
    folder = copy_mirror(synthetic_mnist, tmp_path / "raw")
    write_idx(folder / TRAIN_LABELS, np.zeros(5, dtype=np.uint8))
    with pytest.raises(DatasetError, match="600 images but .* has 5 labels"):
        load_mnist(folder)
    shutil.copyfile(synthetic_mnist.dir / TRAIN_LABELS, folder / TRAIN_LABELS)
    (folder / TEST_IMAGES).unlink()
    with pytest.raises(DatasetError, match=f"no {TEST_IMAGES}"):
        load_mnist(folder)


def test_mnist_to_device(synthetic_mnist):
    mnist = load_mnist(synthetic_mnist.dir, train_samples=10, device="meta")
    assert mnist.train.images.device.type == "meta" and mnist.test.labels.device.type == "meta"
    assert load_mnist(synthetic_mnist.dir).to("meta").train.labels.device.type == "meta"


def test_synthetic_classes_are_learnable(synthetic_mnist):
    mnist = load_mnist(synthetic_mnist.dir)
    assert set(mnist.train.labels.tolist()) == set(range(10))
    means = torch.stack([mnist.train.images[mnist.train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(mnist.test.images, means).argmin(1)
    assert (predicted == mnist.test.labels).float().mean().item() > 0.9


# --------------------------------------------------------------------------------------------
# The real MNIST files


@pytest.mark.realdata
def test_real_mnist_fetch_and_load(real_mnist_dir, tmp_path):
    dest = fetch_mnist(tmp_path / "raw", real_mnist_dir)  # official checksums
    assert {name: md5sum(dest / name) for name in MNIST_FILES} == MNIST_FILES

    mnist = load_mnist(dest)
    assert mnist.train.images.shape == (60000, 784) and mnist.test.images.shape == (10000, 784)
    train_counts = torch.bincount(mnist.train.labels, minlength=10).tolist()
    test_counts = torch.bincount(mnist.test.labels, minlength=10).tolist()
    assert train_counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test_counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.train.images.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert mnist.train.images.std().item() == pytest.approx(1.0, abs=1e-3)

    subset = load_mnist(dest, train_samples=1000, subset_seed=0)
    assert subset.train.images.shape == (1000, 784) and subset.test.images.shape == (10000, 784)


# --------------------------------------------------------------------------------------------
# LIBSVM regression files


def test_load_libsvm_regression(tmp_path):
    path = tmp_path / "small"
    path.write_text("1.5 1:0.5 3:-1\n\n# a comment\n-2 2:0.25  # trailing comment\n0.0\n")
    features, targets = load_libsvm_regression(path)
    assert features.dtype == torch.float32 and targets.dtype == torch.float32
    assert features.tolist() == [[0.5, 0.0, -1.0], [0.0, 0.25, 0.0], [0.0, 0.0, 0.0]]
    assert targets.tolist() == [1.5, -2.0, 0.0]


@pytest.mark.parametrize("line", ["1.0 1:0.5 x:2", "1.0 0:1", "abc 1:1", "1.0 1:1 1:2", "1 2"])
def test_load_libsvm_regression_malformed_line(tmp_path, line):
    path = tmp_path / "bad"
    path.write_text(f"1.0 1:0.5\n{line}\n")
    with pytest.raises(DatasetError, match=f"{path}, line 2"):
        load_libsvm_regression(path)


@pytest.mark.realdata
def test_load_real_mg_scale(real_mg_path):
    features, targets = load_libsvm_regression(real_mg_path)
    assert features.shape == (1385, 6) and targets.shape == (1385,)
    assert features.min().item() == -1.0 and features.max().item() == 1.0
    assert 0.4 < targets.min().item() < targets.max().item() < 1.4
