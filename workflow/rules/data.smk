rule download:
    """The original MNIST files, MD5-verified (from `data_mirror` when set)."""
    output:
        [f"{DATA_DIR}/{name}" for name in MNIST_FILES],
    log:
        "logs/download.log",
    conda:
        CONDA_ENV
    params:
        mirror=config.get("data_mirror"),
        checksums=config.get("data_checksums") or None,
    script:
        "../scripts/download.py"
