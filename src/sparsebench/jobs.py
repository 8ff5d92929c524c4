"""One pipeline job each: read inputs, call the library, write outputs atomically.

The Snakemake rule scripts are one call into here, so every job is testable (and
usable) without Snakemake.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sparsebench import regularizers
from sparsebench.aggregate import sweep_files
from sparsebench.config import PruneHparams, TrainHparams
from sparsebench.data import load_mnist
from sparsebench.devices import claim_device
from sparsebench.models import build_model
from sparsebench.provenance import atomic_directory, device_description, provenance
from sparsebench.prune import sweep
from sparsebench.train import EpochRecord, train_networks

log = logging.getLogger("sparsebench")


def _configure(threads: int, log_path: Path) -> None:
    torch.set_num_threads(max(1, int(threads)))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=log_path, level=logging.INFO, format="%(asctime)s %(message)s", force=True
    )


def seed_dir(train_dir: Path, seed: int) -> Path:
    """Where one seed's files lie inside its train job's folder."""
    return Path(train_dir) / f"seed{int(seed)}"


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
) -> None:
    """Train the seeds in ``settings['seeds']`` together; write each seed's folder.

    Every epoch is appended to ``log_path`` as it finishes, so a failing run (a NaN
    loss, say) keeps what it had computed.
    """
    _configure(threads, log_path)
    hparams = TrainHparams(**settings["train"])
    seeds = [int(s) for s in settings["seeds"]]
    regs = [regularizers.build(spec) for spec in settings["regularizers"]]

    def on_epoch(epoch: int, records: list[EpochRecord]) -> None:
        for seed, record in zip(seeds, records):
            log.info("seed %d %s", seed, json.dumps(record.as_row()))

    with claim_device(settings["device"]) as device:
        log.info("experiment %s arm %s seeds %s on %s", experiment, arm, seeds, device)
        data = load_mnist(data_dir, hparams.train_samples, hparams.subset_seed, device)
        started = time.perf_counter()
        model, logs = train_networks(
            settings["model"], seeds, regs, hparams, data.train, data.test, device, on_epoch
        )
        seconds = time.perf_counter() - started
        device_name = device_description(device)

    with atomic_directory(out_dir) as tmp:
        for k, seed in enumerate(seeds):
            folder = seed_dir(tmp, seed)
            folder.mkdir()
            torch.save(model.network_state_dict(k), folder / "weights.pt")
            pd.DataFrame([r.as_row() for r in logs[k]]).to_csv(folder / "log.csv", index=False)
            record = _seed_record(
                ("train", experiment, arm, seeds, settings, device_name),
                seed,
                train_seconds_for_job=seconds,
                final_test_accuracy=logs[k][-1].test_accuracy,
                train_samples=len(data.train),
            )
            (folder / "metadata.json").write_text(record)


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
    percentile, one after another in this one process (the device claimed and the data
    loaded once); write each seed's CSV and provenance into ``out_dir``."""
    _configure(threads, log_path)
    seeds = [int(s) for s in settings["seeds"]]
    train_hparams = TrainHparams(**settings["train"])
    prune_hparams = PruneHparams(**{**settings["prune"], "criteria": settings["prune"]["criteria"]})
    frames, seconds = {}, {}
    with claim_device(settings["device"]) as device:
        data = load_mnist(data_dir, train_hparams.train_samples, train_hparams.subset_seed, device)
        for seed in seeds:
            weights = seed_dir(trained_dir, seed) / "weights.pt"
            model = build_model(settings["model"], [seed], device)
            model.load_network_state_dicts([torch.load(weights, map_location=device)])
            started = time.perf_counter()
            frames[seed] = sweep(
                model,
                prune_hparams.criteria,
                prune_hparams.percentiles(),
                data.train,
                data.test,
                seed,
            )
            seconds[seed] = time.perf_counter() - started
            log.info("swept seed %d in %.1f s on %s", seed, seconds[seed], device)
        device_name = device_description(device)

    with atomic_directory(out_dir) as tmp:
        for seed, frame in frames.items():
            trained = json.loads((seed_dir(trained_dir, seed) / "metadata.json").read_text())
            unpruned = frame.loc[frame["percentile"] == 0.0, "test_accuracy"]
            csv, metadata = sweep_files(tmp, seed)
            frame.to_csv(csv, index=False)
            record = _seed_record(
                ("prune", experiment, arm, seeds, settings, device_name),
                seed,
                sweep_seconds=seconds[seed],
                trained_with=trained,
                unpruned_test_accuracy=float(unpruned.iloc[0]),
                final_test_accuracy_in_training=trained["final_test_accuracy"],
            )
            metadata.write_text(record)
    return frames
