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
pruned network from scratch; :func:`sweep_fast` walks the percentiles in order,
updates the first layer's pre-activations incrementally as its weights drop out
(it holds most of the weights), re-evaluates the layers above it only for the samples
whose prediction a cheap bound cannot certify while few need it, and from then on
updates the next layer for all samples with one matrix product per percentile (see
"The fast sweep" below).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from sparsebench.data import Split
from sparsebench.devices import numba_threads_like_torch
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


# --------------------------------------------------------------------------------------------
# The fast sweep.
#
# The percentiles are walked in order ("steps"); at each step some weights drop out.
#
# First layer (most of the weights): its pre-activations z1 (units x samples) are updated in
# place, ``z1[i] -= w_ij * x[j]`` for every dropped weight (i, j).
#
# The layers above (the "head") are not re-evaluated at every step. Each sample keeps a
# reference first-layer output ``ref`` (its relu(z1) at its last refresh), the first head
# layer's pre-activations ``z2`` computed exactly from ``ref`` with the current weights (its
# drops are applied at once, ``z2[r] -= w_ri * ref[i]``), and a snapshot of the layers above
# (the logits) from its last refresh, to which output-layer drops are applied exactly. The true
# logits differ from the stored ones by at most, for any two classes t and c,
#
#     |d(logit_t - logit_c)| <= sum_i v_i |relu(z1_i) - ref_i|  +  sum_drops coef * |w| * input
#
# (relu is 1-Lipschitz; ``v_i = max_{t,c} (|W_L[t] - W_L[c]| |W_{L-1}| ... |W_2|)_i`` from the
# head weights at the start of each block of steps, valid for the sparser heads that follow;
# the second sum covers the hidden-layer drops since the refresh, with coefficients from the
# unpruned weights). Each sample carries this "slack", updated as rows of z1 and head weights
# change. While it stays below the lead of the predicted class over the runner-up (over the
# label when the prediction is wrong: what counts is whether the label wins), the stored hit or
# miss is certainly the pruned network's; otherwise the sample is refreshed: ``z2`` gets
# ``W2[:, i] (relu(z1_i) - ref_i)`` for the units that moved since its last refresh (lazy and
# sparse), the layers above are recomputed, ``ref`` takes the current values. A chunk refreshes
# the samples that need it at a step together (gathered, sample by sample in the inner loops: a
# sample's units lie a row apart, so one sample at a time costs a cache miss per unit); when many
# need it (low margins, high sparsity), the whole chunk, in row passes. Hits and misses are thus
# those of the pruned network at every percentile, up to float rounding: near ties (within a
# relative 2e-5) are always refreshed, but the refreshed values carry the rounding that the
# incremental updates accumulate (the torch path's too: on LeNet300 about 2e-5 in z1 and z2 by the
# end of the sweep, against 1e-6 from scratch), so a sample whose true logit margin is that small
# may be counted either way.
#
# The exact tail. Once a share ``_SWEEP_EXACT_AT`` of the predictions needs a refresh at every
# step (high sparsity, small margins; for a random order, almost at once), certifying costs
# more than recomputing: from the end of that segment of steps on, ``z2`` is kept exact for
# every sample, ``z2 += W2[:, rows] (relu(z1[rows]) - previous)`` over the units each step
# moved, one BLAS matrix product per step, and the small layers above are re-evaluated.
#
# The CPU path is numba (chunks of samples in parallel, each chunk walking a segment of steps
# per call) with torch's BLAS for the exact tail; without numba, on other devices and for
# other dtypes, a torch path updates z1 incrementally and re-evaluates the head at every step
# (for many networks and orders at once on a GPU: :func:`sweep_fast_together`).

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; keep the fallback honest
    numba = None

_SWEEP_CHUNK = 512  # samples per chunk (the parallel unit)
_SWEEP_BLOCK = 16  # steps per block: the bound v is recomputed per block
_SWEEP_TOGETHER = _SWEEP_CHUNK // 8  # from this many refreshes in a chunk, refresh it all
_SWEEP_SEGMENT = 32  # steps per call of the certified kernels (the exact tail may start after)
_SWEEP_EXACT_AT = 0.05  # from this share of predictions refreshed per step: the exact tail
_numba_sweep_broken = False


def _step_of_rank(count: int, removed: Sequence[int]) -> np.ndarray:
    """For each rank k < ``count`` in the pruning order, the first step whose (ascending)
    removal count exceeds k: the step at which that weight drops (``len(removed)``: never)."""
    return np.searchsorted(np.asarray(removed, dtype=np.int64), np.arange(count), side="right")


def _layer_and_local(starts: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For flat indices into the concatenated weights (layer ``l`` from ``starts[l]``): each
    one's layer and its index within that layer."""
    layer = np.searchsorted(starts, flat, side="right") - 1
    return layer, flat - starts[layer]


def _sweep_schedule(
    weights: Sequence[Tensor], order: Tensor, removed: Sequence[int]
) -> dict[str, np.ndarray]:
    """The drops of each step, as flat numpy arrays (CSR-like, by step)."""
    sizes = np.array([w.numel() for w in weights], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    steps = len(removed)
    order_np = order.cpu().numpy()
    drop_step = np.empty(len(order_np), dtype=np.int64)
    drop_step[order_np] = _step_of_rank(len(order_np), removed)
    flat = order_np[drop_step[order_np] < steps]
    step = drop_step[flat]
    layer, local = _layer_and_local(starts, flat)
    # First layer: by step, then row; one group per (step, row).
    first = layer == 0
    key = step[first] * sizes[0] + local[first]
    srt = np.argsort(key, kind="stable")
    s1, l1 = step[first][srt], local[first][srt]
    fan_in = weights[0].shape[1]
    r1, c1 = l1 // fan_in, l1 % fan_in
    new_group = np.ones(len(s1), dtype=bool)
    new_group[1:] = (s1[1:] != s1[:-1]) | (r1[1:] != r1[:-1])
    groups = np.flatnonzero(new_group)
    # Head layers: by step, then layer, then position.
    hl, hloc, hs = layer[~first] - 1, local[~first], step[~first]
    srt = np.lexsort((hloc, hl, hs))
    hl, hloc, hs = hl[srt], hloc[srt], hs[srt]
    fins = np.array([w.shape[1] for w in weights[1:]], dtype=np.int64)
    h_row = hloc // fins[hl] if len(hl) else hloc
    h_col = hloc % fins[hl] if len(hl) else hloc
    every = np.arange(steps + 1)
    return {
        "drop_step": drop_step,
        "starts": starts,
        "g_ptr": np.searchsorted(s1[groups], every, side="left").astype(np.int64),
        "g_row": r1[groups].astype(np.int64),
        "g_start": np.append(groups, len(s1)).astype(np.int64),
        "d_col": c1.astype(np.int64),
        "d_val": weights[0].cpu().numpy()[r1, c1].astype(np.float32),
        "h_ptr": np.searchsorted(hs, every, side="left").astype(np.int64),
        "h_layer": hl.astype(np.int64),
        "h_row": h_row.astype(np.int64),
        "h_col": h_col.astype(np.int64),
    }


def _head_bounds(
    head: Sequence[Tensor], drop_step: np.ndarray, starts: np.ndarray, steps: int, block: int
) -> np.ndarray:
    """Per block of steps and first-layer unit i, a v_i valid at every step of the block.

    ``v_i = max_{t,c} sum_k |W_L[t,k] - W_L[c,k]| (|W_{L-1}| ... |W_2|)[k, i]`` with the
    head weights at the block's start. Zeroing weights only shrinks the product of absolute
    values; an output weight dropping inside the block can grow a difference, so for those
    entries |a - b| is replaced by |a| + |b|.
    """
    begins = list(range(0, steps, block))
    out = np.empty((len(begins), head[0].shape[1]), dtype=np.float32)
    stamps = [
        torch.from_numpy(drop_step[starts[k + 1] : starts[k + 2]]).view(w.shape)
        for k, w in enumerate(head)
    ]
    dense = [w.detach().cpu().double() for w in head]
    for e, begin in enumerate(begins):
        end = min(begin + block, steps)
        masked = [w * (s >= begin) for w, s in zip(dense, stamps)]
        chain = None
        for w in masked[:-1]:
            chain = w.abs() if chain is None else w.abs() @ chain
        last = masked[-1]
        diff = (last[:, None, :] - last[None, :, :]).abs()
        moving = (stamps[-1] >= begin) & (stamps[-1] < end)
        either = moving[:, None, :] | moving[None, :, :]
        diff = torch.where(either, last.abs()[:, None, :] + last.abs()[None, :, :], diff)
        pairs = diff.flatten(0, 1)
        v = (pairs if chain is None else pairs @ chain).amax(0)
        out[e] = (v * (1.0 + 1e-5)).numpy()
    return out


if numba is not None:
    # Kernels index 2-D arrays directly (no row views passed around: a view costs two
    # atomic reference-count updates, more than a 128-sample row pass).
    _FM = {"contract"}
    _FM_DOT = {"contract", "reassoc"}  # lets the dot products of the refresh vectorise

    @njit(cache=True, fastmath=_FM)
    def _nb_slack(z1, ref, v, slack):  # pragma: no cover - compiled
        """slack[n] = sum_i v[i] |relu(z1[i, n]) - ref[i, n]|, from scratch."""
        zero = np.float32(0.0)
        columns = slack.size
        for n in range(columns):
            slack[n] = zero
        for i in range(z1.shape[0]):
            vi = v[i]
            if vi == zero:
                continue
            for n in range(columns):
                a = z1[i, n]
                a = a if a > zero else zero
                slack[n] += vi * abs(a - ref[i, n])

    @njit(cache=True, fastmath=_FM)
    def _nb_row_pass(z1, ref, slack, i, vi, x, ja, wa, jb, wb, jc, wc, mode):  # pragma: no cover
        """``z1[i] -= wa x[ja] + wb x[jb] + wc x[jc]``; mode 1 | 2 also takes the old value's
        ``vi |relu(z1[i]) - ref[i]|`` off the slack | puts the new one on (3: both)."""
        zero = np.float32(0.0)
        columns = slack.size
        if mode == 0:
            for n in range(columns):
                z1[i, n] -= wa * x[ja, n] + wb * x[jb, n] + wc * x[jc, n]
        elif mode == 3:
            for n in range(columns):
                old = z1[i, n]
                new = old - (wa * x[ja, n] + wb * x[jb, n] + wc * x[jc, n])
                z1[i, n] = new
                old = old if old > zero else zero
                new = new if new > zero else zero
                slack[n] += vi * (abs(new - ref[i, n]) - abs(old - ref[i, n]))
        elif mode == 1:
            for n in range(columns):
                old = z1[i, n]
                z1[i, n] = old - (wa * x[ja, n] + wb * x[jb, n] + wc * x[jc, n])
                old = old if old > zero else zero
                slack[n] -= vi * abs(old - ref[i, n])
        else:
            for n in range(columns):
                new = z1[i, n] - (wa * x[ja, n] + wb * x[jb, n] + wc * x[jc, n])
                z1[i, n] = new
                new = new if new > zero else zero
                slack[n] += vi * abs(new - ref[i, n])

    @njit(cache=True)
    def _nb_three_drops(d, end, d_col, d_val):  # pragma: no cover - compiled
        """Drops ``d`` to ``min(d + 3, end) - 1`` of a row as three (column, weight) pairs,
        padded with the first column at weight zero."""
        zero = np.float32(0.0)
        ja, wa = d_col[d], d_val[d]
        jb, wb, jc, wc = ja, zero, ja, zero
        if d + 1 < end:
            jb, wb = d_col[d + 1], d_val[d + 1]
        if d + 2 < end:
            jc, wc = d_col[d + 2], d_val[d + 2]
        return ja, wa, jb, wb, jc, wc

    @njit(cache=True)
    def _nb_first_layer(s, x, z1, ref, v, slack, lastchg, first_drops):  # pragma: no cover
        """Step ``s``'s first-layer drops, a row (unit) at a time, up to three drops a pass,
        keeping every sample's slack current."""
        g_ptr, g_row, g_start, d_col, d_val = first_drops
        zero = np.float32(0.0)
        for g in range(g_ptr[s], g_ptr[s + 1]):
            i = g_row[g]
            lastchg[i] = s
            first, end = g_start[g], g_start[g + 1]
            vi = v[i]
            d = first
            while d < end:
                ja, wa, jb, wb, jc, wc = _nb_three_drops(d, end, d_col, d_val)
                mode = 0
                if vi != zero:
                    mode = (1 if d == first else 0) + (2 if d + 3 >= end else 0)
                _nb_row_pass(z1, ref, slack, i, vi, x, ja, wa, jb, wb, jc, wc, mode)
                d += 3

    @njit(cache=True, fastmath=_FM)
    def _nb_head_drops(s, ref, z2, hz, slack, head, head_drops):  # pragma: no cover - compiled
        """Step ``s``'s head drops. The first head layer's pre-activations ``z2`` stay exact
        (at ``ref``); the output layer's drops are applied exactly to the stored logits (at
        the activations of each sample's last refresh); every other effect goes into the
        slack. Returns whether the stored logits changed."""
        w2t, wr, _, w_off, dims, z_off = head
        h_ptr, h_layer, h_row, h_col, h_val, h_coef = head_drops
        zero = np.float32(0.0)
        columns = slack.size
        heads = dims.size - 1
        changed = False
        for d in range(h_ptr[s], h_ptr[s + 1]):
            h = h_layer[d]
            r = h_row[d]
            i = h_col[d]
            if h == 0:
                w2t[i, r] = zero
            wr[w_off[h] + r * dims[h] + i] = zero
            w = h_val[d]
            c = h_coef[d]
            if w == zero:
                continue
            if h == 0:
                if heads == 1:
                    changed = True
                    for n in range(columns):
                        z2[r, n] -= w * ref[i, n]
                else:
                    for n in range(columns):
                        a = ref[i, n]
                        z2[r, n] -= w * a
                        slack[n] += c * a
            else:
                src = z_off[h - 1] + i
                if h == heads - 1:
                    changed = True
                    dst = z_off[h] + r
                    for n in range(columns):
                        a = hz[src, n]
                        hz[dst, n] -= w * (a if a > zero else zero)
                else:
                    for n in range(columns):
                        a = hz[src, n]
                        slack[n] += c * (a if a > zero else zero)
        return changed

    @njit(cache=True)
    def _nb_lead(best, second, top, label, at_label):  # pragma: no cover - compiled
        """What the slack must stay below for the sample's hit or miss to stand: a right
        prediction's lead over the runner-up; a wrong one's lead over the label (it may turn
        into another wrong one, which leaves the accuracy as it is)."""
        return best - second if top == label else best - at_label

    @njit(cache=True)
    def _nb_tolerance(best):  # pragma: no cover - compiled
        """The float tolerance of a sample's verdict: near ties, within a relative 2e-5 of
        its top logit, are always refreshed (see "The fast sweep")."""
        return np.float32(2e-5) * (np.float32(1.0) + abs(best))

    @njit(cache=True)
    def _nb_margins(logits, lo, classes, nvalid, labels, top, margin, tol):  # pragma: no cover
        """Per sample: the predicted class (first maximum), the lead to certify (see
        :func:`_nb_lead`), a float tolerance."""
        best = np.empty(nvalid, dtype=np.float32)
        second = np.full(nvalid, -np.inf, dtype=np.float32)
        for n in range(nvalid):
            best[n] = logits[lo, n]
            top[n] = 0
        for c in range(1, classes):
            for n in range(nvalid):
                a = logits[lo + c, n]
                if a > best[n]:
                    second[n] = best[n]
                    best[n] = a
                    top[n] = c
                elif a > second[n]:
                    second[n] = a
        for n in range(nvalid):
            margin[n] = _nb_lead(best[n], second[n], top[n], labels[n], logits[lo + labels[n], n])
            tol[n] = _nb_tolerance(best[n])

    @njit(cache=True, fastmath=_FM_DOT)
    def _nb_refresh_some(
        s, short, count, scratch, last, lastchg, first_drops, z1, ref, z2, hz, head, v, verdicts
    ):  # pragma: no cover - compiled
        """The samples ``picked[:count]`` of the chunk refreshed together: their head state
        made exact at their current first-layer output, and their verdicts (``top``,
        ``margin``, ``tol``) taken from it. ``scratch``: ``picked`` and buffers.

        Their ``z2`` columns are gathered into the rows of ``acc`` (count x units), get
        ``W2[:, i] (relu(z1[i]) - ref[i])`` for the units that moved since the earliest of
        their last refreshes (this step's rows alone when all were refreshed at the previous
        step; a unit that did not move since a sample's own refresh adds zero to it), and go
        back; the layers above are recomputed from them into the samples' snapshots.
        """
        g_ptr, g_row = first_drops[0], first_drops[1]
        w2t, wr, bias, w_off, dims, z_off = head
        picked, change, acc, spare = scratch
        labels, top, margin, tol = verdicts
        zero = np.float32(0.0)
        d2 = dims[1]
        heads = dims.size - 1
        since = s - 1
        for k in range(count):
            since = min(since, last[picked[k]])
        for r in range(d2):
            for k in range(count):
                acc[k, r] = z2[r, picked[k]]
        mine = short and since == s - 1
        units = g_ptr[s + 1] - g_ptr[s] if mine else dims[0]
        for q in range(units):
            i = g_row[g_ptr[s] + q] if mine else q
            if lastchg[i] <= since or v[i] == zero:  # a dead unit keeps a stale ref
                continue
            for k in range(count):
                n = picked[k]
                a = z1[i, n]
                a = a if a > zero else zero
                change[k] = a - ref[i, n]
                ref[i, n] = a
            for k in range(count):
                d = change[k]
                if d != zero:
                    for r in range(d2):
                        acc[k, r] += d * w2t[i, r]
        for r in range(d2):
            for k in range(count):
                z2[r, picked[k]] = acc[k, r]
        cur, nxt = acc, spare
        if heads > 1:
            for r in range(d2):
                for k in range(count):
                    hz[r, picked[k]] = acc[k, r]
        for h in range(1, heads):  # the layers above, from scratch
            fin = dims[h]
            zo = z_off[h]
            base = w_off[h]
            for k in range(count):
                for j in range(fin):
                    a = cur[k, j]
                    cur[k, j] = a if a > zero else zero
                for r in range(dims[h + 1]):
                    row = base + r * fin
                    total = zero
                    for j in range(fin):
                        total += wr[row + j] * cur[k, j]
                    nxt[k, r] = total + bias[zo + r]
            for r in range(dims[h + 1]):
                for k in range(count):
                    hz[zo + r, picked[k]] = nxt[k, r]
            cur, nxt = nxt, cur
        for k in range(count):
            n = picked[k]
            best = cur[k, 0]
            t = 0
            second = -np.inf
            for c in range(1, dims[heads]):
                a = cur[k, c]
                if a > best:
                    second = best
                    best = a
                    t = c
                elif a > second:
                    second = a
            top[n] = t
            margin[n] = _nb_lead(best, second, t, labels[n], cur[k, labels[n]])
            tol[n] = _nb_tolerance(best)
            last[n] = s

    @njit(cache=True, fastmath=_FM)
    def _nb_refresh_all(
        s, since, first_drops, lastchg, z1, ref, z2, hz, head, v, change, act, out
    ):  # pragma: no cover - compiled
        """Every sample of the chunk refreshed together, in row passes across the chunk: the
        units changed after step ``since`` (this step's rows when ``since == s - 1``) into
        ``z2``, then the snapshot and the layers above."""
        g_ptr, g_row = first_drops[0], first_drops[1]
        w2t, wr, bias, w_off, dims, z_off = head
        zero = np.float32(0.0)
        columns = change.size
        d2 = dims[1]
        heads = dims.size - 1
        count = g_ptr[s + 1] - g_ptr[s] if since == s - 1 else dims[0]
        for q in range(count):
            i = g_row[g_ptr[s] + q] if since == s - 1 else q
            if lastchg[i] <= since or v[i] == zero:  # a dead unit keeps a stale ref
                continue
            moved = False
            for n in range(columns):
                a = z1[i, n]
                a = a if a > zero else zero
                d = a - ref[i, n]
                change[n] = d
                ref[i, n] = a
                moved |= d != zero
            if not moved:
                continue
            for k in range(d2):
                w = w2t[i, k]
                if w != zero:
                    for n in range(columns):
                        z2[k, n] += w * change[n]
        if heads == 1:
            return
        for r in range(d2):
            for n in range(columns):
                hz[r, n] = z2[r, n]
        for h in range(1, heads):
            fin = dims[h]
            fout = dims[h + 1]
            zo = z_off[h]
            zp = z_off[h - 1]
            wo = w_off[h]
            for k in range(fin):
                for n in range(columns):
                    a = hz[zp + k, n]
                    act[k, n] = a if a > zero else zero
            for r in range(fout):
                b = bias[zo + r]
                for n in range(columns):
                    out[n] = b
                base = wo + r * fin
                for k in range(fin):
                    w = wr[base + k]
                    if w != zero:
                        for n in range(columns):
                            out[n] += w * act[k, n]
                for n in range(columns):
                    hz[zo + r, n] = out[n]

    @njit(cache=True)
    def _nb_chunk(
        s_begin,
        s_end,
        x,
        z1,
        z2,
        hz,
        labels,
        nvalid,
        head,
        first_drops,
        head_drops,
        bound,
        block_of,
        together_at,
        state,
        hits_out,
        refreshed_out,
    ):  # pragma: no cover - compiled
        """Steps ``s_begin`` to ``s_end - 1`` for one chunk of samples: hits (and refreshes)
        per step.

        ``head``: the layers above the first, ``(w2t, wr, bias, w_off, dims, z_off)`` (this
        chunk's own copies of the weights, which its head drops zero); ``first_drops`` and
        ``head_drops``: the schedule of :func:`_sweep_schedule` for the first layer and for
        the head; ``state``: what the chunk carries from one call to the next (see
        :func:`_chunk_states`), set up by the call that starts at step 0.
        """
        dims, z_off = head[4], head[5]
        h_ptr = head_drops[0]
        ref, slack_a, slack_b, top, margin, tol, last, lastchg, block_now = state
        zero = np.float32(0.0)
        d1, columns = z1.shape
        heads = dims.size - 1
        classes = dims[heads]
        if heads == 1:
            logits, lo = z2, 0
        else:
            logits, lo = hz, z_off[heads - 1]
        widest = 1
        for h in range(1, dims.size):
            widest = max(widest, dims[h])
        change = np.empty(columns, dtype=np.float32)
        act = np.empty((widest, columns), dtype=np.float32)
        out = np.empty(columns, dtype=np.float32)
        need = np.zeros(columns, dtype=np.bool_)
        picked = np.empty(columns, dtype=np.int64)
        scratch = (  # for the samples refreshed together: which, and their values
            picked,
            change,
            np.empty((columns, widest), dtype=np.float32),
            np.empty((columns, widest), dtype=np.float32),
        )
        verdicts = (labels, top, margin, tol)
        if s_begin == 0:
            for i in range(d1):
                for n in range(columns):
                    a = z1[i, n]
                    ref[i, n] = a if a > zero else zero
            _nb_margins(logits, lo, classes, nvalid, labels, top, margin, tol)
        block = block_now[0]
        v = bound[max(block, 0)]
        for s in range(s_begin, s_end):
            short = True  # whether only this step's rows can have moved since step s - 1
            if block_of[s] != block:
                if block >= 0:  # a unit that comes back to life may hold a stale ref
                    for i in range(d1):
                        if v[i] == zero and bound[block_of[s], i] != zero:
                            lastchg[i] = s
                            short = False
                block = block_of[s]
                v = bound[block]
                _nb_slack(z1, ref, v, slack_a)
            _nb_first_layer(s, x, z1, ref, v, slack_a, lastchg, first_drops)
            if h_ptr[s + 1] > h_ptr[s] and _nb_head_drops(
                s, ref, z2, hz, slack_b, head, head_drops
            ):
                _nb_margins(logits, lo, classes, nvalid, labels, top, margin, tol)
            count = 0
            since = s
            for n in range(nvalid):
                sure = (slack_a[n] + slack_b[n]) * np.float32(1.001) + tol[n] < margin[n]
                need[n] = not sure
                count += need[n]
                since = min(since, last[n])
            if count >= together_at:  # much of the chunk: refresh all of it together
                if not short:
                    since = min(since, s - 2)
                _nb_refresh_all(
                    s, since, first_drops, lastchg, z1, ref, z2, hz, head, v, change, act, out
                )
                for n in range(columns):
                    need[n] = False
                    last[n] = s
                    slack_a[n] = zero
                    slack_b[n] = zero
                _nb_margins(logits, lo, classes, nvalid, labels, top, margin, tol)
            picks = 0
            for n in range(nvalid):
                if need[n]:
                    picked[picks] = n
                    picks += 1
                    slack_a[n] = zero
                    slack_b[n] = zero
            if picks:
                _nb_refresh_some(
                    s,
                    short,
                    picks,
                    scratch,
                    last,
                    lastchg,
                    first_drops,
                    z1,
                    ref,
                    z2,
                    hz,
                    head,
                    v,
                    verdicts,
                )
            hits = 0
            for n in range(nvalid):
                if top[n] == labels[n]:
                    hits += 1
            hits_out[s] = hits
            refreshed_out[s] = count
        block_now[0] = block

    @njit(cache=True, parallel=True)
    def _nb_sweep(
        s_begin,
        s_end,
        xb,
        z1b,
        z2b,
        hzb,
        lb,
        nvalid,
        head,
        first_drops,
        head_drops,
        bound,
        block_of,
        together_at,
        states,
        hits,
        refreshed,
    ):  # pragma: no cover - compiled
        w2tb, wrb, bias, w_off, dims, z_off = head
        ref, slack_a, slack_b, top, margin, tol, last, lastchg, block_now = states
        for c in prange(xb.shape[0]):
            _nb_chunk(
                s_begin,
                s_end,
                xb[c],
                z1b[c],
                z2b[c],
                hzb[c],
                lb[c],
                nvalid[c],
                (w2tb[c], wrb[c], bias, w_off, dims, z_off),
                first_drops,
                head_drops,
                bound,
                block_of,
                together_at,
                (
                    ref[c],
                    slack_a[c],
                    slack_b[c],
                    top[c],
                    margin[c],
                    tol[c],
                    last[c],
                    lastchg[c],
                    block_now[c],
                ),
                hits[c],
                refreshed[c],
            )

    @njit(cache=True, fastmath=_FM)
    def _nb_exact_row(z1, x, delta, i, q, ja, wa, jb, wb, jc, wc, first, last):  # pragma: no cover
        """``z1[i] -= wa x[ja] + wb x[jb] + wc x[jc]``, one pass over the row; the first pass
        of a step keeps the old relu in ``delta[q]``, the last leaves the change there."""
        zero = np.float32(0.0)
        columns = z1.shape[1]
        if first and last:
            for n in range(columns):
                old = z1[i, n]
                new = old - (wa * x[ja, n] + wb * x[jb, n] + wc * x[jc, n])
                z1[i, n] = new
                delta[q, n] = (new if new > zero else zero) - (old if old > zero else zero)
        elif first:
            for n in range(columns):
                old = z1[i, n]
                z1[i, n] = old - (wa * x[ja, n] + wb * x[jb, n] + wc * x[jc, n])
                delta[q, n] = old if old > zero else zero
        elif last:
            for n in range(columns):
                new = z1[i, n] - (wa * x[ja, n] + wb * x[jb, n] + wc * x[jc, n])
                z1[i, n] = new
                delta[q, n] = (new if new > zero else zero) - delta[q, n]
        else:
            for n in range(columns):
                z1[i, n] -= wa * x[ja, n] + wb * x[jb, n] + wc * x[jc, n]

    @njit(cache=True, parallel=True, fastmath=_FM)
    def _nb_exact_step(
        s, xb, z1b, deltab, z2b, w2_rows, head, first_drops, head_drops
    ):  # pragma: no cover - compiled
        """Step ``s`` of the exact tail: its head drops zeroed in ``head`` (the flat head
        weights, ``(wr, w_off, dims)``), with ``z2 -= w_ri relu(z1[i])`` for those of the first
        head layer; then, every chunk in parallel, the first layer's drops on ``z1`` and the
        change of each touched unit's relu into ``delta`` (one row per unit, in schedule
        order). The pruned ``W2``'s columns of those units go into ``w2_rows`` (the same
        order); ``z2 += W2[:, rows] delta`` is left to the caller."""
        g_ptr, g_row, g_start, d_col, d_val = first_drops
        h_ptr, h_layer, h_row, h_col, h_val, _ = head_drops
        wr, w_off, dims = head
        zero = np.float32(0.0)
        columns = z1b.shape[2]
        for d in range(h_ptr[s], h_ptr[s + 1]):
            h = h_layer[d]
            wr[w_off[h] + h_row[d] * dims[h] + h_col[d]] = zero
        for g in range(g_ptr[s], g_ptr[s + 1]):
            i, q = g_row[g], g - g_ptr[s]
            for r in range(dims[1]):
                w2_rows[r, q] = wr[w_off[0] + r * dims[0] + i]
        for c in prange(z1b.shape[0]):
            x, z1, delta, z2 = xb[c], z1b[c], deltab[c], z2b[c]
            for d in range(h_ptr[s], h_ptr[s + 1]):
                if h_layer[d] != 0:
                    continue
                r, i, w = h_row[d], h_col[d], h_val[d]
                for n in range(columns):
                    a = z1[i, n]
                    z2[r, n] -= w * (a if a > zero else zero)
            for g in range(g_ptr[s], g_ptr[s + 1]):
                i, q = g_row[g], g - g_ptr[s]
                first, end = g_start[g], g_start[g + 1]
                d = first
                while d < end:  # up to three drops a pass over the row
                    ja, wa, jb, wb, jc, wc = _nb_three_drops(d, end, d_col, d_val)
                    _nb_exact_row(
                        z1, x, delta, i, q, ja, wa, jb, wb, jc, wc, d == first, d + 3 >= end
                    )
                    d += 3

    @njit(cache=True)
    def _nb_hits(logits, labels):  # pragma: no cover - compiled
        """How many columns of ``logits`` (chunks x classes x samples) put their first
        maximum at the label."""
        hits = 0
        for c in range(logits.shape[0]):
            for n in range(logits.shape[2]):
                best, top = logits[c, 0, n], 0
                for k in range(1, logits.shape[1]):
                    if logits[c, k, n] > best:
                        best, top = logits[c, k, n], k
                hits += top == labels[c, n]
        return hits

    @njit(cache=True, parallel=True, fastmath=_FM)
    def _nb_output_hits(hidden, w, b, labels):  # pragma: no cover - compiled
        """Hits of the output layer ``w relu(hidden) + b`` (``hidden``: chunks x units x
        samples), its logits computed chunk by chunk and never stored."""
        zero = np.float32(0.0)
        chunks, units, columns = hidden.shape
        classes = w.shape[0]
        hits = np.zeros(chunks, dtype=np.int64)
        for c in prange(chunks):
            logits = np.empty((1, classes, columns), dtype=np.float32)
            for r in range(classes):
                for n in range(columns):
                    logits[0, r, n] = b[r]
            act = np.empty(columns, dtype=np.float32)
            for k in range(units):
                for n in range(columns):
                    a = hidden[c, k, n]
                    act[n] = a if a > zero else zero
                for r in range(classes):
                    wk = w[r, k]
                    if wk != zero:
                        for n in range(columns):
                            logits[0, r, n] += wk * act[n]
            hits[c] = _nb_hits(logits, labels[c : c + 1])
        return hits.sum()


def _drop_coefficients(head: Sequence[Tensor]) -> list[np.ndarray]:
    """Per head layer below the output and per unit r of it: how far a unit change of that
    unit's pre-activation can move any logit difference, whatever is pruned later:
    ``max_{t != c} sum_m (|W_L[t, m]| + |W_L[c, m]|) (|W_{L-1}| ... |W_{h+2}|)[m, r]`` with
    the unpruned weights (zeroing weights only shrinks these). The output layer: none."""
    absolute = [w.detach().cpu().double().abs() for w in head]
    out = []
    for h in range(len(head) - 1):
        reach = absolute[-1]
        for w in reversed(absolute[h + 1 : -1]):
            reach = reach @ w
        top2 = reach.topk(min(2, reach.shape[0]), dim=0).values.sum(0)
        out.append((top2 * (1.0 + 1e-5)).numpy())
    out.append(np.zeros(head[-1].shape[0]))
    return out


def _sweep_hits_numba(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    order: Tensor,
    removed: Sequence[int],
    test: Split,
    stats: dict | None = None,
) -> np.ndarray:
    """Correct predictions per step, with the numba kernels (CPU, float32, two+ layers)."""
    sched = _sweep_schedule(weights, order, removed)
    steps = len(removed)
    head = [w.detach().cpu() for w in weights[1:]]
    dims = np.array([weights[0].shape[0]] + [w.shape[0] for w in head], dtype=np.int64)
    w_off = np.concatenate([[0], np.cumsum([w.numel() for w in head])]).astype(np.int64)
    z_off = np.concatenate([[0], np.cumsum(dims[1:])]).astype(np.int64)
    w2t = head[0].t().contiguous().numpy()  # the first head layer, (in, out)
    wr = np.concatenate([w.contiguous().numpy().ravel() for w in head])
    bias = np.concatenate([b.detach().cpu().numpy() for b in biases[1:]])
    # Each head drop: its weight, and what it adds to the slack (|w| times a coefficient).
    h_layer, h_row, h_col = sched["h_layer"], sched["h_row"], sched["h_col"]
    h_val = np.zeros(len(h_layer), dtype=np.float32)
    h_coef = np.zeros(len(h_layer), dtype=np.float32)
    for h, coef in enumerate(_drop_coefficients(head)):
        mine = h_layer == h
        values = head[h].numpy()[h_row[mine], h_col[mine]]
        h_val[mine] = values
        h_coef[mine] = np.abs(values) * coef[h_row[mine]]
    block_of = (np.arange(steps) // _SWEEP_BLOCK).astype(np.int64)
    bound = _head_bounds(head, sched["drop_step"], sched["starts"], steps, _SWEEP_BLOCK)
    # Samples in chunks, each (features x samples); the initial state from one forward pass.
    x = test.images
    n, chunk = len(x), _SWEEP_CHUNK
    chunks = -(-n // chunk)
    padded = torch.zeros(chunks * chunk, x.shape[1], dtype=torch.float32)
    padded[:n] = x
    z1 = torch.addmm(biases[0], padded, weights[0].t())
    h, outs = z1, []
    for w, b in zip(head, biases[1:]):
        h = torch.addmm(b, torch.relu(h), w.t())
        outs.append(h)

    def by_chunk(t: Tensor) -> np.ndarray:
        return t.view(chunks, chunk, -1).transpose(1, 2).contiguous().numpy()

    xb, z1b = by_chunk(padded), by_chunk(z1)
    z2b, hzb = by_chunk(outs[0]), by_chunk(torch.cat(outs, dim=1))
    labels = np.full(chunks * chunk, -1, dtype=np.int64)
    labels[:n] = test.labels.cpu().numpy()
    nvalid = np.minimum(chunk, n - np.arange(chunks) * chunk).astype(np.int64)
    first_drops = tuple(sched[k] for k in ("g_ptr", "g_row", "g_start", "d_col", "d_val"))
    head_drops = (sched["h_ptr"], h_layer, h_row, h_col, h_val, h_coef)
    own_head = (  # every chunk's own copies of the head weights, which its head drops zero
        np.repeat(w2t[None], chunks, axis=0),
        np.repeat(wr[None], chunks, axis=0),
        bias,
        w_off,
        dims,
        z_off,
    )
    states = _chunk_states(chunks, chunk, int(dims[0]))
    hits = np.zeros((chunks, steps), dtype=np.int64)
    refreshed = np.zeros((chunks, steps), dtype=np.int64)
    labels_b = labels.reshape(chunks, chunk)
    step, share = 0, 0.0
    started = time.perf_counter()
    with numba_threads_like_torch():
        while step < steps and share < _SWEEP_EXACT_AT:
            end = min(steps, step + _SWEEP_SEGMENT)
            _nb_sweep(
                step,
                end,
                xb,
                z1b,
                z2b,
                hzb,
                labels_b,
                nvalid,
                own_head,
                first_drops,
                head_drops,
                bound,
                block_of,
                _SWEEP_TOGETHER,
                states,
                hits,
                refreshed,
            )
            share = refreshed[:, step:end].sum() / (n * (end - step))
            step = end
        hits_total = hits.sum(0)
        certified_seconds = time.perf_counter() - started
        if step < steps:
            hits_total[step:] = _exact_tail(
                step,
                steps,
                sched,
                (wr, w_off, dims),
                biases,
                xb,
                z1b,
                labels_b,
                first_drops,
                head_drops,
            )
            refreshed[0, step:] = n
    if stats is not None:
        stats["refreshed"] = refreshed.sum(0)
        stats["exact_from"] = step
        stats["certified_seconds"] = certified_seconds
        stats["exact_seconds"] = time.perf_counter() - started - certified_seconds
    return hits_total


def _chunk_states(chunks: int, chunk: int, units: int) -> tuple[np.ndarray, ...]:
    """What each chunk of the certified sweep carries from one segment of steps to the next:
    ``ref``, the two slacks, the stored prediction with its lead and float tolerance, the step
    of each sample's last refresh, of each unit's last change, and the current block."""
    return (
        np.zeros((chunks, units, chunk), dtype=np.float32),
        np.zeros((chunks, chunk), dtype=np.float32),
        np.zeros((chunks, chunk), dtype=np.float32),
        np.zeros((chunks, chunk), dtype=np.int64),
        np.zeros((chunks, chunk), dtype=np.float32),
        np.zeros((chunks, chunk), dtype=np.float32),
        np.full((chunks, chunk), -1, dtype=np.int64),
        np.full((chunks, units), -1, dtype=np.int64),
        np.full((chunks, 1), -1, dtype=np.int64),
    )


def _exact_tail(
    begin: int,
    steps: int,
    sched: dict[str, np.ndarray],
    flat_head: tuple[np.ndarray, np.ndarray, np.ndarray],
    biases: Sequence[Tensor],
    xb: np.ndarray,
    z1b: np.ndarray,
    labels: np.ndarray,
    first_drops: tuple[np.ndarray, ...],
    head_drops: tuple[np.ndarray, ...],
) -> np.ndarray:
    """Hits at steps ``begin`` onwards, every prediction recomputed at every step.

    For the late steps, where most predictions need a refresh anyway: the first head layer's
    pre-activations (all samples) are brought from the first layer's state after step
    ``begin - 1`` (``z1b``) once, then follow each step's moved units with one matrix product
    ``z2 += W2[:, rows] delta`` (BLAS, not numba loops); the small layers above are
    re-evaluated. ``flat_head``: the unpruned head weights, flat, with their offsets and the
    layer widths (``wr, w_off, dims`` of :func:`_sweep_hits_numba`).
    """
    chunks, units, chunk = z1b.shape
    wr, w_off, dims = flat_head
    alive = sched["drop_step"][sched["starts"][1] :] >= begin
    flat = torch.from_numpy(wr * alive)  # a copy: this tail's own drops zero it
    head = [
        flat[w_off[h] : w_off[h + 1]].view(int(dims[h + 1]), int(dims[h]))
        for h in range(len(dims) - 1)
    ]
    up = [b.detach().cpu().view(1, -1, 1) for b in biases[1:]]
    z2 = torch.matmul(head[0], torch.relu(torch.from_numpy(z1b))) + up[0]
    delta = torch.empty(chunks, units, chunk)
    acts = [torch.empty(chunks, w.shape[1], chunk) for w in head[1:-1]]  # reused every step
    outs = [torch.empty(chunks, w.shape[0], chunk) for w in head[1:-1]]
    output, last_bias = head[-1].numpy(), biases[-1].detach().cpu().numpy()
    g_ptr = first_drops[0]
    w2_rows = torch.empty(int(dims[1]), units)  # this step's units' columns of W2
    step_args = (xb, z1b, delta.numpy(), z2.numpy(), w2_rows.numpy(), (flat.numpy(), w_off, dims))
    top = (outs[-1] if outs else z2).numpy()
    hits = np.zeros(steps - begin, dtype=np.int64)
    for s in range(begin, steps):
        _nb_exact_step(s, *step_args, first_drops, head_drops)
        first, end = g_ptr[s], g_ptr[s + 1]
        if end > first:
            z2.baddbmm_(w2_rows[:, : end - first].expand(chunks, -1, -1), delta[:, : end - first])
        hidden = z2
        for w, b, act, out in zip(head[1:-1], up[1:-1], acts, outs):
            torch.matmul(w, torch.clamp(hidden, min=0.0, out=act), out=out).add_(b)
            hidden = out
        if len(head) == 1:  # z2 are the logits
            hits[s - begin] = _nb_hits(top, labels)
        else:
            hits[s - begin] = _nb_output_hits(top, output, last_bias, labels)
    return hits


def _nth_occurrence(key: np.ndarray) -> np.ndarray:
    """For each entry of ``key``, how many entries before it hold the same value."""
    by_key = np.argsort(key, kind="stable")
    position = np.arange(len(key))
    new_run = np.ones(len(key), dtype=bool)
    new_run[1:] = key[by_key][1:] != key[by_key][:-1]
    nth = np.empty(len(key), dtype=np.int64)
    nth[by_key] = position - np.maximum.accumulate(np.where(new_run, position, 0))
    return nth


def _torch_sweep_plan(
    shapes: Sequence[tuple[int, int]], orders: Sequence[np.ndarray], removed: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[tuple[int, int, int]]]]:
    """The drops of every step of several sweeps (networks of the same ``shapes``, one
    ``order`` each) as slices of flat arrays: ``(sweep, layer, local, plan)``, each drop's
    sweep, layer and within-layer index, and ``plan[s]`` the ``(first, end, layer)`` slices
    of step ``s``.

    A first-layer slice never holds a row of a sweep twice (a row's second drop of a step
    goes into the next slice, in the order's order), so adding the drops into ``z1`` by rows
    is the same sum in the same order everywhere, with no two updates of an element at once
    (on a GPU, ``index_add_`` with repeated rows adds them in any order).
    """
    sizes = [rows * cols for rows, cols in shapes]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    step_of_rank = _step_of_rank(int(starts[-1]), removed)
    units, fan_in = shapes[0]
    keep = step_of_rank < len(removed)  # by rank: the same for every order
    parts = []
    for b, order in enumerate(orders):
        layer, local = _layer_and_local(starts, order)
        # A first-layer drop's slice: the how-many-th drop of its row at its step.
        nth = np.zeros(len(order), dtype=np.int64)
        first = layer == 0
        nth[first] = _nth_occurrence(step_of_rank[first] * units + local[first] // fan_in)
        parts.append(
            (step_of_rank[keep], layer[keep], nth[keep], local[keep], np.full(keep.sum(), b))
        )
    step, layer, nth, local, sweep = (np.concatenate(a) for a in zip(*parts))
    ranked = np.lexsort((nth, layer, step))  # stable: the order's order within a slice
    plan: list[list[tuple[int, int, int]]] = [[] for _ in removed]
    key = np.stack([step[ranked], layer[ranked], nth[ranked]], axis=1)
    cuts = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]).any(axis=1), True])
    for first, end in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        plan[int(key[first, 0])].append((first, end, int(key[first, 1])))
    return sweep[ranked], layer[ranked], local[ranked], plan


def _sweep_hits_torch(
    weight_sets: Sequence[Sequence[Tensor]],
    bias_sets: Sequence[Sequence[Tensor]],
    orders: Sequence[Tensor],
    removed: Sequence[int],
    test: Split,
) -> np.ndarray:
    """Correct predictions per sweep and step, ``(sweeps, steps)``: several sweeps at once
    (networks of one shape, one order each), the first layer updated incrementally and
    the layers above re-evaluated at every step.

    Any device and dtype. Works in the transposed (features x samples) layout so that
    dropping weight (i, j) of the first layer is a row update ``z1[i] -= w_ij * x[j]``, on
    every sweep's stacked rows at once. The drops are planned on the host
    (:func:`_torch_sweep_plan`) and the hits stay on the device until the end: on a GPU the
    loop only queues kernels, nothing in it waits, and many sweeps together keep it busy.
    """
    sweeps, layers = len(weight_sets), len(weight_sets[0])
    weights = [torch.stack([ws[i] for ws in weight_sets]).clone() for i in range(layers)]
    biases = [torch.stack([bs[i] for bs in bias_sets]).unsqueeze(2) for i in range(layers)]
    shapes = [tuple(w.shape[1:]) for w in weights]
    sweep_np, layer_np, local_np, plan = _torch_sweep_plan(
        shapes, [order.cpu().numpy() for order in orders], removed
    )
    units, fan_in = shapes[0]
    incremental = layers > 1  # a one-layer network is re-evaluated from its weights
    # What each drop changes: a first-layer drop the row of z1 (all sweeps stacked) from
    # which it takes its input feature times the weight; any other drop, the weight itself.
    in_z1 = (layer_np == 0) & incremental
    sizes = np.array([rows * cols for rows, cols in shapes], dtype=np.int64)
    target = np.where(
        in_z1, sweep_np * units + local_np // fan_in, sweep_np * sizes[layer_np] + local_np
    )
    device = weights[0].device
    target_t, cols = (
        torch.from_numpy(a).to(device) for a in (target, np.where(in_z1, local_np % fan_in, 0))
    )
    flat_first = torch.from_numpy(np.where(in_z1, sweep_np * sizes[0] + local_np, 0)).to(device)
    negated = torch.where(torch.from_numpy(in_z1).to(device), -weights[0].view(-1)[flat_first], 0)
    x_t = test.images.t().contiguous().expand(sweeps, -1, -1)
    z1 = torch.baddbmm(biases[0], weights[0], x_t)
    rows_of_z1 = z1.view(sweeps * units, -1)
    hits = torch.zeros(sweeps, len(removed), dtype=torch.int64, device=device)
    for s, slices in enumerate(plan):
        for first_drop, end, i in slices:
            at = target_t[first_drop:end]
            if i == 0 and incremental:
                moved = x_t[0].index_select(0, cols[first_drop:end])
                rows_of_z1.index_add_(0, at, moved * negated[first_drop:end].unsqueeze(1))
            else:
                weights[i].view(-1).index_fill_(0, at, 0.0)
        h = z1 if incremental else torch.baddbmm(biases[0], weights[0], x_t)
        for w, b in zip(weights[1:], biases[1:]):
            h = torch.baddbmm(b, w, torch.relu(h))
        hits[:, s] = (h.argmax(1) == test.labels).sum(1)
    return hits.cpu().numpy()


def _sweep_frame(
    names: Sequence[str],
    sizes: Sequence[int],
    order: Tensor,
    percentiles: Sequence[float],
    hits_by_count: Mapping[int, int],
    samples: int,
) -> pd.DataFrame:
    """The sweep's rows, in the percentiles' order, from the hits at each removal count."""
    removed = removal_counts(sum(sizes), percentiles)
    # Kept counts per layer: the layer's weights not among the first `removed` of the order.
    layer_of = np.searchsorted(np.cumsum(sizes), order.cpu().numpy(), side="right")
    gone = np.zeros((len(names), len(order) + 1), dtype=np.int64)
    for i in range(len(names)):
        gone[i, 1:] = np.cumsum(layer_of == i)
    rows = []
    for p, count in zip(percentiles, removed):
        kept = [sizes[i] - int(gone[i, count]) for i in range(len(names))]
        rows.append(_record(kept, names, p, 100.0 * int(hits_by_count[count]) / samples))
    return pd.DataFrame(rows)


def _ascending_counts(total: int, percentiles: Sequence[float]) -> list[int]:
    """The removal counts of ``percentiles`` in the order a sweep walks them (ascending)."""
    return sorted(removal_counts(total, percentiles))


def _network_tensors(model: StackedMLP) -> tuple[list[str], list[Tensor], list[Tensor]]:
    """Network 0's layer names, weight matrices and biases."""
    names = list(model.weight_matrices())
    weights = [model.layers[n].weight[0].detach() for n in names]
    biases = [model.layers[n].bias[0].detach() for n in names]
    return names, weights, biases


@torch.no_grad()
def sweep_fast(
    model: StackedMLP,
    scores: Mapping[str, Tensor],
    percentiles: Sequence[float],
    test: Split,
    stats: dict | None = None,
) -> pd.DataFrame:
    """The same sweep as :func:`sweep_reference` (same rows), reusing work between percentiles.

    On CPU with float32 tensors, two or more layers and numba available, the certified lazy
    refresh of the layers above the first (see "The fast sweep" above) runs in parallel over
    chunks of samples, then the exact tail; otherwise (CUDA, float64, one layer, no numba)
    the torch path updates the first layer incrementally and re-evaluates the layers above
    at every percentile (:func:`sweep_fast_together` runs many such sweeps at once).
    Percentiles may come in any order; kept counts are exact, accuracies equal the
    reference's up to float rounding. ``stats``, where given, receives the numba path's
    figures: predictions refreshed per step, the step the exact tail starts at, and the
    seconds spent before it and in it.
    """
    global _numba_sweep_broken
    names, weights, biases = _network_tensors(model)
    order = pruning_order({n: scores[n] for n in names})
    sizes = [w.numel() for w in weights]
    ascending = _ascending_counts(sum(sizes), percentiles)
    hits = None
    if (
        numba is not None
        and not _numba_sweep_broken
        and len(weights) >= 2
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in weights + biases)
        and test.images.device.type == "cpu"
        and test.images.dtype == torch.float32
    ):
        try:
            hits = _sweep_hits_numba(weights, biases, order, ascending, test, stats)
        except Exception as err:  # a JIT that cannot compile here: fall back, loudly
            _numba_sweep_broken = True
            warnings.warn(f"numba sweep failed ({err!r}); using the torch path", stacklevel=2)
    if hits is None:
        return sweep_fast_together([model], [scores], percentiles, test)[0]
    by_count = dict(zip(ascending, np.asarray(hits).tolist()))
    return _sweep_frame(names, sizes, order, percentiles, by_count, len(test.labels))


@torch.no_grad()
def sweep_fast_together(
    models: Sequence[StackedMLP],
    score_sets: Sequence[Mapping[str, Tensor]],
    percentiles: Sequence[float],
    test: Split,
) -> list[pd.DataFrame]:
    """:func:`sweep_fast` of network 0 of each model with its scores, all with the torch
    path at once (the GPU's way: one kernel per step serves every sweep); one frame each."""
    tensors = [_network_tensors(model) for model in models]
    names = tensors[0][0]
    orders = [pruning_order({n: scores[n] for n in names}) for scores in score_sets]
    sizes = [w.numel() for w in tensors[0][1]]
    ascending = _ascending_counts(sum(sizes), percentiles)
    hits = _sweep_hits_torch(
        [t[1] for t in tensors], [t[2] for t in tensors], orders, ascending, test
    )
    return [
        _sweep_frame(
            names, sizes, order, percentiles, dict(zip(ascending, row.tolist())), len(test.labels)
        )
        for order, row in zip(orders, hits)
    ]


def _by_criterion(criteria: Sequence[str], frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One network's sweeps (one frame per criterion) as one frame with a ``criterion``
    column."""
    for criterion, frame in zip(criteria, frames):
        frame.insert(0, "criterion", criterion)
    return pd.DataFrame(pd.concat(frames, ignore_index=True))


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
    frames = [
        run(model, criterion_scores(criterion, model, train, seed), percentiles, test)
        for criterion in criteria
    ]
    return _by_criterion(criteria, frames)


def sweep_networks(
    models: Sequence[StackedMLP],
    criteria: Sequence[str],
    percentiles: Sequence[float],
    train: Split,
    test: Split,
    seeds: Sequence[int],
) -> list[pd.DataFrame]:
    """:func:`sweep` of network 0 of each model (made from ``seeds``), one frame each. On a
    GPU all their sweeps run together (:func:`sweep_fast_together`: one sweep alone leaves
    the GPU waiting on kernel launches); elsewhere one after another."""
    if next(models[0].parameters()).device.type != "cuda":
        return [
            sweep(model, criteria, percentiles, train, test, seed)
            for model, seed in zip(models, seeds)
        ]
    score_sets = [
        criterion_scores(criterion, model, train, seed)
        for model, seed in zip(models, seeds)
        for criterion in criteria
    ]
    repeated = [model for model in models for _ in criteria]
    free, _ = torch.cuda.mem_get_info(test.images.device)
    at_once = sweeps_at_once(free, sweep_bytes(models[0], len(test.labels)))
    frames = [
        frame
        for first in range(0, len(repeated), at_once)
        for frame in sweep_fast_together(
            repeated[first : first + at_once],
            score_sets[first : first + at_once],
            percentiles,
            test,
        )
    ]
    per_network = len(criteria)
    return [
        _by_criterion(criteria, frames[k * per_network : (k + 1) * per_network])
        for k in range(len(models))
    ]


def sweep_bytes(model: StackedMLP, samples: int) -> int:
    """About the most device memory one sweep of :func:`sweep_fast_together` holds at once:
    every layer's outputs for every sample (the first's three times: pre-activations, their
    relu and the rows being updated; the others' twice) and its weights twice."""
    _, weights, _ = _network_tensors(model)
    outputs = [w.shape[0] for w in weights]
    values = samples * (3 * outputs[0] + 2 * sum(outputs[1:]))
    return weights[0].element_size() * (values + 2 * sum(w.numel() for w in weights))


def sweeps_at_once(free_bytes: int, per_sweep: int, share: float = 0.5) -> int:
    """How many sweeps to run together in ``share`` of the free device memory (at least one)."""
    return max(1, int(share * free_bytes) // per_sweep)
