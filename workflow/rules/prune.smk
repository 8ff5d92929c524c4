rule prune:
    """The pruning sweeps of one train job's networks: per seed a CSV (all criteria) and its
    provenance JSON, in one process (the device claimed and the data loaded once)."""
    input:
        data=rules.download.output,
        trained=TRAIN_DIR,
    output:
        directory(SWEEP_DIR),
    log:
        "logs/{experiment}/{arm}/prune_{chunk}.log",
    conda:
        CONDA_ENV
    threads: RESOURCES.get("threads", 1)
    resources:
        gpu=gpus_per_job(),
        mem_mb=RESOURCES.get("prune_mem_mb", 4000),
        runtime=prune_runtime_minutes,
    params:
        settings=prune_settings,
        experiment=lambda wc: wc.experiment,
        arm=lambda wc: wc.arm,
    script:
        "../scripts/prune.py"
