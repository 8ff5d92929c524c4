"""Which device a training run uses, and a pool that spreads runs over GPUs.

``resolve_device`` turns the config's ``device`` key (``auto``, ``cpu``,
``cuda`` or ``cuda:N``) into a :class:`torch.device`, failing clearly on
anything else or on a CUDA request where there is none.

``claim_device`` is what a training job calls::

    with claim_device(config["device"]) as device:
        ...  # train on `device`, record str(device)

When the request resolves to plain ``cuda`` it claims one GPU from a pool
for as long as the ``with`` block runs: one lock file per GPU, held with
``fcntl.flock``, so that concurrent jobs on one machine land on distinct
GPUs (``snakemake --resources gpu=N`` on an N-GPU box runs N training jobs
at once, one per GPU) and, on a single GPU, never share it. When every GPU is
taken the claim waits, up to a timeout, then fails saying who holds them. An
explicit ``cuda:N`` or the CPU bypasses the pool (``cuda:0`` is how to share
one GPU between jobs on purpose). On any GPU it also fixes cuBLAS's workspace
(:func:`deterministic_cuda`), without which cuBLAS may sum in a different order
from one run to the next.

Locks are named after the physical GPU: its UUID (else the entry of
``CUDA_VISIBLE_DEVICES``, else the index). Two SLURM jobs on one node that
each see "GPU 0" but hold different GPUs therefore never wait on each other.
The lock folder is per machine (``SPARSEBENCH_GPU_LOCK_DIR``, default
``<system temp>/sparsebench-gpu-locks``); a lock dies with its process, so a
killed job never leaves a GPU claimed.

torch is imported where it is needed, so that planning code (the Snakefile's
``device_type``) stays cheap to import.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DeviceBusyError",
    "claim_device",
    "default_lock_dir",
    "deterministic_cuda",
    "device_type",
    "numba_threads_like_torch",
    "resolve_device",
]

_DEVICE_RE = re.compile(r"cuda(?::(\d+))?")
_ACCEPTED = "'auto', 'cpu', 'cuda' or 'cuda:N'"
#: Seconds a claim waits for a free GPU unless told otherwise (env: SPARSEBENCH_GPU_TIMEOUT).
DEFAULT_TIMEOUT_S = 24 * 3600.0


class DeviceBusyError(TimeoutError):
    """Every GPU of the pool stayed claimed for longer than the timeout."""


def _cuda_unavailable(requested: str) -> RuntimeError:
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = (
        f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no CUDA_VISIBLE_DEVICES"
    )
    return RuntimeError(
        f"device {requested!r} was requested but CUDA is not available here "
        f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}, {where}); "
        "set device to 'cpu' or 'auto' (e.g. --config device=auto)"
    )


def resolve_device(requested: str = "auto") -> torch.device:
    """The :class:`torch.device` for a config value: auto, cpu, cuda or cuda:N.

    ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``. Raises
    ``ValueError`` for anything else (naming it) and ``RuntimeError`` when CUDA
    is asked for and there is none, or ``cuda:N`` names a GPU that is not there.
    """
    import torch

    text = str(requested).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _DEVICE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"unknown device {requested!r}: expected {_ACCEPTED}")
    if not torch.cuda.is_available():
        raise _cuda_unavailable(str(requested))
    if match.group(1) is None:
        return torch.device("cuda")
    index = int(match.group(1))
    count = torch.cuda.device_count()
    if index >= count:
        raise RuntimeError(
            f"device {requested!r} was requested but only {count} GPU(s) are visible "
            f"(cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def device_type(requested: str = "auto") -> str:
    """``"cuda"`` or ``"cpu"``: the kind of device a config value asks for.

    For planning jobs, not for running them: an explicit ``cuda``/``cuda:N`` is
    ``"cuda"`` even where this machine has no GPU (a cluster's login node plans
    the GPU jobs that run elsewhere); only ``auto`` looks at this machine.
    Unknown values raise ``ValueError`` like :func:`resolve_device`. Imports
    torch only for ``auto``, which keeps planning (the Snakefile) light.
    """
    text = str(requested).strip().lower()
    if text == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if _DEVICE_RE.fullmatch(text):
        return "cuda"
    raise ValueError(f"unknown device {requested!r}: expected {_ACCEPTED}")


def default_lock_dir() -> Path:
    """The per-machine folder of GPU lock files."""
    env = os.environ.get("SPARSEBENCH_GPU_LOCK_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / "sparsebench-gpu-locks"


def _gpu_keys(count: int, real: bool) -> list[str]:
    """A lock name per visible GPU index, naming the physical GPU where possible.

    Real GPUs are named by their UUID: under SLURM with cgroup device
    constraints every job sees its own GPU as index 0 and CUDA_VISIBLE_DEVICES=0,
    and jobs sharing a node must not wait on each other for "GPU 0". Otherwise
    (fake counts, UUID unavailable) the CUDA_VISIBLE_DEVICES entry, else the index.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",")] if visible else []
    keys = []
    for index in range(count):
        raw = entries[index] if index < len(entries) and entries[index] else str(index)
        if real:
            import torch

            # An older torch or driver without UUIDs keeps the fallback.
            with contextlib.suppress(Exception):
                raw = f"uuid-{torch.cuda.get_device_properties(index).uuid}"
        keys.append(re.sub(r"[^A-Za-z0-9._-]", "_", raw))
    return keys


def _make_lock_dir(lock_dir: Path) -> None:
    if lock_dir.is_dir():
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    # Shared by every user of the machine, like /tmp itself.
    with contextlib.suppress(OSError):
        os.chmod(lock_dir, 0o1777)


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def claim_device(
    requested: str = "auto",
    lock_dir: Path | None = None,
    device_count: int | None = None,
    timeout: float | None = None,
    poll_interval: float = 0.2,
) -> Iterator[torch.device]:
    """Resolve ``requested`` and, for plain ``cuda``, hold one GPU of the pool; on a GPU,
    with :func:`deterministic_cuda`'s setting.

    ``device_count`` overrides ``torch.cuda.device_count()`` (and the CUDA
    availability check), which lets the pool be tested without GPUs.
    ``timeout`` (seconds; default ``SPARSEBENCH_GPU_TIMEOUT`` or 24 h) bounds
    the wait for a free GPU; then :class:`DeviceBusyError` is raised.
    """
    with _claim(requested, lock_dir, device_count, timeout, poll_interval) as device:
        deterministic_cuda(device)
        yield device


CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def deterministic_cuda(device: torch.device) -> None:
    """On a CUDA device, cuBLAS's part in giving the same numbers on every run: a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``; cuBLAS reads it when it starts, so this must come
    before the first matrix product; a value already set is kept).

    torch's deterministic mode stays off: it would swap in slower kernels (a sorting
    ``index_add_``, memory filled at every ``empty``), and the project's own CUDA code
    already avoids the nondeterministic ones (the sweep never adds to a row twice at once).
    """
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)


@contextlib.contextmanager
def _claim(
    requested: str,
    lock_dir: Path | None,
    device_count: int | None,
    timeout: float | None,
    poll_interval: float,
) -> Iterator[torch.device]:
    import torch

    if device_count is None:
        device = resolve_device(requested)
        pooled = device.type == "cuda" and device.index is None
        count = torch.cuda.device_count() if pooled else 0
    else:
        text = str(requested).strip().lower()
        match = _DEVICE_RE.fullmatch(text)
        if text == "cpu" or (text == "auto" and device_count == 0):
            device = torch.device("cpu")
        elif text == "auto" or (match is not None and match.group(1) is None):
            if device_count == 0:
                raise _cuda_unavailable(str(requested))
            device = torch.device("cuda")
        elif match is not None:
            index = int(match.group(1))
            if index >= device_count:
                raise RuntimeError(
                    f"device {requested!r} was requested but only {device_count} GPU(s) are visible"
                )
            device = torch.device("cuda", index)
        else:
            raise ValueError(f"unknown device {requested!r}: expected {_ACCEPTED}")
        pooled = device.type == "cuda" and device.index is None
        count = device_count

    if not pooled:
        yield device
        return

    if timeout is None:
        timeout = float(os.environ.get("SPARSEBENCH_GPU_TIMEOUT", DEFAULT_TIMEOUT_S))
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    _make_lock_dir(lock_dir)
    paths = [lock_dir / f"gpu-{key}.lock" for key in _gpu_keys(count, real=device_count is None)]

    deadline = time.monotonic() + timeout
    # Start the scan at a per-process offset so that simultaneous claims
    # rarely race for the same lock first.
    start = os.getpid() % count
    told = False
    while True:
        for step in range(count):
            index = (start + step) % count
            fd = _try_lock(paths[index])
            if fd is None:
                continue
            try:
                os.ftruncate(fd, 0)
                stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
                os.write(
                    fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode()
                )
                claimed = torch.device("cuda", index)
                if device_count is None and torch.cuda.is_available():
                    torch.cuda.set_device(claimed)
                yield claimed
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)
            return
        if time.monotonic() >= deadline:
            holders = "; ".join(f"{p.name}: {_holder(p)}" for p in paths)
            raise DeviceBusyError(
                f"all {count} GPU(s) stayed claimed for {timeout:g} s ({holders}); "
                f"lock folder {lock_dir}. Run fewer GPU jobs at once "
                "(snakemake --resources gpu=<number of GPUs>) or raise SPARSEBENCH_GPU_TIMEOUT"
            )
        if not told:
            print(
                f"sparsebench: all {count} GPU(s) are claimed (locks in {lock_dir}); waiting",
                file=sys.stderr,
            )
            told = True
        time.sleep(poll_interval)


@contextlib.contextmanager
def numba_threads_like_torch() -> Iterator[int]:
    """Run numba's parallel code with torch's thread count, and leave torch's count as it was.

    numba's OpenMP layer shares torch's libgomp, and its launch (the first parallel call or
    thread query in a process) sets OpenMP's thread count, which torch then reads back as its
    own: a job told to use one thread would silently use every core, and two such jobs on two
    cores would fight over them. Yields the count.
    """
    import numba
    import torch

    threads = torch.get_num_threads()
    previous = numba.get_num_threads()  # launches numba's threading layer if not yet done
    torch.set_num_threads(threads)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield threads
    finally:
        numba.set_num_threads(previous)
        torch.set_num_threads(threads)
