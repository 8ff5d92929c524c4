"""sparsebench: train under sparsity regularizers, prune, aggregate over seeds, plot.

snakemake --cores all                          # the configured experiment(s)
snakemake --cores all --config preset=quick    # a reduced run, minutes on a CPU
"""

from snakemake.utils import min_version

min_version("8.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/figures.smk"


localrules:
    all,
    download,
    aggregate,
    figures,


rule all:
    default_target: True
    input:
        all_targets(),
