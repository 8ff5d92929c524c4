"""Rule figures: SPEC figures 1-3 of one experiment."""

import pandas as pd

from sparsebench.figures import plot_accuracy_vs_kept, plot_entropy_matrices, plot_weight_matrices
from sparsebench.jobs import seed_dir

params, output = snakemake.params, snakemake.output
plot_entropy_matrices(output.entropy_matrices_png, output.entropy_matrices_svg)
plot_weight_matrices(
    {
        arm: seed_dir(folder, params.seed) / "weights.pt"
        for arm, folder in zip(params.arms, snakemake.input.trained, strict=True)
    },
    output.weight_matrices_png,
    output.weight_matrices_svg,
)
plot_accuracy_vs_kept(
    pd.read_csv(snakemake.input.summary),
    output.accuracy_vs_kept_png,
    output.accuracy_vs_kept_svg,
    arm_order=params.arm_order,
    levels=params.levels,
)
