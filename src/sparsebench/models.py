"""Networks whose parameters are stacked over K independently seeded copies.

The training engine trains K seeds of one arm at once: every weight matrix is a
tensor of shape ``(K, out, in)`` and a forward pass is a batched matmul. Each copy
is initialised from its own seed exactly as ``nn.Linear`` initialises itself
(uniform in ``±1/sqrt(fan_in)`` for weights and biases), and
:meth:`StackedMLP.network_state_dict` gives one copy as a plain ``nn.Linear``-style
state dict (``fc1.weight``, ``fc1.bias``, ...), the format written to disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable


class _StackedAffine(torch.autograd.Function):
    """``bias + x W^T`` for stacked ``x`` (K, B, in), ``W`` (K, out, in), ``bias`` (K, out).

    Autograd through ``baddbmm(bias, x, W.transpose(1, 2))`` computes the gradient of the
    transposed view, ``x^T g``, and then copies it into ``W``'s layout: an extra pass over
    every weight each step (on an H200 at K = 64, copies were 28 % of a step's GPU work; on
    this project's 2-core CPU, 4 stacked seeds train an epoch 1.28x faster without it).
    Here the weight gradient is ``g^T x``, made in ``W``'s layout; the values are the same
    (bitwise, on the CPU).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        grad_x = torch.bmm(grad, weight) if needs_x else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if needs_weight else None
        return grad_x, grad_weight, grad.sum(1) if needs_bias else None


def stacked_affine(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``bias + x W^T`` per stacked copy: ``x`` (K, B, in), ``weight`` (K, out, in), ``bias``
    (K, out) -> (K, B, out)."""
    return _StackedAffine.apply(x, weight, bias)


class StackedLinear(nn.Module):
    """K independent ``nn.Linear(in_features, out_features)`` layers stacked."""

    def __init__(self, num_networks: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_networks, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_networks, out_features))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` of shape (K, B, in), or (B, in) shared by all K networks -> (K, B, out)."""
        if x.dim() == 2:
            return torch.matmul(x, self.weight.transpose(1, 2)) + self.bias.unsqueeze(1)
        return stacked_affine(x, self.weight, self.bias)


class StackedMLP(nn.Module):
    """A ReLU multilayer perceptron, K copies stacked; layers named fc1, fc2, ..."""

    def __init__(self, layer_sizes: Sequence[int], num_networks: int) -> None:
        super().__init__()
        self.layer_sizes = tuple(layer_sizes)
        self.num_networks = num_networks
        self.layers = nn.ModuleDict(
            {
                f"fc{i + 1}": StackedLinear(num_networks, fan_in, fan_out)
                for i, (fan_in, fan_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:]))
            }
        )

    def forward(self, x: Tensor) -> Tensor:
        """Inputs (K, B, features), or (B, features) shared by all -> logits (K, B, classes)."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers.values()):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return x

    def weight_matrices(self) -> dict[str, Tensor]:
        """The stacked weight matrices (K, out, in) by layer name; biases excluded."""
        return {name: layer.weight for name, layer in self.layers.items()}

    @torch.no_grad()
    def initialise(self, seeds: Sequence[int]) -> None:
        """Initialise copy k from ``seeds[k]`` alone, like ``nn.Linear``'s default init."""
        if len(seeds) != self.num_networks:
            raise ValueError(f"{len(seeds)} seeds for {self.num_networks} stacked networks")
        for k, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(int(seed))
            for layer in self.layers.values():
                bound = 1.0 / math.sqrt(layer.in_features)
                w = torch.empty(layer.out_features, layer.in_features).uniform_(
                    -bound, bound, generator=generator
                )
                b = torch.empty(layer.out_features).uniform_(-bound, bound, generator=generator)
                layer.weight[k].copy_(w)
                layer.bias[k].copy_(b)

    def network_state_dict(self, k: int) -> dict[str, Tensor]:
        """Copy k as an ``nn.Linear``-style state dict on the CPU."""
        state = {}
        for name, layer in self.layers.items():
            state[f"{name}.weight"] = layer.weight[k].detach().cpu().clone()
            state[f"{name}.bias"] = layer.bias[k].detach().cpu().clone()
        return state

    @torch.no_grad()
    def load_network_state_dicts(self, states: Sequence[Mapping[str, Tensor]]) -> None:
        """Load one state dict per stacked copy (the inverse of :meth:`network_state_dict`)."""
        if len(states) != self.num_networks:
            raise ValueError(f"{len(states)} state dicts for {self.num_networks} networks")
        for name, layer in self.layers.items():
            for k, state in enumerate(states):
                layer.weight[k].copy_(state[f"{name}.weight"])
                layer.bias[k].copy_(state[f"{name}.bias"])


def lenet300(num_networks: int = 1) -> StackedMLP:
    """LeNet-300-100: 784-300-100-10 with ReLU (LeCun et al. 1998)."""
    return StackedMLP((784, 300, 100, 10), num_networks)


ModelFactory = Callable[[int], StackedMLP]

MODELS: dict[str, ModelFactory] = {"lenet300": lenet300}


def build_model(name: str, seeds: Sequence[int], device: torch.device | str = "cpu") -> StackedMLP:
    """The registered model ``name`` with one copy per seed, each initialised from its seed."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None
    model = factory(len(seeds))
    model.initialise(seeds)
    return model.to(device)
