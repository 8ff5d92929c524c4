"""The process environment that the workflow hands to its jobs."""

from __future__ import annotations

import os
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def export_source_path() -> None:
    """Put this checkout's ``src`` on PYTHONPATH, for jobs that run in a fresh environment.

    A job of ``snakemake --sdm conda`` (or on a cluster node) runs in an environment where
    sparsebench is not installed; the variable lets its rule script import it from here.
    """
    paths = [str(SOURCE_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
