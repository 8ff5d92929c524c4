"""Rule train: one job trains the seeds of its chunk together and writes each seed's files."""

from pathlib import Path

from sparsebench.jobs import run_train_job

run_train_job(
    data_dir=Path(snakemake.input[0]).parent,
    out_dir=Path(snakemake.output[0]),
    log_path=Path(snakemake.log[0]),
    experiment=snakemake.params.experiment,
    arm=snakemake.params.arm,
    settings=snakemake.params.settings,
    threads=snakemake.threads,
)
