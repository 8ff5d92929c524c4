"""Configuration entropy, the prose's reading: an ablation arm that minimises ``+H_C``.

The configuration-entropy paper's formula defines its right-hand side as the
*negative* of the sparsity loss, ``l_C(W) = -H_C(W)``; that is the paper arm
``configuration_entropy`` (:class:`ConfigurationEntropy`). Its prose, however,
speaks of minimising ``H_C``, the opposite sign. The two readings train very
differently, so the benchmark runs both as separately named arms and never
swaps one for the other silently. This arm adds ``coefficient * sum_layers
H_C(W)`` to the training loss. The math (and its fast kernel) is the paper
arm's, from :mod:`sparsebench.regularizers.configuration_entropy`; conv
weights arrive from the engine as ``(K, out, in*kh*kw)``.
"""

from typing import ClassVar

from sparsebench.regularizers.base import register
from sparsebench.regularizers.configuration_entropy import ConfigurationEntropy


@register
class ConfigurationEntropyProse(ConfigurationEntropy):
    """Ablation arm, the prose's reading: per layer ``+H_C(W)`` (minimise the entropy)."""

    name = "configuration_entropy_prose"
    description = "configuration entropy, prose reading (ablation): coefficient * sum_layers H_C(W)"
    sign: ClassVar[float] = 1.0  # measure = +H_C; everything else is the paper arm's
