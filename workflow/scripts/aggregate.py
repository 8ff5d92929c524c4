"""Rule aggregate: the experiment's tables over seeds."""

from sparsebench.aggregate import sweep_files, write_tables

params, output = snakemake.params, snakemake.output
write_tables(
    [(arm, seed, sweep_files(folder, seed)[0]) for arm, seed, folder in params.sweeps],
    accuracy_csv=output.accuracy_csv,
    accuracy_md=output.accuracy_md,
    kept_csv=output.kept_csv,
    kept_md=output.kept_md,
    provenance_json=output.provenance_json,
    levels=params.levels,
    baseline_arm=params.baseline_arm,
    experiment=params.experiment,
    arm_order=params.arms,
)
