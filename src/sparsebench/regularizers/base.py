"""The regularizer plug-in interface and its registry.

A regularizer is one file in this package that defines one subclass of
:class:`Regularizer` decorated with :func:`register`. Experiments name it in
``config.yaml``; no stage of the pipeline knows any regularizer by name.

Every regularizer works on *stacked* weights: the training engine trains K seeds
at once, so each weight matrix arrives as a tensor of shape ``(K, out, in)`` and
every per-network quantity is returned as a tensor of shape ``(K,)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

_REGISTRY: dict[str, type[Regularizer]] = {}


class UnknownRegularizerError(KeyError):
    """Raised when a config names a regularizer that no plug-in registers."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Regularizer:
    """Base class of a sparsity regularizer acting on stacked weight matrices.

    A subclass overrides what it needs:

    - :meth:`measure`: the regularizer's own quantity per layer (``(K,)`` per
      layer), logged every epoch and, unless :attr:`acts_through_loss` is false,
      added to the training loss as ``coefficient * sum over layers``;
    - :meth:`optimizer_weight_decay`: a coupled L2 coefficient handed to the
      optimizer;
    - :meth:`after_step`: an in-place update after every optimizer step (e.g. a
      proximal operator);
    - :meth:`writes_gradient` and :meth:`add_loss_gradient`: a closed-form gradient
      of the loss term added to ``.grad`` directly, instead of through autograd.

    ``layers`` restricts the regularizer to the named weight matrices (all of
    them when ``None``). Extra keyword ``options`` are rejected unless the
    subclass lists them in :attr:`options`.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    acts_through_loss: ClassVar[bool] = True
    supports_batching: ClassVar[bool] = True
    options: ClassVar[Mapping[str, object]] = {}

    def __init__(
        self,
        coefficient: float = 1.0,
        layers: Sequence[str] | None = None,
        **options: object,
    ) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"regularizer {self.name!r} got unknown option(s) {unknown}; "
                f"it accepts {sorted(self.options) or 'none'}"
            )
        self.coefficient = float(coefficient)
        self.layers = None if layers is None else tuple(layers)
        self.settings = {**self.options, **options}

    def select(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The weight matrices this regularizer acts on, by layer name."""
        if self.layers is None:
            return dict(weights)
        missing = [name for name in self.layers if name not in weights]
        if missing:
            raise ValueError(
                f"regularizer {self.name!r} names layer(s) {missing}; "
                f"the model has {sorted(weights)}"
            )
        return {name: weights[name] for name in self.layers}

    def measure(self, weight: Tensor) -> Tensor:
        """The regularizer's quantity for stacked matrices ``(K, out, in)``, shape ``(K,)``."""
        return torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype)

    def value(self, weights: Mapping[str, Tensor]) -> Tensor:
        """Sum of :meth:`measure` over the selected layers, shape ``(K,)``; unscaled."""
        per_layer = [self.measure(w) for w in self.select(weights).values()]
        return torch.stack(per_layer).sum(0)

    def loss_term(self, weights: Mapping[str, Tensor]) -> Tensor | None:
        """What this regularizer adds to each network's training loss, ``(K,)``, or None."""
        if not self.acts_through_loss or self.coefficient == 0.0:
            return None
        return self.coefficient * self.value(weights)

    def writes_gradient(self, weights: Mapping[str, Tensor]) -> bool:
        """Whether the engine should call :meth:`add_loss_gradient` for these weights
        instead of putting :meth:`loss_term` through autograd (default: no)."""
        return False

    def add_loss_gradient(self, weights: Mapping[str, Tensor]) -> Tensor:
        """Add the gradient of :meth:`loss_term` to each selected weight's ``.grad`` in
        place and return the term, ``(K,)``, detached.

        Called after the backward pass of the rest of the loss, only where
        :meth:`writes_gradient` is true. Like the optimizer's coupled weight decay, it
        spares autograd a node (and a gradient buffer to allocate and sum) per step.
        """
        raise NotImplementedError(f"regularizer {self.name!r} acts through autograd only")

    def optimizer_weight_decay(self) -> float:
        """Coupled L2 coefficient this regularizer asks the optimizer for."""
        return 0.0

    @torch.no_grad()
    def after_step(self, weights: Mapping[str, Tensor], lr: float) -> None:
        """In-place update of the selected weights after each optimizer step (default: none)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(coefficient={self.coefficient}, layers={self.layers})"


def register(cls: type[Regularizer]) -> type[Regularizer]:
    """Class decorator: make ``cls`` available to configs under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__name__} must set a class attribute 'name'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"two regularizers register the name {name!r}")
    _REGISTRY[name] = cls
    return cls


def registered() -> dict[str, type[Regularizer]]:
    """All registered regularizers, by name."""
    return dict(_REGISTRY)


def get(name: str) -> type[Regularizer]:
    """The regularizer class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownRegularizerError(
            f"unknown regularizer {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def build(spec: Mapping[str, object]) -> Regularizer:
    """Instantiate a regularizer from its config entry ``{name, coefficient, layers, ...}``."""
    spec = dict(spec)
    name = spec.pop("name")
    return get(str(name))(**spec)
