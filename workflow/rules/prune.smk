rule prune:
    """The pruning sweep of one trained network: one CSV, all criteria."""
    input:
        data=rules.download.output,
        trained=lambda wc: train_dir_of_seed(wc.experiment, wc.arm, wc.seed),
    output:
        sweep=SWEEP_CSV,
        metadata=SWEEP_CSV.replace(".csv", ".json"),
    log:
        "logs/{experiment}/{arm}/prune_seed{seed}.log",
    conda:
        CONDA_ENV
    threads: RESOURCES.get("threads", 1)
    resources:
        gpu=gpus_per_job(),
        mem_mb=RESOURCES.get("prune_mem_mb", 4000),
        runtime=RESOURCES.get("prune_minutes", 30),
    params:
        settings=prune_settings,
        experiment=lambda wc: wc.experiment,
        arm=lambda wc: wc.arm,
    script:
        "../scripts/prune.py"
