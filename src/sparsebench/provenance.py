"""What produced a result (config, seed, versions, device, commit) and atomic file writes."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("sparsebench", "torch", "torchvision", "numpy", "pandas", "snakemake")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers (and Python's)."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(path: Path | str = ".") -> str:
    """The commit checked out at ``path`` (suffixed ``-dirty`` with local changes), or 'unknown'."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def device_description(device: Any) -> str:
    """A human-readable name of the device, e.g. 'cpu (x86_64)' or 'cuda:0 (NVIDIA H200)'."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.machine()})"


@functools.cache
def _running_code() -> tuple[tuple[tuple[str, str], ...], str]:
    versions = package_versions()
    return tuple(versions.items()), git_commit(Path(__file__).resolve().parent)


def code_identity() -> dict[str, Any]:
    """The package versions and git commit of the code running here: looked up once per
    process (a ``git status`` per record added up over a job's many seeds)."""
    versions, commit = _running_code()
    return {"versions": dict(versions), "git_commit": commit}


def sha256sum(path: Path | str) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(**fields: Any) -> dict[str, Any]:
    """A provenance record: the given fields plus versions, commit, host and time."""
    return {
        **fields,
        **code_identity(),
        "host": platform.node(),
        # Which physical GPU and which cluster job, where a scheduler chose them; cuBLAS's
        # workspace setting, on which its determinism depends.
        "environment": {
            name: os.environ[name]
            for name in (
                "CUDA_VISIBLE_DEVICES",
                "SLURM_JOB_ID",
                "SLURM_JOB_NODELIST",
                "CUBLAS_WORKSPACE_CONFIG",
            )
            if name in os.environ
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A killed or failing writer leaves no file at ``path`` that looks finished.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes it private; results are not
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path | str, record: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_path
        tmp_path.chmod(0o777 & ~_umask())
        if path.exists():
            path.rmdir()  # Snakemake may have created it empty; a non-empty one is an error
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path)
