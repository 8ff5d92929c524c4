"""Running the Snakemake workflow from tests: a tiny experiment in a temporary folder."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sparsebench.config import deep_merge

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def tiny_experiment(arms: Sequence[str] = ("none", "entropy"), seeds: int = 2) -> dict[str, Any]:
    """A protocol small enough for tests: 1 epoch on a few hundred images, 101 percentiles."""
    regularizers = {
        "none": [],
        "entropy": [{"name": "configuration_entropy", "coefficient": 1.0}],
        "weight_decay": [{"name": "weight_decay", "coefficient": 1.0e-4}],
    }
    return {
        "dataset": "mnist",
        "model": "lenet300",
        "seeds": seeds,
        "seeds_per_job": 2,
        "train": {"lr": 1.0e-3, "epochs": 1, "batch_size": 32, "eval_batch_size": 500},
        "prune": {"criteria": ["sensitivity", "magnitude", "random"], "percentile_step": 1.0},
        "report": {
            "baseline_arm": arms[0],
            "accuracy_levels": [20, 50, 80],
            "weight_figure_arms": list(arms[:2]),
            "weight_figure_seed": 0,
        },
        "arms": {arm: {"regularizers": regularizers[arm]} for arm in arms},
    }


def tiny_overlay(data_dir: Path, checksums: Mapping[str, str], **changes: Any) -> dict[str, Any]:
    """A config overlay that runs ``tiny_experiment`` on the data in ``data_dir``."""
    overlay = {
        "experiment": "tiny",
        "device": "cpu",
        "data_mirror": str(data_dir),
        "data_checksums": dict(checksums),
        "experiments": {"tiny": tiny_experiment()},
    }
    return deep_merge(overlay, changes)


def snakemake_command(
    workdir: Path, overlay: Mapping[str, Any] | None = None, *args: str
) -> list[str]:
    """The command that runs the repository's workflow in ``workdir`` with ``overlay``
    merged over config.yaml (the overlay is written to ``workdir/overlay.yaml``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    configfiles = [str(REPO / "config.yaml")]
    if overlay is not None:
        overlay_path = workdir / "overlay.yaml"
        overlay_path.write_text(yaml.safe_dump(dict(overlay), sort_keys=False))
        configfiles.append(str(overlay_path))
    return [
        str(SNAKEMAKE),
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        *configfiles,
        *args,
    ]


def run_snakemake(
    workdir: Path,
    overlay: Mapping[str, Any] | None = None,
    *args: str,
    check: bool = True,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """Run the repository's workflow in ``workdir`` with ``overlay`` merged over config.yaml."""
    command = snakemake_command(workdir, overlay, *args)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-6000:]}"
        )
    return result
