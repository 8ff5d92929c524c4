"""Weight decay: coupled L2 through the optimizer's ``weight_decay``.

As ``torch.optim.Adam(weight_decay=...)`` does it: the gradient of every
parameter (biases included) gets ``coefficient * w`` added before the Adam
moments. The logged value is the implied penalty ``0.5 * sum(w**2)`` of the
weight matrices.
"""

from torch import Tensor

from sparsebench.regularizers.base import Regularizer, register


@register
class WeightDecay(Regularizer):
    name = "weight_decay"
    description = "coupled L2 through the optimizer (Adam's weight_decay), all parameters"
    acts_through_loss = False

    def measure(self, weight: Tensor) -> Tensor:
        return 0.5 * weight.pow(2).flatten(1).sum(1)

    def optimizer_weight_decay(self) -> float:
        return self.coefficient
