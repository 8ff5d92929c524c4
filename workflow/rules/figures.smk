rule figures:
    """SPEC figures 1-3 as PNG (in the report) and SVG."""
    input:
        summary=f"{TABLES}/accuracy_vs_kept.csv",
        trained=weight_figure_dirs,
    output:
        **{
            f"{name}_png": report(
                f"{FIGURES}/{name}.png",
                caption=f"../report/{name}.rst",
                category="Figures",
            )
            for name in FIGURE_NAMES
        },
        **{f"{name}_svg": f"{FIGURES}/{name}.svg" for name in FIGURE_NAMES},
    log:
        "logs/{experiment}/figures.log",
    conda:
        CONDA_ENV
    params:
        arms=lambda wc: list(EXPERIMENTS[wc.experiment].report.weight_figure_arms),
        seed=lambda wc: EXPERIMENTS[wc.experiment].report.weight_figure_seed,
        arm_order=lambda wc: list(EXPERIMENTS[wc.experiment].arms),
        levels=lambda wc: list(EXPERIMENTS[wc.experiment].report.accuracy_levels),
    script:
        "../scripts/figures.py"
