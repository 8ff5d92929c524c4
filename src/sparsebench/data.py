"""Data sets: MNIST (fetched with verified checksums, parsed from IDX) and LIBSVM regression files.

MNIST comes as the four original gzipped IDX files. :func:`fetch_mnist` puts verified copies of
them into a folder, from torchvision's official mirrors, from a local folder, or from any
HTTP(S) mirror; :func:`load_mnist` reads them into normalised tensors. :func:`write_idx` and
:func:`write_synthetic_mnist` make small files in the same format for tests.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import shutil
import struct
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# torchvision's ``MNIST.resources`` and ``MNIST.mirrors``, written out (tests/test_data.py
# checks they still match): importing torchvision costs ~4 s, paid by every pipeline job.
#: The four original MNIST file names and their official MD5s (as torchvision lists them).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
#: torchvision's official MNIST mirrors, tried in this order.
MNIST_MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_CLASSES = 10

_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only type MNIST uses
_GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(ValueError):
    """A data file is missing, unreadable, truncated or not what it should be."""


class ChecksumError(ValueError):
    """A file's MD5 is not the expected one."""

    def __init__(self, name: str, source: str, actual: str, expected: str) -> None:
        self.name, self.source, self.actual, self.expected = name, source, actual, expected
        super().__init__(f"{name} from {source}: MD5 {actual} but expected {expected}")

    def __reduce__(self):  # keeps the error picklable (e.g. across worker processes)
        return type(self), (self.name, self.source, self.actual, self.expected)


# --------------------------------------------------------------------------------------------
# Fetching with verified checksums


def md5sum(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """The hex MD5 of a file's bytes."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _local_folder(mirror: str | Path) -> Path | None:
    """The folder a mirror names if it is local (a path or a ``file://`` URL), else None."""
    if isinstance(mirror, Path):
        return mirror
    parsed = urllib.parse.urlparse(mirror)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, i.e. a path
        raise DatasetError(f"unsupported mirror {mirror!r}: use a folder, file://, http(s)://")
    return Path(mirror)


def _file_url(mirror: str, name: str) -> str:
    return mirror.rstrip("/") + "/" + name


def _fetch_to(tmp: Path, name: str, mirror: str | Path) -> str:
    """Copy or download ``name`` from ``mirror`` to ``tmp``; return a description of the source."""
    folder = _local_folder(mirror)
    if folder is not None:
        source = folder / name
        if not folder.is_dir():
            raise DatasetError(f"mirror folder {folder} does not exist (looking for {name})")
        if not source.is_file():
            raise DatasetError(f"mirror folder {folder} has no file {name}")
        shutil.copyfile(source, tmp)
        return str(source)
    from torchvision.datasets.utils import download_url

    url = _file_url(str(mirror), name)
    try:
        download_url(url, root=str(tmp.parent), filename=tmp.name, md5=None)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise DatasetError(f"could not download {name} from {url}: {err}") from err
    return url


def _fetch_one(dest: Path, name: str, expected: str, mirror: str | Path) -> None:
    """Fetch one file into ``dest`` under a temporary name, verify it, then move it into place."""
    # A fresh name nobody has created yet: download_url skips a download whose target exists.
    tmp = dest / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
    try:
        source = _fetch_to(tmp, name, mirror)
        actual = md5sum(tmp)
        if actual != expected:
            raise ChecksumError(name, source, actual, expected)
        os.replace(tmp, dest / name)
        log.info("fetched %s from %s (MD5 verified)", name, source)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_mnist(
    dest: Path,
    mirror: str | Path | None = None,
    checksums: Mapping[str, str] | None = None,
) -> Path:
    """Make ``dest`` hold the four MNIST ``.gz`` files, each verified by MD5; return ``dest``.

    ``mirror`` is a local folder (a path or ``file://`` URL) to copy from, or an ``http(s)://``
    URL of a folder to download from; ``None`` tries torchvision's official mirrors in turn.
    ``checksums`` overrides the official MD5s (for synthetic test data). A file already in
    ``dest`` with the right MD5 is kept. Each file is written under a temporary name and only
    moved to its final name once verified, so a failed or killed fetch leaves nothing there
    that looks finished.

    Raises :class:`ChecksumError` when a file's MD5 is wrong and :class:`DatasetError` when a
    file cannot be fetched (missing from the mirror folder, HTTP error, ...).
    """
    expected = dict(MNIST_FILES)
    if checksums is not None:
        unknown = sorted(set(checksums) - set(MNIST_FILES))
        if unknown:
            raise DatasetError(f"checksums for unknown files {unknown}; MNIST has {list(expected)}")
        expected.update(checksums)
    mirrors: list[str | Path] = list(MNIST_MIRRORS) if mirror is None else [mirror]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, md5 in expected.items():
        final = dest / name
        if final.is_file() and md5sum(final) == md5:
            log.info("%s already in %s (MD5 verified)", name, dest)
            continue
        errors: list[DatasetError | ChecksumError] = []
        for candidate in mirrors:
            try:
                _fetch_one(dest, name, md5, candidate)
                break
            except (DatasetError, ChecksumError) as err:
                log.warning("%s", err)
                errors.append(err)
        else:
            if len(errors) == 1:
                raise errors[0]
            if all(isinstance(err, ChecksumError) for err in errors):
                raise errors[0]
            raise DatasetError(
                f"could not fetch {name} from any mirror:\n"
                + "\n".join(f"  {err}" for err in errors)
            )
    return dest


# --------------------------------------------------------------------------------------------
# IDX files


def _read_bytes(path: Path) -> bytes:
    """The bytes of a file, decompressed if it is gzipped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] != _GZIP_MAGIC:
            return raw
        return gzip.decompress(raw)
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: no such file") from err
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"{path}: unreadable or truncated gzip file ({err})") from err


def read_idx(path: Path) -> torch.Tensor:
    """Parse a (gzipped) IDX file of unsigned bytes into a uint8 tensor of its shape.

    Raises :class:`DatasetError` naming the file when it is truncated, its magic number is not
    that of an unsigned-byte IDX file, or its size does not match its dimensions.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: too short for an IDX file ({len(data)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code != _IDX_UBYTE or ndim == 0:
        magic = int.from_bytes(data[:4], "big")
        raise DatasetError(
            f"{path}: bad IDX magic number {magic:#010x} (expected 0x0000080N, "
            "unsigned bytes with N dimensions, e.g. 2049 for labels, 2051 for images)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(shape)
    if len(data) != expected:
        raise DatasetError(
            f"{path}: IDX size mismatch, dimensions {tuple(shape)} need {expected} bytes "
            f"but the data has {len(data)}"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    return torch.from_numpy(array.copy())


def write_idx(path: Path, array: torch.Tensor | np.ndarray) -> None:
    """Write ``array`` (uint8 values) as a gzipped IDX file; the inverse of :func:`read_idx`.

    1-D arrays (labels) get magic 2049, 3-D arrays (images) 2051. The output is byte-for-byte
    deterministic (gzip timestamp 0) and written atomically.
    """
    path = Path(path)
    values = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if values.ndim == 0:
        raise ValueError("write_idx needs an array of at least one dimension")
    if values.dtype != np.uint8:
        if not np.issubdtype(values.dtype, np.integer) or (
            values.size and (values.min() < 0 or values.max() > 255)
        ):
            raise ValueError(f"write_idx needs uint8 values, got dtype {values.dtype}")
        values = values.astype(np.uint8)
    header = struct.pack(f">HBB{values.ndim}I", 0, _IDX_UBYTE, values.ndim, *values.shape)
    payload = gzip.compress(header + np.ascontiguousarray(values).tobytes(), mtime=0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def synthetic_mnist_arrays(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` learnable MNIST-like uint8 images (n x 28 x 28) and their labels (0-9).

    Each class is a bright Gaussian blob at its own place on a ring around the centre, shifted
    by up to two pixels and overlaid with noise. Deterministic in ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    angles = 2 * math.pi * labels.double() / NUM_CLASSES
    shift = torch.randint(-2, 3, (n, 2), generator=gen).double()
    centre_y = 13.5 + 8 * torch.sin(angles) + shift[:, 0]
    centre_x = 13.5 + 8 * torch.cos(angles) + shift[:, 1]
    grid = torch.arange(28, dtype=torch.float64)
    dist2 = (grid.view(1, 28, 1) - centre_y.view(n, 1, 1)) ** 2 + (
        grid.view(1, 1, 28) - centre_x.view(n, 1, 1)
    ) ** 2
    blob = 230 * torch.exp(-dist2 / (2 * 2.5**2))
    noise = 40 * torch.rand((n, 28, 28), generator=gen, dtype=torch.float64)
    images = (blob + noise).round().clamp(0, 255).to(torch.uint8)
    return images, labels.to(torch.uint8)


def write_synthetic_mnist(
    dest: Path, train_samples: int = 600, test_samples: int = 200, seed: int = 0
) -> dict[str, str]:
    """Write small learnable MNIST-format files under the official names; return their MD5s."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic_mnist_arrays(train_samples, seed)
    test_images, test_labels = synthetic_mnist_arrays(test_samples, seed + 1)
    arrays = {
        TRAIN_IMAGES: train_images,
        TRAIN_LABELS: train_labels,
        TEST_IMAGES: test_images,
        TEST_LABELS: test_labels,
    }
    for name, array in arrays.items():
        write_idx(dest / name, array)
    return {name: md5sum(dest / name) for name in MNIST_FILES}


# --------------------------------------------------------------------------------------------
# MNIST as tensors


@dataclass(frozen=True)
class Split:
    """One part of a data set: float32 images (N x 784, normalised) and int64 labels (N)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: str | torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class MNIST:
    """MNIST's training and test splits."""

    train: Split
    test: Split

    def to(self, device: str | torch.device) -> MNIST:
        """A copy with both splits on ``device``."""
        return MNIST(self.train.to(device), self.test.to(device))


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N x 28 x 28) -> float32 (N x 784), scaled to [0, 1], then MNIST-normalised."""
    flat = images.reshape(images.shape[0], -1).to(torch.float32) / 255.0
    return (flat - MNIST_MEAN) / MNIST_STD


def subset_indices(available: int, size: int, seed: int) -> torch.Tensor:
    """``size`` distinct indices below ``available``, a fixed random choice per seed, sorted."""
    if not 0 < size <= available:
        raise DatasetError(f"subset size must be in 1..{available}, got {size}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=gen)[:size].sort().values


def _read_split(raw_dir: Path, images_name: str, labels_name: str) -> tuple[torch.Tensor, ...]:
    for name in (images_name, labels_name):
        if not (raw_dir / name).is_file():
            raise DatasetError(f"{raw_dir} has no {name} (run fetch_mnist first)")
    images, labels = read_idx(raw_dir / images_name), read_idx(raw_dir / labels_name)
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(
            f"{raw_dir}: {images_name} has shape {tuple(images.shape)} and {labels_name} "
            f"{tuple(labels.shape)}; expected N x H x W images and N labels"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{raw_dir}: {images_name} has {images.shape[0]} images but {labels_name} has "
            f"{labels.shape[0]} labels"
        )
    if labels.numel() and int(labels.max()) >= NUM_CLASSES:
        raise DatasetError(f"{raw_dir / labels_name}: label {int(labels.max())} is not a digit")
    return images, labels


def load_mnist(
    raw_dir: Path,
    train_samples: int | None = None,
    subset_seed: int = 0,
    device: str | torch.device = "cpu",
) -> MNIST:
    """Read the four MNIST files in ``raw_dir`` into normalised tensors on ``device``.

    With ``train_samples``, the training set is a fixed random subset of that size (chosen by
    ``subset_seed`` alone, so every training seed sees the same subset), in original order.
    The test set is always complete.
    """
    raw_dir = Path(raw_dir)
    train_images, train_labels = _read_split(raw_dir, TRAIN_IMAGES, TRAIN_LABELS)
    test_images, test_labels = _read_split(raw_dir, TEST_IMAGES, TEST_LABELS)
    if train_samples is not None:
        keep = subset_indices(len(train_labels), train_samples, subset_seed)
        train_images, train_labels = train_images[keep], train_labels[keep]
    return MNIST(
        train=Split(normalise_images(train_images), train_labels.to(torch.int64)),
        test=Split(normalise_images(test_images), test_labels.to(torch.int64)),
    ).to(device)


# --------------------------------------------------------------------------------------------
# LIBSVM / svmlight regression files


def load_libsvm_regression(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse a LIBSVM/svmlight file (``y i:v i:v ...``) into float32 features and targets.

    Features form an N x (largest feature index) matrix, missing entries 0; indices start at 1.
    Blank lines and ``#`` comments are ignored. A malformed line raises :class:`DatasetError`
    naming the file and line number.
    """
    path = Path(path)
    targets: list[float] = []
    rows: list[dict[int, float]] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err})") from err
    for number, line in enumerate(lines, start=1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        try:
            target = float(tokens[0])
            row: dict[int, float] = {}
            for token in tokens[1:]:
                index_text, value_text = token.split(":")
                index = int(index_text)
                if index < 1 or index in row:
                    raise ValueError(f"bad or repeated feature index {index}")
                row[index] = float(value_text)
        except ValueError as err:
            raise DatasetError(f"{path}, line {number}: malformed ({err}): {line!r}") from err
        targets.append(target)
        rows.append(row)
    if not rows:
        raise DatasetError(f"{path}: no data lines")
    width = max((max(row) for row in rows if row), default=0)
    features = np.zeros((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        for index, value in row.items():
            features[i, index - 1] = value
    return torch.from_numpy(features), torch.tensor(targets, dtype=torch.float32)
