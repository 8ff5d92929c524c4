"""Rule download: the original MNIST files, MD5-verified, from the mirror or the network."""

import logging
from pathlib import Path

from sparsebench.data import fetch_mnist

logging.basicConfig(filename=snakemake.log[0], level=logging.INFO)
fetch_mnist(
    Path(snakemake.output[0]).parent,
    mirror=snakemake.params.mirror,
    checksums=snakemake.params.checksums,
)
