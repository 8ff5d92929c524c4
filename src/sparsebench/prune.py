"""The pruning sweep: rank every weight by a criterion and prune along percentiles.

For each percentile p = 0, step, ..., 100 the ``round(n p / 100)`` lowest-ranked of
the ``n`` weights (all weight matrices together; biases are neither pruned nor
counted) are set to zero and the test accuracy is recorded with the kept counts.
Ranks break ties by position (layer order, then row-major index), so the kept set
at a percentile is exactly "the weights scoring above the p-th percentile" and is
well defined with ties.

Criteria: ``sensitivity`` |w dL/dw| with L the plain cross-entropy over the
training set (the paper's), ``magnitude`` |w| and ``random`` (baselines).

Two implementations give the same sweep: :func:`sweep_reference` evaluates each
pruned network from scratch; :func:`sweep_fast` walks the percentiles in order and
updates the first layer's pre-activations incrementally as its weights drop out
(it holds most of the weights), recomputing only the small layers above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from sparsebench.data import Split
from sparsebench.models import StackedMLP

Scores = dict[str, Tensor]  # layer name -> score per weight, shaped like the weight matrix


def sensitivity_scores(model: StackedMLP, train: Split, batch_size: int = 10000) -> Scores:
    """|w * dL/dw| for network 0 of ``model``, L the mean cross-entropy over ``train``."""
    model.zero_grad(set_to_none=True)
    n = len(train.labels)
    for start in range(0, n, batch_size):
        logits = model(train.images[start : start + batch_size])[0]
        loss = F.cross_entropy(logits, train.labels[start : start + batch_size], reduction="sum")
        (loss / n).backward()
    scores = {
        name: (w[0] * w.grad[0]).abs().detach() for name, w in model.weight_matrices().items()
    }
    model.zero_grad(set_to_none=True)
    return scores


def magnitude_scores(model: StackedMLP) -> Scores:
    return {name: w[0].detach().abs() for name, w in model.weight_matrices().items()}


def random_scores(model: StackedMLP, seed: int) -> Scores:
    generator = torch.Generator().manual_seed(7_919 * int(seed) + 13)
    return {
        name: torch.rand(w.shape[1:], generator=generator).to(w.device)
        for name, w in model.weight_matrices().items()
    }


def criterion_scores(
    criterion: str, model: StackedMLP, train: Split, seed: int, batch_size: int = 10000
) -> Scores:
    """The scores of ``criterion`` (sensitivity, magnitude or random) for network 0."""
    scorers: dict[str, Callable[[], Scores]] = {
        "sensitivity": lambda: sensitivity_scores(model, train, batch_size),
        "magnitude": lambda: magnitude_scores(model),
        "random": lambda: random_scores(model, seed),
    }
    if criterion not in scorers:
        raise ValueError(f"unknown pruning criterion {criterion!r}; known: {sorted(scorers)}")
    return scorers[criterion]()


def removal_counts(total: int, percentiles: Sequence[float]) -> list[int]:
    """How many of ``total`` weights are pruned at each percentile (round half up)."""
    return [min(total, math.floor(total * p / 100.0 + 0.5)) for p in percentiles]


def pruning_order(scores: Mapping[str, Tensor]) -> Tensor:
    """Flat indices into the concatenated weights, lowest score (pruned first) first."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    return torch.argsort(flat, stable=True)


def _record(kept: Sequence[int], names: Sequence[str], p: float, accuracy: float) -> dict:
    row: dict[str, float | int] = {"percentile": p, "kept_total": int(sum(kept))}
    row.update({f"kept_{name}": int(count) for name, count in zip(names, kept)})
    row["test_accuracy"] = accuracy
    return row


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * int((logits.argmax(-1) == labels).sum()) / len(labels)


def kept_masks(
    scores: Mapping[str, Tensor], percentile: float, order: Tensor | None = None
) -> dict[str, Tensor]:
    """Boolean masks of the weights kept at ``percentile``, by layer."""
    order = pruning_order(scores) if order is None else order
    (removed,) = removal_counts(len(order), [percentile])
    keep = torch.ones(len(order), dtype=torch.bool, device=order.device)
    keep[order[:removed]] = False
    masks, offset = {}, 0
    for name, layer_scores in scores.items():
        masks[name] = keep[offset : offset + layer_scores.numel()].view_as(layer_scores)
        offset += layer_scores.numel()
    return masks


@torch.no_grad()
def sweep_reference(
    model: StackedMLP, scores: Mapping[str, Tensor], percentiles: Sequence[float], test: Split
) -> pd.DataFrame:
    """Evaluate network 0 pruned at every percentile, each from scratch (slow, simple)."""
    names = list(model.weight_matrices())
    originals = {name: w[0].clone() for name, w in model.weight_matrices().items()}
    ordered_scores = {n: scores[n] for n in names}
    order = pruning_order(ordered_scores)
    rows = []
    try:
        for p in percentiles:
            masks = kept_masks(ordered_scores, p, order)
            for name in names:
                model.layers[name].weight[0].copy_(originals[name] * masks[name])
            kept = [int(masks[name].sum()) for name in names]
            rows.append(_record(kept, names, p, _accuracy(model(test.images)[0], test.labels)))
    finally:
        for name in names:
            model.layers[name].weight[0].copy_(originals[name])
    return pd.DataFrame(rows)


@torch.no_grad()
def sweep_fast(
    model: StackedMLP, scores: Mapping[str, Tensor], percentiles: Sequence[float], test: Split
) -> pd.DataFrame:
    """The same sweep as :func:`sweep_reference`, reusing work between percentiles.

    Works in the transposed (features x samples) layout so that dropping weight
    (i, j) of the first layer is a row update ``z1[i] -= w_ij * x[j]``.
    """
    names = list(model.weight_matrices())
    weights = [model.layers[n].weight[0].clone() for n in names]
    biases = [model.layers[n].bias[0].unsqueeze(1) for n in names]
    sizes = [w.numel() for w in weights]
    bounds = torch.tensor(sizes, device=weights[0].device).cumsum(0)
    order = pruning_order({n: scores[n] for n in names})
    x_t = test.images.t().contiguous()  # (in, N)
    z1_t = torch.addmm(biases[0], weights[0], x_t)  # (out1, N)
    kept = list(sizes)
    rows, done = [], 0
    for p, removed in zip(percentiles, removal_counts(sum(sizes), percentiles)):
        dropped = order[done:removed]
        done = removed
        layer_of = torch.bucketize(dropped, bounds, right=True)
        for i, w in enumerate(weights):
            local = dropped[layer_of == i] - (bounds[i - 1] if i else 0)
            if local.numel() == 0:
                continue
            kept[i] -= local.numel()
            if i == 0:
                rows_, cols = local // w.shape[1], local % w.shape[1]
                z1_t.index_add_(0, rows_, x_t[cols] * w[rows_, cols].neg().unsqueeze(1))
            w.view(-1)[local] = 0.0
        h = z1_t
        for w, b in zip(weights[1:], biases[1:]):
            h = torch.addmm(b, w, torch.relu(h))
        rows.append(_record(kept, names, p, _accuracy(h.t(), test.labels)))
    return pd.DataFrame(rows)


def sweep(
    model: StackedMLP,
    criteria: Sequence[str],
    percentiles: Sequence[float],
    train: Split,
    test: Split,
    seed: int,
    fast: bool = True,
) -> pd.DataFrame:
    """The whole sweep of network 0 for every criterion: one frame, a ``criterion`` column."""
    run = sweep_fast if fast else sweep_reference
    frames = []
    for criterion in criteria:
        scores = criterion_scores(criterion, model, train, seed)
        frame = run(model, scores, percentiles, test)
        frame.insert(0, "criterion", criterion)
        frames.append(frame)
    return pd.DataFrame(pd.concat(frames, ignore_index=True))
