"""Rule prune: the pruning sweeps of one train job's networks."""

from pathlib import Path

from sparsebench.jobs import run_prune_job

run_prune_job(
    data_dir=Path(snakemake.input.data[0]).parent,
    trained_dir=Path(snakemake.input.trained),
    out_dir=Path(snakemake.output[0]),
    log_path=Path(snakemake.log[0]),
    experiment=snakemake.params.experiment,
    arm=snakemake.params.arm,
    settings=snakemake.params.settings,
    threads=snakemake.threads,
)
