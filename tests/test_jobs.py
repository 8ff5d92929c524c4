"""Jobs that handle several seeds lose nothing they finished when they fail: a rerun goes on."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from sparsebench import jobs
from sparsebench.config import PruneHparams, TrainHparams

SETTINGS = {
    "model": "lenet300",
    "dataset": "mnist",
    "seeds": [4, 7],
    "train": vars(TrainHparams(lr=1e-3, epochs=3, batch_size=64, eval_batch_size=500)),
    "regularizers": [{"name": "configuration_entropy", "coefficient": 1.0}],
    "device": "cpu",
}
PRUNE_SETTINGS = {
    **SETTINGS,
    "prune": vars(PruneHparams(criteria=["sensitivity", "magnitude"], percentile_step=5.0)),
}


class Killed(RuntimeError):
    """Stands for a job killed part-way (a time limit, a lost node)."""


def train(data_dir: Path, out_dir: Path, **kwargs) -> None:
    jobs.run_train_job(
        data_dir, out_dir, out_dir.parent / "train.log", "x", "arm", SETTINGS, **kwargs
    )


def prune(data_dir: Path, trained: Path, out_dir: Path, settings=PRUNE_SETTINGS) -> None:
    jobs.run_prune_job(
        data_dir, trained, out_dir, out_dir.parent / "prune.log", "x", "arm", settings
    )


def killed_after_epoch(epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next train job dies once ``epoch`` is logged (before its checkpoint is saved)."""
    real = jobs.train_networks

    def dying(*args, on_epoch, **kwargs):
        def logged_then_killed(done: int, records) -> None:
            on_epoch(done, records)
            if done == epoch:
                raise Killed(f"killed after epoch {done}")

        return real(*args, on_epoch=logged_then_killed, **kwargs)

    monkeypatch.setattr(jobs, "train_networks", dying)


@pytest.fixture(scope="module")
def trained_straight(synthetic_mnist, tmp_path_factory) -> Path:
    """Both seeds trained for 3 epochs without a stop."""
    out = tmp_path_factory.mktemp("straight") / "train"
    train(synthetic_mnist.dir, out)
    return out


def test_a_killed_train_job_goes_on_from_its_checkpoint_to_the_same_numbers(
    synthetic_mnist, trained_straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "train"
    killed_after_epoch(2, monkeypatch)
    with pytest.raises(Killed):
        train(synthetic_mnist.dir, out, checkpoint_every_s=0.0)
    assert not out.exists()
    assert (jobs.partial_dir(out) / "checkpoint.pt").is_file()  # saved after epoch 1
    monkeypatch.undo()

    train(synthetic_mnist.dir, out)

    for seed in SETTINGS["seeds"]:
        resumed, straight = out / f"seed{seed}", trained_straight / f"seed{seed}"
        a = torch.load(resumed / "weights.pt")
        b = torch.load(straight / "weights.pt")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        logged = pd.read_csv(resumed / "log.csv").drop(columns="seconds")
        pd.testing.assert_frame_equal(
            logged, pd.read_csv(straight / "log.csv").drop(columns="seconds")
        )
        assert list(logged["epoch"]) == [1, 2, 3]
        assert json.loads((resumed / "metadata.json").read_text())["resumed_after_epoch"] == 1
    assert "going on after epoch 1" in (tmp_path / "train.log").read_text()


def test_a_train_job_killed_once_done_gives_its_output_again_without_training(
    synthetic_mnist, trained_straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its time limit struck as it wrote its output: Snakemake deletes the output.
    out = tmp_path / "train"
    train(synthetic_mnist.dir, out)
    shutil.rmtree(out)
    checkpoint = torch.load(jobs.partial_dir(out) / "checkpoint.pt", weights_only=True)
    epochs_run: list[int] = []
    real = jobs.train_networks

    def counting(*args, on_epoch, **kwargs):
        def count(epoch: int, records) -> None:
            epochs_run.append(epoch)
            on_epoch(epoch, records)

        return real(*args, on_epoch=count, **kwargs)

    monkeypatch.setattr(jobs, "train_networks", counting)
    train(synthetic_mnist.dir, out)

    assert epochs_run == []
    meta = json.loads((out / "seed7" / "metadata.json").read_text())
    assert meta["resumed_after_epoch"] == 3
    # The training time is the first attempt's (all 3 epochs), not the rerun's few moments.
    epoch_seconds = pd.read_csv(out / "seed7" / "log.csv")["seconds"].sum()
    assert checkpoint["train_seconds"] >= epoch_seconds
    assert meta["train_seconds_for_job"] == pytest.approx(
        checkpoint["train_seconds"] + meta["train_seconds_this_attempt"]
    )
    a = torch.load(out / "seed7" / "weights.pt")
    b = torch.load(trained_straight / "seed7" / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight_log = pd.read_csv(trained_straight / "seed7" / "log.csv")
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "seed7" / "log.csv").drop(columns="seconds"),
        straight_log.drop(columns="seconds"),
    )


def wait_until(
    ready: Callable[[], bool], job: subprocess.Popen, what: str, seconds: float = 120
) -> None:
    """Poll ``ready()`` until it holds; fail if ``job`` ends first (before ``what``) or time
    runs out."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert job.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.02)


# A train job in its own process, pausing a second after each logged epoch so that the
# test's signal lands between two epochs.
TRAIN_WITH_PAUSES = """
import json, sys, time
from pathlib import Path
from sparsebench import jobs

def with_pauses(*args, on_epoch, _train=jobs.train_networks, **kwargs):
    def logged_then_paused(epoch, records):
        on_epoch(epoch, records)
        time.sleep(1.0)
    return _train(*args, on_epoch=logged_then_paused, **kwargs)

jobs.train_networks = with_pauses
data_dir, out_dir, log_path, settings = sys.argv[1:]
jobs.run_train_job(Path(data_dir), Path(out_dir), Path(log_path), "x", "arm", json.loads(settings))
"""


@pytest.mark.parametrize(
    "signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)
def test_a_train_job_asked_to_stop_saves_its_epoch_and_the_rerun_goes_on_from_there(
    signal_number: int, synthetic_mnist, trained_straight: Path, tmp_path: Path
) -> None:
    # A cluster's time limit or scancel (SIGTERM), Ctrl-C (SIGINT); the checkpoint interval
    # (5 minutes) is far off.
    out, log_path = tmp_path / "train", tmp_path / "train.log"
    arguments = [str(synthetic_mnist.dir), str(out), str(log_path), json.dumps(SETTINGS)]
    job = subprocess.Popen([sys.executable, "-c", TRAIN_WITH_PAUSES, *arguments])

    def first_epoch_logged() -> bool:
        return log_path.exists() and '"epoch": 1,' in log_path.read_text()

    wait_until(first_epoch_logged, job, "its first epoch")
    job.send_signal(signal_number)
    assert job.wait(timeout=120) != 0

    name = signal.Signals(signal_number).name
    stopped = re.search(rf"stopped by {name} after epoch (\d+)", log_path.read_text())
    assert stopped is not None
    epoch = int(stopped.group(1))
    assert 1 <= epoch < SETTINGS["train"]["epochs"]
    assert not out.exists()
    log_path.unlink()  # as Snakemake does before it reruns a job

    train(synthetic_mnist.dir, out)

    # The rerun's log tells the whole story: the stop, then where it went on.
    logged = log_path.read_text()
    assert 0 <= logged.find(stopped.group(0)) < logged.find(f"going on after epoch {epoch}")
    assert not jobs.attempts_log(out).exists()
    for seed in SETTINGS["seeds"]:
        a = torch.load(out / f"seed{seed}" / "weights.pt")
        b = torch.load(trained_straight / f"seed{seed}" / "weights.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_more_sigterms_wait_for_the_epoch_but_a_second_ctrl_c_stops_at_once() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with jobs.stop_requests("at the next safe point") as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # SLURM's time limit sends it more than once
        assert stop.signal_name == "SIGTERM"
    with jobs.stop_requests("at the next safe point") as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        with pytest.raises(jobs.JobStopped, match="second SIGINT"):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_checkpoint_made_with_other_settings_is_not_taken_up(
    synthetic_mnist, trained_straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "train"
    other = {**SETTINGS, "train": {**SETTINGS["train"], "lr": 5e-3}}
    killed_after_epoch(2, monkeypatch)
    with pytest.raises(Killed):
        jobs.run_train_job(
            synthetic_mnist.dir,
            out,
            tmp_path / "train.log",
            "x",
            "arm",
            other,
            checkpoint_every_s=0.0,
        )
    monkeypatch.undo()

    train(synthetic_mnist.dir, out)  # the original settings: starts over

    assert "ignoring" in (tmp_path / "train.log").read_text()
    meta = json.loads((out / "seed4" / "metadata.json").read_text())
    assert meta["resumed_after_epoch"] is None
    a = torch.load(out / "seed4" / "weights.pt")
    b = torch.load(trained_straight / "seed4" / "weights.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_prune_job_sweeps_only_the_networks_it_had_not_finished(
    synthetic_mnist, trained_straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = tmp_path / "straight"
    prune(synthetic_mnist.dir, trained_straight, straight)

    swept: list[int] = []
    real = jobs.sweep_networks

    def second_network_killed(models, criteria, percentiles, train, test, seeds):
        swept.extend(seeds)
        if 7 in seeds:
            raise Killed("killed in the sweep of seed 7")
        return real(models, criteria, percentiles, train, test, seeds)

    monkeypatch.setattr(jobs, "sweep_networks", second_network_killed)
    out = tmp_path / "prune"
    with pytest.raises(Killed):
        prune(synthetic_mnist.dir, trained_straight, out)
    assert not out.exists()
    kept = sorted(p.name for p in jobs.partial_dir(out).iterdir())
    assert kept == ["attempts.log", "seed4.csv", "seed4.json"]
    (tmp_path / "prune.log").unlink()  # as Snakemake does before it reruns a job

    monkeypatch.setattr(jobs, "sweep_networks", lambda *args: swept.extend(args[-1]) or real(*args))
    prune(synthetic_mnist.dir, trained_straight, out)

    assert swept == [4, 7, 7]  # seed 4 was not swept again
    logged = (tmp_path / "prune.log").read_text()
    assert 0 <= logged.find("swept seeds [4]") < logged.find("seed 4: its sweep from an earlier")
    assert not jobs.partial_dir(out).exists()
    for name in ("seed4.csv", "seed7.csv"):
        assert (out / name).read_bytes() == (straight / name).read_bytes()
    assert json.loads((out / "seed4.json").read_text())["seed"] == 4


# A prune job in its own process that marks the start of each network's sweep with a file
# and pauses a second there, so that the test's signal lands while that sweep is running.
PRUNE_WITH_PAUSES = """
import json, sys, time
from pathlib import Path
from sparsebench import jobs

def with_pauses(*args, _sweep=jobs.sweep_networks):
    Path(sys.argv[5], f"sweeping{args[-1]}").touch()
    time.sleep(1.0)
    return _sweep(*args)

jobs.sweep_networks = with_pauses
data_dir, trained, out_dir, log_path, _, settings = sys.argv[1:]
jobs.run_prune_job(
    Path(data_dir), Path(trained), Path(out_dir), Path(log_path), "x", "arm", json.loads(settings)
)
"""


@pytest.mark.parametrize("stopped_in", [4, 7], ids=["first sweep", "last sweep"])
def test_a_prune_job_asked_to_stop_saves_the_sweep_in_progress(
    stopped_in: int, synthetic_mnist, trained_straight: Path, tmp_path: Path
) -> None:
    straight = tmp_path / "straight" / "prune"  # its log apart from the job's below
    prune(synthetic_mnist.dir, trained_straight, straight)
    out, log_path, marks = tmp_path / "prune", tmp_path / "prune.log", tmp_path / "marks"
    marks.mkdir()
    arguments = [synthetic_mnist.dir, trained_straight, out, log_path, marks]
    script = [sys.executable, "-c", PRUNE_WITH_PAUSES, *map(str, arguments)]
    job = subprocess.Popen([*script, json.dumps(PRUNE_SETTINGS)])
    wait_until((marks / f"sweeping[{stopped_in}]").exists, job, f"the sweep of seed {stopped_in}")
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) != 0

    # Even with every sweep done, no output: Snakemake, stopping too, would delete it.
    left = [7] if stopped_in == 4 else []
    assert f"stopped by SIGTERM with seeds {left} left to sweep" in log_path.read_text()
    assert not (marks / "sweeping[7]").exists() or stopped_in == 7
    assert not out.exists()
    kept = sorted(p.name for p in jobs.partial_dir(out).iterdir())
    done = [f"seed{seed}.{ext}" for seed in (4, 7) if seed <= stopped_in for ext in ("csv", "json")]
    assert kept == ["attempts.log", *done]

    prune(synthetic_mnist.dir, trained_straight, out)

    for seed in (4, 7) if stopped_in == 7 else (4,):
        assert f"seed {seed}: its sweep from an earlier run" in log_path.read_text()
    for name in ("seed4.csv", "seed7.csv"):
        assert (out / name).read_bytes() == (straight / name).read_bytes()


def test_the_prune_job_removes_the_last_checkpoint_of_the_train_job(
    synthetic_mnist, tmp_path: Path
) -> None:
    trained = tmp_path / "train"
    train(synthetic_mnist.dir, trained)
    assert (jobs.partial_dir(trained) / "checkpoint.pt").is_file()  # kept: see test above
    prune(synthetic_mnist.dir, trained, tmp_path / "prune")
    assert not jobs.partial_dir(trained).exists()


def test_a_finished_sweep_made_with_other_settings_is_swept_again(
    synthetic_mnist, trained_straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "prune"
    coarser = {**PRUNE_SETTINGS, "prune": {**PRUNE_SETTINGS["prune"], "percentile_step": 10.0}}
    real = jobs.sweep_networks

    def killed_at_seed_7(*args):
        if 7 in args[-1]:
            raise Killed("killed")
        return real(*args)

    monkeypatch.setattr(jobs, "sweep_networks", killed_at_seed_7)
    with pytest.raises(Killed):
        prune(synthetic_mnist.dir, trained_straight, out, coarser)
    monkeypatch.setattr(jobs, "sweep_networks", real)

    prune(synthetic_mnist.dir, trained_straight, out)  # the finer sweep: seed 4 redone

    assert len(pd.read_csv(out / "seed4.csv")) == 2 * 21
    assert "ignoring seed 4's sweep" in (tmp_path / "prune.log").read_text()


def test_finished_work_is_taken_up_on_another_gpu_of_the_same_kind(monkeypatch) -> None:
    # A retry on a cluster may land on another GPU index, or on another kind of device.
    names = {"cuda": "NVIDIA H200", "cpu": "x86_64"}
    monkeypatch.setattr(jobs, "device_description", lambda d: f"{d} ({names[d.type]})")
    key = {name: jobs.resume_key(SETTINGS, torch.device(name)) for name in ("cuda:0", "cuda:1")}
    assert key["cuda:0"] == key["cuda:1"]
    assert jobs.resume_key(SETTINGS, torch.device("cpu")) != key["cuda:0"]
    assert jobs.resume_key(SETTINGS, torch.device("cuda:0"), weights="abc") != key["cuda:0"]
