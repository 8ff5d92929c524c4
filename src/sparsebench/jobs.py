"""One pipeline job each: read inputs, call the library, write outputs atomically.

The Snakemake rule scripts are one call into here, so every job is testable (and
usable) without Snakemake.

A job that handles several seeds keeps what it has finished in a folder beside its output
(:func:`partial_dir`): a train job its latest checkpoint, a prune job each finished sweep.
Snakemake deletes a failed job's output, not that folder, so a rerun (a retry after a time
limit, say) goes on from there, when it is for the same settings, inputs, code and device,
and gives the same numbers as an uninterrupted run. A prune job's folder goes once its
output is in place. A train job's last checkpoint stays until the prune job of its networks
has run: a train job killed as it ends (its time limit reached while its output was being
written) would otherwise lose everything, since Snakemake then deletes the output.
The job's log lines are kept there too (:func:`attempts_log`): Snakemake deletes a job's log
before it reruns the job, so the rerun's log starts with the earlier attempts' lines.

A train job asked to stop (SIGTERM: a cluster's time limit or ``scancel``; SIGINT: Ctrl-C)
finishes its current epoch, saves a checkpoint and exits with :class:`JobStopped`, so it
loses at most that epoch whatever the checkpoint interval (a cluster's grace period before
SIGKILL, SLURM's ``KillWait``, must be longer than an epoch); a second Ctrl-C stops it at
once. A prune job asked to stop saves the sweep in progress first (on a GPU, that of the group
of networks swept together, which may take longer than a cluster's grace period).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
import torch

from sparsebench import regularizers
from sparsebench.aggregate import sweep_files
from sparsebench.config import PruneHparams, TrainHparams
from sparsebench.data import load_mnist
from sparsebench.devices import claim_device
from sparsebench.models import build_model
from sparsebench.provenance import (
    atomic_directory,
    atomic_path,
    code_identity,
    device_description,
    provenance,
    sha256sum,
    write_text_atomic,
)
from sparsebench.prune import sweep_networks
from sparsebench.train import EpochRecord, TrainProgress, train_networks

log = logging.getLogger("sparsebench")

#: A train job saves a checkpoint after an epoch once this long has passed since the last.
CHECKPOINT_EVERY_S = 300.0

#: Networks a prune job sweeps in one go, by device type: on a GPU their sweeps share every
#: kernel launch (as many at once as half the free memory holds, :func:`prune.sweeps_at_once`:
#: 64 LeNet300s x 3 criteria on the 10,000 test images need about 8.4 GB); on a CPU one
#: after another, each saved as soon as it is done.
NETWORKS_SWEPT_TOGETHER = {"cpu": 1, "cuda": 64}


class JobStopped(RuntimeError):
    """A job stopped by a signal; what it had finished is kept for its rerun."""


class StopRequest:
    """Whether the job was asked to stop (SIGTERM, SIGINT) and by which signal: noted for the
    job to stop at its next safe point (``safe_point`` says which, for the log). A second
    SIGINT (Ctrl-C twice) stops it at once; more SIGTERMs do not (SLURM sends the job a time
    limit's SIGTERM more than once)."""

    def __init__(self, safe_point: str) -> None:
        self.signal_name: str | None = None
        self.safe_point = safe_point

    def on_signal(self, number: int, frame: object) -> None:
        name = signal.Signals(number).name
        if self.signal_name is None:
            self.signal_name = name
            log.warning("%s received: stopping %s", name, self.safe_point)
        elif number == signal.SIGINT:
            raise JobStopped(f"stopped at once by a second {name}")

    def stop_job(self, where: str) -> NoReturn:
        """End the job at its safe point: log that it stops and ``where`` (after what, and
        what a rerun does), then raise :class:`JobStopped`."""
        message = f"stopped by {self.signal_name} {where}"
        log.error(message)
        raise JobStopped(message)


@contextlib.contextmanager
def stop_requests(safe_point: str) -> Iterator[StopRequest]:
    """SIGTERM and SIGINT noted in a :class:`StopRequest` while the block runs (the handlers
    before it are put back after). Off the main thread, which signals never reach, nothing
    is caught."""
    request = StopRequest(safe_point)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    before = {s: signal.signal(s, request.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def _log_to(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        handlers=[logging.FileHandler(path) for path in paths],
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        force=True,
    )


def _start_job(threads: int, log_path: Path, out_dir: Path) -> None:
    """Set the job's thread count and log to ``log_path`` and to a copy beside its partial
    work (see :func:`attempts_log`); a rerun's log starts with the earlier attempts' lines."""
    torch.set_num_threads(max(1, int(threads)))
    earlier = attempts_log(out_dir)
    fresh_log = not log_path.is_file() or log_path.stat().st_size == 0
    if fresh_log and earlier.is_file():
        log_path.parent.mkdir(parents=True, exist_ok=True)
        header = f"(the earlier attempts of this job, kept in {earlier})\n"
        log_path.write_text(header + earlier.read_text())
    _log_to(log_path, earlier)


def _end_job(log_path: Path, out_dir: Path) -> None:
    """The job's output is in place: its log's copy for reruns goes."""
    _log_to(log_path)
    attempts_log(out_dir).unlink(missing_ok=True)


def seed_dir(train_dir: Path, seed: int) -> Path:
    """Where one seed's files lie inside its train job's folder."""
    return Path(train_dir) / f"seed{int(seed)}"


def partial_dir(out_dir: Path | str) -> Path:
    """Where a job keeps what it has finished until its whole output is in place."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.partial")


def attempts_log(out_dir: Path | str) -> Path:
    """Every attempt's log lines, kept until the job's output is in place: Snakemake deletes a
    job's log before it reruns the job."""
    return partial_dir(out_dir) / "attempts.log"


def resume_key(settings: Mapping[str, Any], device: torch.device, **inputs: str) -> str:
    """What finished work must have been made with to be taken up by a rerun: the job's
    settings, kind of device (not its index: a retry may get another GPU of the same kind),
    code and package versions, and its inputs' checksums."""
    made_with = {
        "settings": settings,
        "device": device_description(device).replace(str(device), device.type, 1),
        "code": code_identity(),
        "inputs": inputs,
    }
    text = json.dumps(made_with, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _load_checkpoint(path: Path, key: str) -> tuple[TrainProgress, float] | None:
    """The training state saved at ``path`` if it was made under ``key``, with the seconds
    of training it took (over all attempts)."""
    if not path.exists():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.pop("resume_key", None) != key:
        log.info("ignoring %s: made with other settings, inputs, code or device", path)
        return None
    seconds = float(checkpoint.pop("train_seconds"))
    return TrainProgress.from_checkpoint(checkpoint), seconds


def _save_checkpoint(path: Path, key: str, progress: TrainProgress, seconds: float) -> None:
    with atomic_path(path) as tmp:
        torch.save({**progress.as_checkpoint(), "resume_key": key, "train_seconds": seconds}, tmp)


def _seed_record(
    job: tuple[str, str, str, Sequence[int], Mapping[str, Any], str], seed: int, **fields: Any
) -> str:
    """One network's provenance, as JSON text, from a job (its stage, experiment, arm, seeds,
    settings and device) that handled several seeds."""
    stage, experiment, arm, seeds, settings, device = job
    record = provenance(
        stage=stage,
        experiment=experiment,
        arm=arm,
        seed=seed,
        seeds_in_job=list(seeds),
        settings=dict(settings),
        device=device,
        **fields,
    )
    return json.dumps(record, indent=2, default=str)


def run_train_job(
    data_dir: Path,
    out_dir: Path,
    log_path: Path,
    experiment: str,
    arm: str,
    settings: Mapping[str, Any],
    threads: int = 1,
    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
) -> None:
    """Train the seeds in ``settings['seeds']`` together; write each seed's folder.

    Every epoch is appended to ``log_path`` as it finishes, so a failing run (a NaN
    loss, say) keeps what it had computed. A checkpoint is saved after an epoch every
    ``checkpoint_every_s`` seconds, and after the current one when SIGTERM or SIGINT asks
    the job to stop (:class:`JobStopped` then); a rerun goes on from it (see the module's
    notes). The metadata's ``train_seconds_for_job`` is the training the networks took over
    all attempts (each earlier one up to the checkpoint that was taken up),
    ``train_seconds_this_attempt`` the last attempt's.
    """
    _start_job(threads, log_path, out_dir)
    hparams = TrainHparams(**settings["train"])
    seeds = [int(s) for s in settings["seeds"]]
    regs = [regularizers.build(spec) for spec in settings["regularizers"]]

    def on_epoch(epoch: int, records: list[EpochRecord]) -> None:
        for seed, record in zip(seeds, records):
            log.info("seed %d %s", seed, json.dumps(record.as_row()))

    checkpoint = partial_dir(out_dir) / "checkpoint.pt"
    # Signals are caught once the device is claimed: a job still waiting for a GPU just ends.
    stopping_point = "at the end of this epoch, after a checkpoint"
    with claim_device(settings["device"]) as device, stop_requests(stopping_point) as stop:
        log.info("experiment %s arm %s seeds %s on %s", experiment, arm, seeds, device)
        device_name = device_description(device)
        key = resume_key(settings, device)
        resume_from, seconds_before = _load_checkpoint(checkpoint, key) or (None, 0.0)
        if resume_from is not None:
            log.info("going on after epoch %d, from %s", resume_from.epoch, checkpoint)
        data = load_mnist(data_dir, hparams.train_samples, hparams.subset_seed, device)
        started = last_saved = time.perf_counter()

        def on_checkpoint(progress: TrainProgress) -> None:
            nonlocal last_saved
            done = progress.epoch == hparams.epochs
            stopping = stop.signal_name is not None and not done
            if done or stopping or time.perf_counter() - last_saved >= checkpoint_every_s:
                so_far = seconds_before + time.perf_counter() - started
                _save_checkpoint(checkpoint, key, progress, so_far)
                last_saved = time.perf_counter()
            if stopping:
                stop.stop_job(
                    f"after epoch {progress.epoch}; a rerun goes on from its checkpoint "
                    f"{checkpoint}"
                )

        model, logs = train_networks(
            settings["model"],
            seeds,
            regs,
            hparams,
            data.train,
            data.test,
            device,
            on_epoch=on_epoch,
            on_checkpoint=on_checkpoint,
            resume_from=resume_from,
        )
        seconds = time.perf_counter() - started

    with atomic_directory(out_dir) as tmp:
        for k, seed in enumerate(seeds):
            folder = seed_dir(tmp, seed)
            folder.mkdir()
            torch.save(model.network_state_dict(k), folder / "weights.pt")
            pd.DataFrame([r.as_row() for r in logs[k]]).to_csv(folder / "log.csv", index=False)
            record = _seed_record(
                ("train", experiment, arm, seeds, settings, device_name),
                seed,
                train_seconds_for_job=seconds_before + seconds,
                train_seconds_this_attempt=seconds,
                resumed_after_epoch=None if resume_from is None else resume_from.epoch,
                final_test_accuracy=logs[k][-1].test_accuracy,
                train_samples=len(data.train),
            )
            (folder / "metadata.json").write_text(record)
    _end_job(log_path, out_dir)


def _finished_sweep(folder: Path, seed: int, key: str) -> pd.DataFrame | None:
    """A seed's sweep in ``folder`` (a prune job's partial folder) if it was made under
    ``key``."""
    csv, metadata = sweep_files(folder, seed)
    if not (csv.exists() and metadata.exists()):
        return None
    if json.loads(metadata.read_text()).get("resume_key") != key:
        log.info(
            "ignoring seed %d's sweep in %s: made with other settings, inputs, code or device",
            seed,
            folder,
        )
        return None
    return pd.read_csv(csv)


def run_prune_job(
    data_dir: Path,
    trained_dir: Path,
    out_dir: Path,
    log_path: Path,
    experiment: str,
    arm: str,
    settings: Mapping[str, Any],
    threads: int = 1,
) -> dict[int, pd.DataFrame]:
    """Sweep the networks of ``settings['seeds']`` (a train job's) over every criterion and
    percentile in this one process (the device claimed and the data loaded once): on a CPU
    one after another, on a GPU up to :data:`NETWORKS_SWEPT_TOGETHER` at once; write each
    seed's CSV and provenance into ``out_dir``.

    Each sweep is saved as soon as it (or its group) is done (in :func:`partial_dir`), so a
    rerun after a failure sweeps only the networks that were not yet done. Asked to stop
    (SIGTERM, SIGINT), the job saves the sweep in progress and exits with :class:`JobStopped`.
    """
    _start_job(threads, log_path, out_dir)
    seeds = [int(s) for s in settings["seeds"]]
    train_hparams = TrainHparams(**settings["train"])
    prune_hparams = PruneHparams(**{**settings["prune"], "criteria": settings["prune"]["criteria"]})
    partial = partial_dir(out_dir)
    frames: dict[int, pd.DataFrame | None] = {}
    stopping_point = "once the sweep in progress is saved"
    with claim_device(settings["device"]) as device, stop_requests(stopping_point) as stop:
        device_name = device_description(device)
        data = load_mnist(data_dir, train_hparams.train_samples, train_hparams.subset_seed, device)
        weights = {seed: seed_dir(trained_dir, seed) / "weights.pt" for seed in seeds}
        keys = {}
        for seed in seeds:
            keys[seed] = resume_key(settings, device, weights=sha256sum(weights[seed]))
            frames[seed] = _finished_sweep(partial, seed, keys[seed])
            if frames[seed] is not None:
                log.info("seed %d: its sweep from an earlier run, in %s", seed, partial)
        pending = [seed for seed in seeds if frames[seed] is None]
        together = NETWORKS_SWEPT_TOGETHER.get(device.type, 1)

        def stop_if_asked(left: list[int]) -> None:
            # Also once every sweep is done: Snakemake, itself stopping, would count an output
            # written now as incomplete and delete it, and the rerun would sweep all again.
            if stop.signal_name is not None:
                stop.stop_job(
                    f"with seeds {left} left to sweep; a rerun takes up the finished sweeps in "
                    f"{partial}"
                )

        for start in range(0, len(pending), together):
            stop_if_asked(pending[start:])
            group = pending[start : start + together]
            models = []
            for seed in group:
                model = build_model(settings["model"], [seed], device)
                model.load_network_state_dicts([torch.load(weights[seed], map_location=device)])
                models.append(model)
            started = time.perf_counter()
            swept = sweep_networks(
                models,
                prune_hparams.criteria,
                prune_hparams.percentiles(),
                data.train,
                data.test,
                group,
            )
            seconds = (time.perf_counter() - started) / len(group)
            log.info("swept seeds %s in %.1f s each on %s", group, seconds, device)
            for seed, frame in zip(group, swept):
                trained = json.loads((seed_dir(trained_dir, seed) / "metadata.json").read_text())
                unpruned = frame.loc[frame["percentile"] == 0.0, "test_accuracy"]
                record = _seed_record(
                    ("prune", experiment, arm, seeds, settings, device_name),
                    seed,
                    sweep_seconds=seconds,
                    networks_swept_together=len(group),
                    trained_with=trained,
                    unpruned_test_accuracy=float(unpruned.iloc[0]),
                    final_test_accuracy_in_training=trained["final_test_accuracy"],
                    resume_key=keys[seed],
                )
                csv, metadata = sweep_files(partial, seed)
                with atomic_path(csv) as tmp:
                    frame.to_csv(tmp, index=False)
                write_text_atomic(metadata, record)  # last: it marks the sweep as finished
                frames[seed] = frame
        stop_if_asked([])

    with atomic_directory(out_dir) as tmp:
        for seed in seeds:
            for done, final in zip(sweep_files(partial, seed), sweep_files(tmp, seed)):
                shutil.copyfile(done, final)
    _end_job(log_path, out_dir)
    shutil.rmtree(partial)
    shutil.rmtree(partial_dir(trained_dir), ignore_errors=True)  # the train job's checkpoint
    return frames
