"""Shared pytest fixtures."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from sparsebench.data import MNIST_FILES, write_synthetic_mnist
from sparsebench.regularizers import base as regularizer_base

# --------------------------------------------------------------------------------------------
# Data


class SyntheticMNIST(NamedTuple):
    """A folder holding small MNIST-format files under the official names, and their MD5s."""

    dir: Path
    checksums: dict[str, str]
    train_samples: int
    test_samples: int


@pytest.fixture(scope="session")
def synthetic_mnist(tmp_path_factory: pytest.TempPathFactory) -> SyntheticMNIST:
    """Tiny learnable MNIST (600 train, 200 test images, 28x28) as the four original .gz files.

    Each class is a blob at its own place plus noise. Treat the folder as read-only: it is
    shared by the whole session.
    """
    folder = tmp_path_factory.mktemp("synthetic_mnist")
    checksums = write_synthetic_mnist(folder, train_samples=600, test_samples=200, seed=0)
    return SyntheticMNIST(folder, checksums, 600, 200)


@pytest.fixture
def real_mnist_dir() -> Path:
    """The folder of the real MNIST files named by $SPARSEBENCH_MNIST_DIR; skip if unavailable."""
    value = os.environ.get("SPARSEBENCH_MNIST_DIR")
    if not value:
        pytest.skip("SPARSEBENCH_MNIST_DIR is not set (e.g. ../shared/data/mnist)")
    folder = Path(value)
    missing = [name for name in MNIST_FILES if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"SPARSEBENCH_MNIST_DIR={folder} lacks {', '.join(missing)}")
    return folder


@pytest.fixture
def real_mg_path() -> Path:
    """The LIBSVM file mg_scale: $SPARSEBENCH_MG_PATH, else ../shared/data/mg/mg_scale; or skip."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "mg" / "mg_scale"
    path = Path(os.environ.get("SPARSEBENCH_MG_PATH") or default)
    if not path.is_file():
        pytest.skip(f"{path} not found (set SPARSEBENCH_MG_PATH)")
    return path


# --------------------------------------------------------------------------------------------
# Network stand-ins


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def serve_directory(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], str]]:
    """A function that serves a folder over HTTP on 127.0.0.1 and returns its URL.

    Servers run in threads and are shut down after the test; proxies are bypassed.
    """
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def serve(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append((server, thread))
        host, port = server.server_address[:2]
        return f"http://{host}:{port}/"

    yield serve
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# Regularizers


class OneSeedAtATime(regularizer_base.Regularizer):
    """A regularizer that cannot train stacked seeds; its measure is zero."""

    name = "one_seed_at_a_time"
    supports_batching = False


@pytest.fixture
def unbatchable_regularizer(monkeypatch: pytest.MonkeyPatch) -> type[regularizer_base.Regularizer]:
    """:class:`OneSeedAtATime`, found by its name in the registry for this test only."""
    monkeypatch.setitem(regularizer_base._REGISTRY, OneSeedAtATime.name, OneSeedAtATime)
    return OneSeedAtATime
