"""Rule prune: the pruning sweep of one trained network."""

from pathlib import Path

from sparsebench.jobs import run_prune_job

run_prune_job(
    data_dir=Path(snakemake.input.data[0]).parent,
    trained_dir=Path(snakemake.input.trained),
    sweep_csv=Path(snakemake.output.sweep),
    metadata_json=Path(snakemake.output.metadata),
    log_path=Path(snakemake.log[0]),
    experiment=snakemake.params.experiment,
    arm=snakemake.params.arm,
    settings=snakemake.params.settings,
    threads=snakemake.threads,
)
