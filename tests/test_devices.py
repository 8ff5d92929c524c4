"""Device selection and the GPU pool, tested with a fake device count (no GPU needed)."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from sparsebench import devices
from sparsebench.devices import DeviceBusyError, claim_device, device_type, resolve_device
from sparsebench.provenance import provenance


@pytest.fixture(autouse=True)
def _no_visible_devices(monkeypatch):
    # Lock names follow CUDA_VISIBLE_DEVICES; start every test without it.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_fake_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# --- resolve_device -----------------------------------------------------------


def test_auto_is_cpu_without_cuda(no_cuda):
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_is_cuda_with_cuda(two_fake_gpus):
    assert resolve_device("auto") == torch.device("cuda")


def test_cpu_and_spelling(no_cuda):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:", "tpu", "mps0", ""])
def test_unknown_device_is_named(bad):
    with pytest.raises(ValueError, match="unknown device") as info:
        resolve_device(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("request_", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(no_cuda, request_):
    with pytest.raises(RuntimeError, match="CUDA is not available") as info:
        resolve_device(request_)
    assert "cpu" in str(info.value)


def test_explicit_index(two_fake_gpus):
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match="only 2 GPU"):
        resolve_device("cuda:2")


def test_device_type_plans_without_the_device(no_cuda):
    # A login node without GPUs plans `cuda` jobs for the GPU nodes.
    assert device_type("cuda") == "cuda"
    assert device_type("cuda:3") == "cuda"
    assert device_type("cpu") == "cpu"
    assert device_type("auto") == "cpu"
    with pytest.raises(ValueError, match="'gpu'"):
        device_type("gpu")


def test_device_type_auto_with_cuda(two_fake_gpus):
    assert device_type("auto") == "cuda"


def test_planning_does_not_import_torch():
    # The Snakefile calls device_type on every parse (once per cluster job, too).
    code = (
        "import sys; from sparsebench.devices import device_type; "
        "assert device_type('cuda:1') == 'cuda' and device_type('cpu') == 'cpu'; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- claim_device: no pool ------------------------------------------------------


def test_cpu_bypasses_the_pool(tmp_path, no_cuda):
    with claim_device("cpu", lock_dir=tmp_path / "locks") as device:
        assert device == torch.device("cpu")
    with claim_device("auto", lock_dir=tmp_path / "locks") as device:
        assert device == torch.device("cpu")
    assert not (tmp_path / "locks").exists()


def test_auto_with_zero_fake_gpus_is_cpu(tmp_path):
    with claim_device("auto", lock_dir=tmp_path, device_count=0) as device:
        assert device == torch.device("cpu")
    with (
        pytest.raises(RuntimeError, match="CUDA is not available"),
        claim_device("cuda", lock_dir=tmp_path, device_count=0),
    ):
        pass


def test_claim_rejects_unknown_names(tmp_path):
    with (
        pytest.raises(ValueError, match="'cuda0'"),
        claim_device("cuda0", lock_dir=tmp_path, device_count=2),
    ):
        pass
    with (
        pytest.raises(RuntimeError, match="only 2 GPU"),
        claim_device("cuda:5", lock_dir=tmp_path, device_count=2),
    ):
        pass


def test_explicit_index_bypasses_a_full_pool(tmp_path):
    with (
        claim_device("cuda", lock_dir=tmp_path, device_count=2) as a,
        claim_device("cuda", lock_dir=tmp_path, device_count=2) as b,
    ):
        assert {a.index, b.index} == {0, 1}
        # The pool is full, yet explicit indices come at once, shared.
        t0 = time.monotonic()
        with claim_device("cuda:1", lock_dir=tmp_path, device_count=2, timeout=5) as c:
            assert c == torch.device("cuda", 1)
        with claim_device("cuda:1", lock_dir=tmp_path, device_count=2, timeout=5) as d:
            assert d == torch.device("cuda", 1)
        assert time.monotonic() - t0 < 1


# --- claim_device: determinism on a GPU --------------------------------------------


@pytest.mark.parametrize("requested", ["cuda", "cuda:1"])  # from the pool / explicit
def test_a_gpu_claim_fixes_cublas_workspace_and_records_it(tmp_path, monkeypatch, requested):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with claim_device(requested, lock_dir=tmp_path, device_count=2):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert provenance()["environment"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()  # torch's slower mode stays off


def test_a_workspace_setting_of_the_users_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with claim_device("cuda", lock_dir=tmp_path, device_count=1):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_cpu_claim_leaves_cublas_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with claim_device("auto", lock_dir=tmp_path, device_count=0):
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert "CUBLAS_WORKSPACE_CONFIG" not in provenance()["environment"]


# --- claim_device: the pool --------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4])
def test_concurrent_claims_get_distinct_gpus(tmp_path, n):
    barrier = threading.Barrier(n, timeout=10)
    got: list[int] = []
    errors: list[BaseException] = []

    def job():
        try:
            with claim_device("cuda", lock_dir=tmp_path, device_count=n, timeout=10) as device:
                got.append(device.index)
                barrier.wait()  # all n hold their GPU at the same time
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=job) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    assert sorted(got) == list(range(n))


def test_auto_uses_the_pool_when_gpus_are_visible(tmp_path):
    with claim_device("auto", lock_dir=tmp_path, device_count=1) as device:
        assert device == torch.device("cuda", 0)
        with (
            pytest.raises(DeviceBusyError),
            claim_device("auto", lock_dir=tmp_path, device_count=1, timeout=0.3),
        ):
            pass


def test_extra_claim_waits_until_one_is_released(tmp_path):
    n = 3
    release = [threading.Event() for _ in range(n)]
    held: dict[int, int] = {}
    holding = threading.Barrier(n + 1, timeout=10)

    def holder(i):
        with claim_device("cuda", lock_dir=tmp_path, device_count=n, timeout=10) as device:
            held[i] = device.index
            holding.wait()
            release[i].wait(10)

    holders = [threading.Thread(target=holder, args=(i,)) for i in range(n)]
    for t in holders:
        t.start()
    holding.wait()
    assert sorted(held.values()) == list(range(n))

    extra: list[int] = []

    def late():
        with claim_device(
            "cuda", lock_dir=tmp_path, device_count=n, timeout=10, poll_interval=0.05
        ) as device:
            extra.append(device.index)

    waiter = threading.Thread(target=late)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not extra, "the (N+1)th claim must wait"

    release[1].set()  # free holder 1's GPU
    waiter.join(10)
    assert extra == [held[1]]
    for e in release:
        e.set()
    for t in holders:
        t.join(10)


def test_timeout_names_the_holders(tmp_path):
    with claim_device("cuda", lock_dir=tmp_path, device_count=1) as device:
        assert device.index == 0
        t0 = time.monotonic()
        with (
            pytest.raises(DeviceBusyError, match="stayed claimed") as info,
            claim_device("cuda", lock_dir=tmp_path, device_count=1, timeout=0.4),
        ):
            pass
        assert 0.3 < time.monotonic() - t0 < 5
        assert f"pid {os.getpid()}" in str(info.value)
        assert "--resources gpu=" in str(info.value)
    # Released on exit, also after an error inside the block.
    with (
        pytest.raises(KeyError),
        claim_device("cuda", lock_dir=tmp_path, device_count=1, timeout=1),
    ):
        raise KeyError("boom")
    with claim_device("cuda", lock_dir=tmp_path, device_count=1, timeout=1) as device:
        assert device.index == 0


def test_locks_follow_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-1f2e")
    with (
        claim_device("cuda", lock_dir=tmp_path, device_count=2) as a,
        claim_device("cuda", lock_dir=tmp_path, device_count=2) as b,
    ):
        assert {a.index, b.index} == {0, 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-3.lock", "gpu-GPU-1f2e.lock"]


def _fake_real_gpus(monkeypatch, uuids):
    """torch reports len(uuids) GPUs with these UUIDs (no device_count override)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda index: types.SimpleNamespace(uuid=uuids[index]),
    )


def test_real_gpus_are_locked_by_uuid(tmp_path, monkeypatch):
    # Under SLURM with ConstrainDevices every job sees its own GPU as index 0.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    _fake_real_gpus(monkeypatch, ["11111111-aaaa"])
    with claim_device("cuda", lock_dir=tmp_path, timeout=1) as first:
        assert first == torch.device("cuda", 0)
        # Another job on the same node, another physical GPU, also "GPU 0": no wait.
        _fake_real_gpus(monkeypatch, ["22222222-bbbb"])
        with claim_device("cuda", lock_dir=tmp_path, timeout=1) as second:
            assert second == torch.device("cuda", 0)
        # The same physical GPU again: taken.
        _fake_real_gpus(monkeypatch, ["11111111-aaaa"])
        with (
            pytest.raises(DeviceBusyError),
            claim_device("cuda", lock_dir=tmp_path, timeout=0.3),
        ):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu-uuid-11111111-aaaa.lock",
        "gpu-uuid-22222222-bbbb.lock",
    ]


def test_real_gpus_without_uuid_fall_back_to_visible_ids(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    _fake_real_gpus(monkeypatch, ["x", "y"])

    def no_uuid(index):
        raise AttributeError("uuid")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_uuid)
    with (
        claim_device("cuda", lock_dir=tmp_path, timeout=1) as a,
        claim_device("cuda", lock_dir=tmp_path, timeout=1) as b,
    ):
        assert {a.index, b.index} == {0, 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-4.lock", "gpu-5.lock"]


def test_default_lock_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEBENCH_GPU_LOCK_DIR", str(tmp_path / "x"))
    assert devices.default_lock_dir() == tmp_path / "x"
    monkeypatch.delenv("SPARSEBENCH_GPU_LOCK_DIR")
    assert devices.default_lock_dir().name == "sparsebench-gpu-locks"


# --- across processes, as concurrent snakemake jobs are ----------------------------


def _claim_in_process(lock_dir: str, n: int, hold_s: float, out: str) -> None:
    with claim_device("cuda", lock_dir=Path(lock_dir), device_count=n, timeout=30) as device:
        Path(out).write_text(f"{device.index} {time.monotonic()}")
        time.sleep(hold_s)


def test_processes_get_distinct_gpus(tmp_path):
    ctx = multiprocessing.get_context("fork")
    n = 3
    procs = [
        ctx.Process(
            target=_claim_in_process, args=(str(tmp_path / "locks"), n, 1.0, str(tmp_path / f"{i}"))
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    indices = sorted(int((tmp_path / f"{i}").read_text().split()[0]) for i in range(n))
    assert indices == list(range(n))


def test_a_killed_holder_frees_its_gpu(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out = tmp_path / "held"
    proc = ctx.Process(target=_claim_in_process, args=(str(tmp_path), 1, 60.0, str(out)))
    proc.start()
    deadline = time.monotonic() + 20
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.exists()
    with (
        pytest.raises(DeviceBusyError),
        claim_device("cuda", lock_dir=tmp_path, device_count=1, timeout=0.2),
    ):
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with claim_device("cuda", lock_dir=tmp_path, device_count=1, timeout=5) as device:
        assert device.index == 0


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")
def test_numba_threads_follow_torch_and_leave_its_count_alone() -> None:
    # numba's first launch in a process resets OpenMP's thread count, which torch shares:
    # in a fresh interpreter, a one-thread job must stay at one thread through it.
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "import numba\n"
        "from sparsebench.devices import numba_threads_like_torch\n"
        "with numba_threads_like_torch() as threads:\n"
        "    inside = (threads, numba.get_num_threads(), torch.get_num_threads())\n"
        "print(inside, torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 1, 1) 1"
