rule aggregate:
    """Median/min/max over seeds, and the kept count reaching each accuracy level."""
    input:
        sweeps=lambda wc: sweep_dirs(wc.experiment),
    output:
        accuracy_csv=report(
            f"{TABLES}/accuracy_vs_kept.csv",
            caption="../report/accuracy_vs_kept_table.rst",
            category="Tables",
        ),
        accuracy_md=f"{TABLES}/accuracy_vs_kept.md",
        kept_csv=report(
            f"{TABLES}/kept_at_accuracy.csv",
            caption="../report/kept_at_accuracy.rst",
            category="Tables",
        ),
        kept_md=f"{TABLES}/kept_at_accuracy.md",
        provenance_json=f"{TABLES}/tables.json",
    log:
        "logs/{experiment}/aggregate.log",
    conda:
        CONDA_ENV
    params:
        arms=lambda wc: list(EXPERIMENTS[wc.experiment].arms),
        sweeps=lambda wc: sweep_entries(wc.experiment),
        levels=lambda wc: list(EXPERIMENTS[wc.experiment].report.accuracy_levels),
        baseline_arm=lambda wc: EXPERIMENTS[wc.experiment].report.baseline_arm,
        experiment=lambda wc: wc.experiment,
    script:
        "../scripts/aggregate.py"
