"""sparsebench: a reproducible benchmark of sparsity regularizers for neural networks."""

__version__ = "0.1.0"
