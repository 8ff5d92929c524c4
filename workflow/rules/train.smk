rule train:
    """K seeds of one arm trained together: per seed weights.pt, log.csv, metadata.json."""
    input:
        rules.download.output,
    output:
        directory(TRAIN_DIR),
    log:
        "logs/{experiment}/{arm}/train_{chunk}.log",
    conda:
        CONDA_ENV
    threads: RESOURCES.get("threads", 1)
    resources:
        gpu=gpus_per_job(),
        mem_mb=RESOURCES.get("train_mem_mb", 4000),
        runtime=train_runtime_minutes,
    params:
        settings=train_settings,
        experiment=lambda wc: wc.experiment,
        arm=lambda wc: wc.arm,
    script:
        "../scripts/train.py"
