"""Rule aggregate: the experiment's tables over seeds."""

from sparsebench.aggregate import write_tables

params, output = snakemake.params, snakemake.output
entries = [(arm, seed) for arm in params.arms for seed in params.seeds]
write_tables(
    [(arm, seed, path) for (arm, seed), path in zip(entries, snakemake.input.sweeps, strict=True)],
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
