"""Configuration entropy (Bayandorian 2023, arXiv 2301.07285), the paper-formula arm.

For one weight matrix ``W`` (out x in), with ``*`` a 2-D convolution with zero
padding 1 (same-size output) and the normalised Scharr kernels
``Gx = [[3, 0, -3], [10, 0, -10], [3, 0, -3]] / 32`` and ``Gy = Gx^T``::

    H_C(W) = 0.5 * log(0.5 * S) - log(A),
    S = sum((Gx * W)^2 + (Gy * W)^2),    A = sum |W|.

Convolution or cross-correlation does not matter (flipping turns the kernels
into their negatives, and they are squared). ``H_C`` is scale invariant:
``H_C(aW) = H_C(W)`` for any ``a != 0``.

**Guard of log(0).** Both logs get a tiny constant ``EPS = 1e-18``:
``0.5 * log(0.5 * S + EPS**2) - log(A + EPS)``. ``S`` is quadratic and ``A``
linear in ``W``, so the guard scales like ``W`` does: it changes nothing above
``|W| ~ 1e-18`` (it is far below float32 resolution of any realistic ``S``
and ``A``; ``EPS**2 = 1e-36`` is still a normal float32), and the all-zero
matrix gets ``H_C = 0.5 * log(EPS**2) - log(EPS) = 0`` with gradient 0 (the
subgradient of ``|w|`` at 0 is taken as 0, as ``torch.abs`` does). ``S`` can
also be 0 for some nonzero matrices (e.g. a 1 x 1 matrix, or the row
``[a, 0, a]``); value and gradient stay finite there too.

**Sign.** The paper's formula defines its right-hand side as the *negative*
of the sparsity loss: ``l_C(W) = -H_C(W)``, and the term added to the training
loss is ``coefficient * sum_layers l_C(W)``. That is the registered
``configuration_entropy`` arm here (:class:`ConfigurationEntropy`). The
paper's prose speaks of minimising ``H_C``, the opposite sign; that reading is
the separately named ablation arm ``configuration_entropy_prose`` (in
``configuration_entropy_prose.py``). The two are never swapped silently.

**Gradient.** With ``Cx``, ``Cy`` the linear "same" operators ``W -> Gx * W``,
``W -> Gy * W`` (zero padding; their adjoints are the flipped kernels with zero
padding, i.e. ``Cx^T = -Cx`` and ``Cy^T = -Cy`` since both kernels are
antisymmetric)::

    dH_C/dW = (Cx^T Cx W + Cy^T Cy W) / S - sign(W) / A

(with the guards: ``S + 2 EPS**2`` and ``A + EPS``). The kernel is separable,
``Gx = [3, 10, 3]^T (outer) [1, 0, -1] / 32``, which the fast paths use.

Implementations, all batched over the K seeds trained at once (input
``(K, out, in)``, output ``(K,)``; a single 2-D matrix gives a 0-d tensor),
float32 or float64 as given:

- :func:`configuration_entropy_reference`: ``F.conv2d`` with the two 3x3
  kernels, differentiated by autograd; the reference for tests and figures.
- :func:`add_entropy_gradient`: what training uses on CPU: the term, and its
  closed-form gradient added straight into each weight's ``.grad`` after the
  backward pass of the rest of the loss (no autograd node, no gradient buffer).
- :func:`configuration_entropy`: a ``torch.autograd.Function`` with the
  closed-form backward (training's path where the in-place one is not
  available). On CPU (float32 / float64) both run fused numba kernels, one pass
  over W each: the value sums ``S`` and ``A`` row by row; the gradient pass
  recomputes ``P = Cx^T Cx W + Cy^T Cy W`` row by row (a separable-sum 5x5
  stencil, see the comment above ``_grad_rows``) and adds
  ``g * (P / S - sign(W) / A)`` to its output directly, so nothing of W's size
  is kept between the two. Each pass takes all the layers at once: every
  matrix's rows cut into one equal range per thread (``_work_runs``), on
  torch's thread count where the layers hold at least ``PARALLEL_MIN_NUMEL``
  elements in all, else serially. numba compiles the kernels on first use per
  dtype and number of layers (a few seconds each) and keeps them in its on-disk
  cache (``cache=True``), from which later processes load them in well under a
  second. Where numba is missing,
  fails to compile, and for other dtypes, it falls back to the eager closed
  form (separable 1-D passes by slicing a padded tensor).
- On CUDA (float32 / float64), the same two passes as Triton kernels
  (:mod:`sparsebench.entropy_triton`): the values without autograd and the
  in-place gradient; the eager form there is some twenty kernel launches over
  W per step, more than the rest of a training step. Where Triton is missing
  or cannot compile, the eager form, with a warning.

``BACKEND`` (default from the environment variable
``SPARSEBENCH_ENTROPY_BACKEND``: ``auto``, ``numba``, ``triton`` or ``eager``)
forces a path.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from sparsebench.devices import numba_threads_like_torch
from sparsebench.regularizers.base import Regularizer, register

EPS = 1e-18
"""Guard inside both logs: ``log(0.5 S + EPS**2)`` and ``log(A + EPS)``."""

BACKEND = os.environ.get("SPARSEBENCH_ENTROPY_BACKEND", "auto")
"""``auto`` (numba on CPU, Triton on CUDA, where they work; else eager), ``numba``,
``triton`` or ``eager``."""
BACKENDS = ("auto", "numba", "triton", "eager")

_EPS2 = EPS * EPS
# The kernels below work with the unnormalised integer Scharr kernels (32 x the
# normalised ones), so their S is 32**2 = 1024 times the true S and their P
# 1024 times the true P; the ratio P / (S + 2 EPS**2) is unchanged when the
# guard is scaled alike.
_SCALE = 1024.0


def _as_batch(weight: Tensor) -> tuple[Tensor, bool]:
    if weight.dim() == 2:
        return weight.unsqueeze(0), True
    if weight.dim() != 3:
        raise ValueError(f"expected (K, out, in) or (out, in), got shape {tuple(weight.shape)}")
    return weight, False


def _entropy_from_sums(s_raw: Tensor, a: Tensor) -> Tensor:
    """H_C from the unnormalised S (x1024) and A."""
    return 0.5 * torch.log(0.5 * s_raw / _SCALE + _EPS2) - torch.log(a + EPS)


# ----------------------------------------------------------------------------
# Reference: F.conv2d with the two 3x3 kernels, autograd for the gradient.


def scharr_kernels(dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The normalised Scharr kernels ``Gx``, ``Gy`` as a ``(2, 1, 3, 3)`` conv2d weight."""
    gx = torch.tensor([[3.0, 0.0, -3.0], [10.0, 0.0, -10.0], [3.0, 0.0, -3.0]], dtype=dtype) / 32
    return torch.stack([gx, gx.T]).unsqueeze(1).to(device)


def configuration_entropy_reference(weight: Tensor) -> Tensor:
    """``H_C`` per matrix by direct ``F.conv2d`` (padding 1); ``(K, out, in) -> (K,)``."""
    w, squeeze = _as_batch(weight)
    g = F.conv2d(w.unsqueeze(1), scharr_kernels(w.dtype, w.device), padding=1)
    s = g.pow(2).sum((1, 2, 3))
    a = w.abs().sum((1, 2))
    h = 0.5 * torch.log(0.5 * s + _EPS2) - torch.log(a + EPS)
    return h[0] if squeeze else h


# ----------------------------------------------------------------------------
# Eager closed form: separable 1-D passes on a zero-padded tensor (x32 scaled).


def _cx(w: Tensor) -> Tensor:
    """``32 * Cx w``: vertical [3, 10, 3] smoothing, then horizontal [1, 0, -1] difference."""
    p = F.pad(w, (1, 1, 1, 1))
    sv = 3 * (p[:, :-2] + p[:, 2:]) + 10 * p[:, 1:-1]
    return sv[:, :, :-2] - sv[:, :, 2:]


def _cy(w: Tensor) -> Tensor:
    """``32 * Cy w``: vertical [1, 0, -1] difference, then horizontal [3, 10, 3] smoothing."""
    p = F.pad(w, (1, 1, 1, 1))
    dv = p[:, :-2] - p[:, 2:]
    return 3 * (dv[:, :, :-2] + dv[:, :, 2:]) + 10 * dv[:, :, 1:-1]


def _eager_sums(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ex, ey = _cx(w), _cy(w)
    s_raw = (ex.square() + ey.square()).sum((1, 2))
    return ex, ey, s_raw, w.abs().sum((1, 2))


class _EagerEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        ex, ey, s_raw, a = _eager_sums(w)
        ctx.save_for_backward(w, ex, ey, s_raw, a)
        return _entropy_from_sums(s_raw, a)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        w, ex, ey, s_raw, a = ctx.saved_tensors
        # 1024 * P = -(32 Cx)(32 Cx w) - (32 Cy)(32 Cy w), using Cx^T = -Cx, Cy^T = -Cy.
        p = _cx(ex).add_(_cy(ey))
        cs = (-grad / (s_raw + 2 * _SCALE * _EPS2))[:, None, None]
        ca = (grad / (a + EPS))[:, None, None]
        return torch.addcmul(p * cs, torch.sign(w), ca, value=-1)


def _eager(w: Tensor) -> Tensor:
    if torch.is_grad_enabled() and w.requires_grad:
        return _EagerEntropy.apply(w)
    _, _, s_raw, a = _eager_sums(w)
    return _entropy_from_sums(s_raw, a)


# ----------------------------------------------------------------------------
# Fused numba kernels (CPU, float32/float64).

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; keep the fallback honest
    numba = None

_numba_broken = False

if numba is not None:
    # No fastmath in the kernels: with it, the compiler may reassociate sums and fuse
    # multiply-adds differently when numba compiles a kernel afresh and when it loads it
    # from its cache, and a run's numbers would depend on which happened (a job that
    # compiled against one that did not). Sums run across columns instead, which
    # vectorises without reassociating anything.
    @njit(cache=True)
    def _in_lanes(values):  # pragma: no cover - compiled
        """The float64 sum of ``values``: eight interleaved lanes, then the rest and the
        lanes in order (an order fixed here that still pipelines)."""
        lanes = np.zeros(8)
        full = values.size - values.size % 8
        for j0 in range(0, full, 8):
            for lane in range(8):
                lanes[lane] += values[j0 + lane]
        total = 0.0
        for j in range(full, values.size):
            total += values[j]
        for lane in range(8):
            total += lanes[lane]
        return total

    # The stencil. Cx = Sv (x) Dh (rows: smoothing [3, 10, 3]; columns: difference
    # [1, 0, -1]), each 1-D factor a "same" operator with zero padding, so
    # Cx^T Cx = (Sv^T Sv) (x) (Dh^T Dh) and Cy^T Cy = (Dv^T Dv) (x) (Sh^T Sh). The
    # 1-D Gram matrices are 5-tap stencils that differ from the untruncated ones
    # only in their first and last diagonal entry (the padding drops one term):
    #   V1 = Sv^T Sv, H2 = Sh^T Sh: [9, 60, 118, 60, 9], centre 109 at a border
    #        (100 when the axis has length 1);
    #   V2 = Dv^T Dv, H1 = Dh^T Dh: [-1, 0, 2, 0, -1], centre 1 at a border
    #        (0 when the axis has length 1).
    # With the integer kernels (32 x normalised), this gives P_raw = 1024 P.
    @njit(cache=True)
    def _sums_rows(w, k, r0, r1):  # pragma: no cover - compiled
        """(S_raw, A) over rows ``r0:r1`` of matrix ``k``: ``S_raw = |32 Cx W|^2 + |32 Cy W|^2``.

        Per row, a vertical pass over three rows of W (smoothing [3, 10, 3] and
        difference [1, 0, -1]) into zero-padded row buffers, then the horizontal
        difference and smoothing, squared. Each column adds its terms over the rows (in
        the array's dtype); the columns' totals are added last (:func:`_in_lanes`).
        """
        n, m = w.shape[1], w.shape[2]
        dt = w.dtype
        sv = np.zeros(m + 2, dtype=dt)  # one zero column each side
        dv = np.zeros(m + 2, dtype=dt)
        col_s = np.zeros(m, dtype=dt)
        col_a = np.zeros(m, dtype=dt)
        zrow = np.zeros(m, dtype=dt)
        # Constants in the array's dtype: a bare 3 would promote float32 math to float64.
        c = np.zeros(2, dtype=dt)
        c[0], c[1] = 3, 10
        c3, c10 = c[0], c[1]
        for i in range(r0, r1):
            wu = w[k, i - 1] if i >= 1 else zrow  # zero rows outside the matrix
            wc = w[k, i]
            wd = w[k, i + 1] if i <= n - 2 else zrow
            for j in range(m):
                u = wu[j]
                d = wd[j]
                x = wc[j]
                sv[j + 1] = c3 * (u + d) + c10 * x
                dv[j + 1] = u - d
                col_a[j] += abs(x)
            for j in range(m):
                ex = sv[j] - sv[j + 2]
                ey = c3 * (dv[j] + dv[j + 2]) + c10 * dv[j + 1]
                col_s[j] += ex * ex + ey * ey
        return _in_lanes(col_s), _in_lanes(col_a)

    @njit(cache=True)
    def _border_p(q2, t2, q0, j, m, t1j):  # pragma: no cover - compiled
        """P_raw at a border column ``j`` (0 or m-1): H1 centre 2 -> 1, H2 centre 118 -> 109."""
        pj = q2[j] + q2[j + 4] + 60 * (t2[j + 1] + t2[j + 3]) + q0[j + 2]
        borders = (1 if j == 0 else 0) + (1 if j == m - 1 else 0)
        return pj - borders * (t1j + 9 * t2[j + 2])

    @njit(cache=True)
    def _grad_rows(w, out, k, r0, r1, c1, c2):  # pragma: no cover - compiled
        """Rows ``r0:r1`` of matrix ``k``, from ``P_raw = 1024 (Cx^T Cx + Cy^T Cy) W``.

        ``P_raw = (V1 (x) H1 + V2 (x) H2) W`` is a separable-sum 5x5 stencil (see
        the comment above): per row, a vertical pass over five rows of W gives
        ``t1 = V1 W`` and ``t2 = V2 W``, kept as the zero-padded row buffers
        ``q2 = 9 t2 - t1`` (the horizontal taps at +-2), ``t2`` (x60 at +-1) and
        ``q0 = 2 t1 + 118 t2`` (centre); then a horizontal pass adds
        ``c1 * P_raw - c2 * sign(W)`` to ``out``. P itself is never stored.
        """
        n, m = w.shape[1], w.shape[2]
        dt = w.dtype
        q2 = np.zeros(m + 4, dtype=dt)  # two zero columns each side
        t2 = np.zeros(m + 4, dtype=dt)
        q0 = np.zeros(m + 4, dtype=dt)
        zrow = np.zeros(m, dtype=dt)
        # Constants in the array's dtype: a bare 9 would promote float32 math to float64.
        c = np.zeros(6, dtype=dt)
        c[1], c[2], c[3], c[4], c[5] = 1, 2, 9, 60, 118
        zero, one, c2_, c9, c60, c118 = c[0], c[1], c[2], c[3], c[4], c[5]
        for i in range(r0, r1):
            # Rows i-2..i+2; a zero row outside the matrix (zero padding).
            w2u = w[k, i - 2] if i >= 2 else zrow
            w1u = w[k, i - 1] if i >= 1 else zrow
            wc = w[k, i]
            w1d = w[k, i + 1] if i <= n - 2 else zrow
            w2d = w[k, i + 2] if i <= n - 3 else zrow
            ends = (one if i == 0 else zero) + (one if i == n - 1 else zero)
            v1c = c118 - c9 * ends  # V1 centre: 118 inside, 109 on a border row
            v2c = c2_ - ends  # V2 centre: 2 inside, 1 on a border row
            for j in range(m):
                a2 = w2u[j] + w2d[j]
                a1 = w1u[j] + w1d[j]
                x = wc[j]
                u1 = c9 * a2 + c60 * a1 + v1c * x
                u2 = v2c * x - a2
                t2[j + 2] = u2
                q2[j + 2] = c9 * u2 - u1
                q0[j + 2] = c2_ * u1 + c118 * u2
            # t1 at the border columns, for their corrections (same expression).
            t1_first = c9 * (w2u[0] + w2d[0]) + c60 * (w1u[0] + w1d[0]) + v1c * wc[0]
            e = m - 1
            t1_last = c9 * (w2u[e] + w2d[e]) + c60 * (w1u[e] + w1d[e]) + v1c * wc[e]
            p_first = _border_p(q2, t2, q0, 0, m, t1_first)
            p_last = _border_p(q2, t2, q0, e, m, t1_last)
            # Inner columns here, the border columns (first, last) after.
            oq = out[k, i]
            for j in range(1, e):
                pj = q2[j] + q2[j + 4] + c60 * (t2[j + 1] + t2[j + 3]) + q0[j + 2]
                oq[j] += c1 * pj - c2 * np.sign(wc[j])
            oq[0] += c1 * p_first - c2 * np.sign(wc[0])
            if m > 1:
                oq[e] += c1 * p_last - c2 * np.sign(wc[e])

    @njit(cache=True)
    def _work_runs(ws, runs):  # pragma: no cover - compiled
        """The work of every matrix of the stacks ``ws`` cut into ``runs`` runs (one per
        thread), each a list of pieces ``(stack, k, r0, r1)``: run ``t`` takes the ``t``-th
        of ``runs`` equal row ranges of every matrix. So one launch serves all the layers,
        and each thread works on the part of each weight (and gradient) that torch's
        element-wise passes over it, such as Adam's, give the same thread. Returns
        ``(pieces, start)``; run ``t`` is ``pieces[start[t]:start[t + 1]]``."""
        count = 0
        for s in range(len(ws)):
            count += ws[s].shape[0]
        pieces = np.empty((runs * count, 4), dtype=np.int64)
        start = np.empty(runs + 1, dtype=np.int64)
        q = 0
        for t in range(runs):
            start[t] = q
            for s in range(len(ws)):
                kk, n = ws[s].shape[0], ws[s].shape[1]
                r0, r1 = t * n // runs, (t + 1) * n // runs
                if r1 > r0:
                    for k in range(kk):
                        pieces[q, 0], pieces[q, 1], pieces[q, 2], pieces[q, 3] = s, k, r0, r1
                        q += 1
        start[runs] = q
        return pieces[:q], start

    @njit(cache=True)
    def _run_sums(ws, pieces, lo, hi, part):  # pragma: no cover - compiled
        """``part[q] = (S_raw, A)`` of each piece ``q`` in ``lo:hi``."""
        for q in range(lo, hi):
            s, k, r0, r1 = pieces[q, 0], pieces[q, 1], pieces[q, 2], pieces[q, 3]
            part[q, 0], part[q, 1] = _sums_rows(ws[s], k, r0, r1)

    @njit(cache=True)
    def _run_gradients(ws, outs, pieces, lo, hi, coef):  # pragma: no cover - compiled
        """``outs[s][k] += c1 P_raw - c2 sign(W)`` on the rows of each piece in ``lo:hi``."""
        for q in range(lo, hi):
            s, k, r0, r1 = pieces[q, 0], pieces[q, 1], pieces[q, 2], pieces[q, 3]
            _grad_rows(ws[s], outs[s], k, r0, r1, coef[0, s, k], coef[1, s, k])

    @njit(cache=True)
    def _totals(ws, pieces, part):  # pragma: no cover - compiled
        """``(S_raw, A)`` per stack and matrix, ``(2, stacks, K)`` float64, from the pieces'
        partial sums, added in piece order."""
        sums = np.zeros((2, len(ws), ws[0].shape[0]))
        for q in range(pieces.shape[0]):
            sums[0, pieces[q, 0], pieces[q, 1]] += part[q, 0]
            sums[1, pieces[q, 0], pieces[q, 1]] += part[q, 1]
        return sums

    @njit(cache=True)
    def _entropy_total(sums, scale, dt):  # pragma: no cover - compiled
        """``scale * sum_stacks H_C`` per matrix index, ``(K,)`` in ``dt``, from the sums."""
        h = np.empty(sums.shape[2], dtype=dt)
        for k in range(sums.shape[2]):
            total = 0.0
            for s in range(sums.shape[1]):
                total += 0.5 * np.log(0.5 * sums[0, s, k] / _SCALE + _EPS2)
                total -= np.log(sums[1, s, k] + EPS)
            h[k] = scale * total
        return h

    @njit(cache=True)
    def _gradient_coefficients(sums, g, dt):  # pragma: no cover - compiled
        """``c1 = g_k / (S_raw + 2 EPS^2 1024)``, ``c2 = g_k / (A + EPS)`` per stack and
        matrix k, in ``dt``: ``g_k dH_C/dW = c1 P_raw - c2 sign(W)``."""
        coef = np.empty(sums.shape, dtype=dt)
        for s in range(sums.shape[1]):
            for k in range(sums.shape[2]):
                coef[0, s, k] = g[k] / (sums[0, s, k] + 2 * _SCALE * _EPS2)
                coef[1, s, k] = g[k] / (sums[1, s, k] + EPS)
        return coef

    @njit(parallel=True, cache=True)
    def _sums_parallel(ws, runs):  # pragma: no cover - compiled
        """``(S_raw, A)`` of every matrix of the stacks ``ws``, ``runs`` runs in parallel."""
        pieces, start = _work_runs(ws, runs)
        part = np.empty((pieces.shape[0], 2))
        for t in prange(runs):
            _run_sums(ws, pieces, start[t], start[t + 1], part)
        return _totals(ws, pieces, part)

    @njit(cache=True)
    def _sums_serial(ws):  # pragma: no cover - compiled
        """As :func:`_sums_parallel`, on the calling thread."""
        pieces, _ = _work_runs(ws, 1)
        part = np.empty((pieces.shape[0], 2))
        _run_sums(ws, pieces, 0, pieces.shape[0], part)
        return _totals(ws, pieces, part)

    @njit(parallel=True, cache=True)
    def _gradients_parallel(ws, outs, coef, runs):  # pragma: no cover - compiled
        """``outs[s] += g dH_C/dW`` for every stack (``coef``: the gradient coefficients)."""
        pieces, start = _work_runs(ws, runs)
        for t in prange(runs):
            _run_gradients(ws, outs, pieces, start[t], start[t + 1], coef)

    @njit(cache=True)
    def _gradients_serial(ws, outs, coef):  # pragma: no cover - compiled
        """As :func:`_gradients_parallel`, on the calling thread."""
        pieces, _ = _work_runs(ws, 1)
        _run_gradients(ws, outs, pieces, 0, pieces.shape[0], coef)

    @njit(cache=True)
    def _step_parallel(ws, outs, scale, runs):  # pragma: no cover - compiled
        """``outs[s] += scale dH_C/dW_s`` for every stack; returns ``scale sum_s H_C(W_s)``:
        the training step's whole work in one call from Python."""
        sums = _sums_parallel(ws, runs)
        g = np.full(sums.shape[2], scale)
        _gradients_parallel(ws, outs, _gradient_coefficients(sums, g, ws[0].dtype), runs)
        return _entropy_total(sums, scale, ws[0].dtype)

    @njit(cache=True)
    def _step_serial(ws, outs, scale):  # pragma: no cover - compiled
        """As :func:`_step_parallel`, on the calling thread."""
        sums = _sums_serial(ws)
        g = np.full(sums.shape[2], scale)
        _gradients_serial(ws, outs, _gradient_coefficients(sums, g, ws[0].dtype))
        return _entropy_total(sums, scale, ws[0].dtype)


PARALLEL_MIN_NUMEL = int(os.environ.get("SPARSEBENCH_ENTROPY_PARALLEL_MIN", "50000"))
"""Stacks with fewer elements in all (or a single thread) run the serial kernels."""


def _threads() -> int:
    """Threads for the kernels: exactly as many as torch uses, or 1 (the serial kernels).

    numba's OpenMP layer shares torch's libgomp here, and numba's parallel launch
    sets the calling thread's OpenMP thread count, which torch reads back as its
    own: so the parallel kernels run with torch's count or not at all, and
    torch's setting (e.g. one thread per Snakemake job) is left as it was.
    numba's count is per calling thread and others may change it: checked
    before every parallel launch (a microsecond, against a kernel of 100+).
    """
    want = torch.get_num_threads()
    if want == 1 or want > numba.config.NUMBA_NUM_THREADS:
        return 1
    if numba.get_num_threads() != want:
        numba.set_num_threads(want)
    return want


def _runs(arrays: tuple[np.ndarray, ...]) -> int:
    """How many runs (threads) the kernels split these stacks into; 1: the serial kernels."""
    if sum([a.size for a in arrays]) < PARALLEL_MIN_NUMEL:
        return 1
    return _threads()


def _numba_sums(arrays: tuple[np.ndarray, ...]) -> np.ndarray:
    """``(S_raw, A)`` per stack and matrix, ``(2, stacks, K)``, of C-contiguous stacks."""
    runs = _runs(arrays)
    return _sums_parallel(arrays, runs) if runs > 1 else _sums_serial(arrays)


def _numba_gradients(
    arrays: tuple[np.ndarray, ...], outs: tuple[np.ndarray, ...], coef: np.ndarray
) -> None:
    """``outs[s] += g dH_C/dW_s`` (``coef`` from :func:`_gradient_coefficients`)."""
    runs = _runs(arrays)
    if runs > 1:
        _gradients_parallel(arrays, outs, coef, runs)
    else:
        _gradients_serial(arrays, outs, coef)


def _as_array(w: Tensor) -> np.ndarray:
    w = w.detach()
    return (w if w.is_contiguous() else w.contiguous()).numpy()


class _FusedEntropy(torch.autograd.Function):
    """Sum of ``H_C`` over one or more stacks ``(K, out_l, in_l)`` (same K and dtype).

    One autograd node for all the layers of a network: the per-layer nodes and
    the stacking and summing of their outputs cost more than the kernels of the
    small layers. The forward computes H (S and A per layer); the backward
    recomputes P row by row from W and writes the gradient directly, so no
    W-sized buffer lives between the two. Plain numpy arrays (views of torch
    memory) travel on ctx: fewer conversions per call. Saving the inputs keeps
    autograd's check that they were not modified in place before backward.
    """

    @staticmethod
    def forward(ctx, *ws: Tensor) -> Tensor:
        arrays = tuple(_as_array(w) for w in ws)
        sums = _numba_sums(arrays)
        ctx.save_for_backward(*ws)
        ctx.arrays = arrays, sums
        return torch.from_numpy(_entropy_total(sums, 1.0, arrays[0].dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        ctx.saved_tensors  # noqa: B018 - raises if a weight was modified in place
        arrays, sums = ctx.arrays
        outs = tuple(np.zeros_like(wn) for wn in arrays)
        coef = _gradient_coefficients(sums, _as_array(grad), arrays[0].dtype)
        _numba_gradients(arrays, outs, coef)
        return tuple(
            torch.from_numpy(out) if needed else None
            for out, needed in zip(outs, ctx.needs_input_grad)
        )


_compiled: set[tuple[torch.dtype, bool, int]] = set()


def _warm_up(dtype: torch.dtype, parallel: bool, stacks: int) -> None:
    """Compile (or load from numba's cache) the serial or parallel kernels for ``dtype``
    and this many stacks (numba specialises on the tuple's length).

    Done once per (dtype, kind, stacks), on tiny matrices, inside the caller's try, so
    that a JIT that cannot work here fails in the forward (and falls back) rather than in
    a backward pass. The parallel kernels only when torch runs more than one thread.
    """
    ws = tuple(torch.linspace(-1, 1, 12, dtype=dtype).view(1, 3, 4).numpy() for _ in range(stacks))
    outs = tuple(np.zeros_like(w) for w in ws)
    g = np.ones(1, ws[0].dtype)  # as the backward's gradient comes: in the weights' dtype
    with numba_threads_like_torch():  # whatever numba's launch does to OpenMP
        if parallel:
            sums = _sums_parallel(ws, 2)
            _gradients_parallel(ws, outs, _gradient_coefficients(sums, g, ws[0].dtype), 2)
            h = _step_parallel(ws, outs, 1.0, 2)
        else:
            sums = _sums_serial(ws)
            _gradients_serial(ws, outs, _gradient_coefficients(sums, g, ws[0].dtype))
            h = _step_serial(ws, outs, 1.0)
    if not (np.isfinite(h).all() and all(np.isfinite(out).all() for out in outs)):
        raise RuntimeError("numba kernels gave non-finite values on a test matrix")
    _compiled.add((dtype, parallel, stacks))


def _numba_usable(w: Tensor) -> bool:
    if BACKEND in ("eager", "triton") or numba is None or _numba_broken:
        return False
    return w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64)


def _ensure_compiled(dtype: torch.dtype, stacks: int) -> None:
    if (dtype, False, stacks) not in _compiled:
        _warm_up(dtype, False, stacks)
    if torch.get_num_threads() > 1 and (dtype, True, stacks) not in _compiled:
        _warm_up(dtype, True, stacks)


def _fused(ws: list[Tensor]) -> Tensor:
    _ensure_compiled(ws[0].dtype, len(ws))
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
        return _FusedEntropy.apply(*ws)
    arrays = tuple(_as_array(w) for w in ws)
    return torch.from_numpy(_entropy_total(_numba_sums(arrays), 1.0, arrays[0].dtype))


def _fused_usable(ws: Sequence[Tensor]) -> bool:
    """Whether the fused kernels take these stacks (the ``BACKEND`` setting included)."""
    if BACKEND not in BACKENDS:
        raise ValueError(f"BACKEND must be one of {BACKENDS}, not {BACKEND!r}")
    usable = all(_numba_usable(w) for w in ws) and len({(w.dtype, w.shape[0]) for w in ws}) == 1
    if BACKEND == "numba" and not usable:
        raise RuntimeError(
            f"BACKEND='numba' but numba cannot run here (numba installed: {numba is not None}; "
            f"devices, dtypes, K: {[(str(w.device), w.dtype, w.shape[0]) for w in ws]})"
        )
    return usable


def _give_up_numba(err: Exception) -> None:
    """A JIT that cannot compile or run here: eager from now on, said once, loudly."""
    global _numba_broken
    if BACKEND == "numba":
        raise err
    _numba_broken = True
    warnings.warn(
        f"numba kernel for configuration entropy failed ({err!r}); "
        "falling back to the eager closed form",
        RuntimeWarning,
        stacklevel=4,
    )


# ----------------------------------------------------------------------------
# Triton kernels (CUDA, float32/float64).

_triton_state: dict[str, object] = {"module": None, "broken": False, "checked": set()}


def _triton_kernels(dtype: torch.dtype = torch.float32):
    """:mod:`sparsebench.entropy_triton`, imported (and its kernels compiled for ``dtype`` on
    a small matrix) on first use; None where Triton is missing or fails here (said once,
    loudly)."""
    if _triton_state["broken"]:
        return None
    if dtype not in _triton_state["checked"]:
        try:
            from sparsebench import entropy_triton

            w = torch.linspace(-1, 1, 12, device="cuda", dtype=dtype).view(1, 3, 4)
            out = torch.zeros_like(w)
            s, a = entropy_triton.entropy_sums(w)
            entropy_triton.add_gradient(w, out, (1 / s).to(dtype), (1 / a).to(dtype))
            if not bool(torch.isfinite(out).all()) or not bool(out.abs().sum() > 0):
                raise RuntimeError("Triton kernels gave wrong values on a test matrix")
        except Exception as err:
            if BACKEND == "triton":
                raise
            _triton_state["broken"] = True
            warnings.warn(
                f"Triton kernels for configuration entropy failed ({err!r}); "
                "falling back to the eager closed form",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        _triton_state["module"] = entropy_triton
        _triton_state["checked"].add(dtype)
    return _triton_state["module"]


def _triton_usable(ws: Sequence[Tensor]) -> bool:
    """Whether the Triton kernels take these stacks (and work here)."""
    on_gpu = all(w.device.type == "cuda" and w.dtype in (torch.float32, torch.float64) for w in ws)
    usable = (
        BACKEND in ("auto", "triton")
        and on_gpu
        and len({(w.dtype, w.shape[0], w.device) for w in ws}) == 1
    )
    if BACKEND == "triton" and not usable:
        raise RuntimeError(
            "BACKEND='triton' but these weights are not CUDA float32/float64 stacks of one "
            f"K: {[(str(w.device), w.dtype, w.shape[0]) for w in ws]}"
        )
    return usable and _triton_kernels(ws[0].dtype) is not None


def _triton_sums(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(H_C, S_raw, A)`` per matrix of a stack on the GPU (H in ``w``'s dtype)."""
    s_raw, a = _triton_kernels(w.dtype).entropy_sums(w.detach().contiguous())
    return _entropy_from_sums(s_raw, a).to(w.dtype), s_raw, a


def _entropy_sum(ws: list[Tensor]) -> Tensor:
    """Sum of ``H_C`` over stacks ``(K, out_l, in_l)``: the fused kernels or the eager form."""
    if _fused_usable(ws):
        try:
            return _fused(ws)
        except Exception as err:
            _give_up_numba(err)
    needs_grad = torch.is_grad_enabled() and any(w.requires_grad for w in ws)
    if not needs_grad and _triton_usable(ws):
        return torch.stack([_triton_sums(w)[0] for w in ws]).sum(0)
    return _eager(ws[0]) if len(ws) == 1 else torch.stack([_eager(w) for w in ws]).sum(0)


def in_place_gradient_available(weights: Sequence[Tensor]) -> bool:
    """Whether :func:`add_entropy_gradient` can run on these stacks: leaf ``(K, out, in)``
    tensors that the fused kernels take, compiled (a JIT that fails here falls back to
    the eager form, with the warning, and this returns False)."""
    ws = list(weights)
    if not ws or any(w.dim() != 3 or not w.is_leaf for w in ws):
        return False
    if not _fused_usable(ws):
        return _triton_usable(ws)
    try:
        _ensure_compiled(ws[0].dtype, len(ws))
    except Exception as err:
        _give_up_numba(err)
        return False
    return True


def add_entropy_gradient(weights: Sequence[Tensor], scale: float) -> Tensor:
    """``W_l.grad += scale * dH_C/dW_l`` in place; returns the term whose gradient that is,
    ``scale * sum_l H_C(W_l)``, shape ``(K,)``.

    The closed-form gradient without an autograd node (the training engine's path, after
    the backward pass of the rest of the loss): no gradient buffer is allocated and
    nothing is summed by autograd, which costs more than the kernels on small networks.
    On the CPU it is one call into compiled code for all the layers: inside a training
    step every Python-level operation costs several times what it does in a loop of its
    own (the step's memory traffic evicts the interpreter's data from the caches).
    A missing ``.grad`` is created. Needs :func:`in_place_gradient_available`.
    """
    grads = []
    for w in weights:
        grad = w.grad
        if grad is None:
            grad = w.grad = torch.zeros_like(w)
        elif not grad.is_contiguous():
            grad = w.grad = grad.contiguous()
        grads.append(grad)
    if weights[0].is_cuda:
        return _add_entropy_gradient_triton(weights, scale)
    arrays = tuple([_as_array(w) for w in weights])
    outs = tuple([grad.numpy() for grad in grads])
    runs = _runs(arrays)
    if runs > 1:
        return torch.from_numpy(_step_parallel(arrays, outs, scale, runs))
    return torch.from_numpy(_step_serial(arrays, outs, scale))


def _add_entropy_gradient_triton(weights: Sequence[Tensor], scale: float) -> Tensor:
    """:func:`add_entropy_gradient` on the GPU: nothing waits for the host."""
    total = None
    for w in weights:
        h, s_raw, a = _triton_sums(w)
        c1 = (scale / (s_raw + 2 * _SCALE * _EPS2)).to(w.dtype)
        c2 = (scale / (a + EPS)).to(w.dtype)
        _triton_kernels(w.dtype).add_gradient(w.detach().contiguous(), w.grad, c1, c2)
        total = h if total is None else total + h
    return scale * total


def configuration_entropy(weight: Tensor) -> Tensor:
    """``H_C`` per matrix, fast, with the closed-form gradient; ``(K, out, in) -> (K,)``.

    A single ``(out, in)`` matrix gives a 0-d tensor. Fused numba kernels on CPU
    float32/float64, Triton's on CUDA for values without autograd, else (other
    dtypes, no numba, autograd on CUDA, ``BACKEND == "eager"``) the eager
    separable closed form. If the numba kernels fail to compile or run
    here, a ``RuntimeWarning`` is issued once and the eager form is used from
    then on (with ``BACKEND == "numba"`` the error is raised instead).
    """
    w, squeeze = _as_batch(weight)
    h = _entropy_sum([w])
    return h[0] if squeeze else h


def configuration_entropy_sum(weights: Sequence[Tensor]) -> Tensor:
    """``sum_l H_C(W_l)`` over several stacks ``(K, out_l, in_l)``, shape ``(K,)``.

    Equal to summing :func:`configuration_entropy` over the layers, but one
    autograd node for them all on the fused path (what the regularizer uses).
    """
    ws = [_as_batch(w)[0] for w in weights]
    if not ws:
        raise ValueError("configuration_entropy_sum needs at least one weight matrix")
    return _entropy_sum(ws)


# ----------------------------------------------------------------------------
# The paper's Figure 1 and the registered regularizer.


def figure1_matrices(seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two 256x256 0/1 float32 matrices with 1024 ones each (the paper's Figure 1).

    The first has its ones scattered uniformly over the whole matrix, the second
    uniformly inside the central 64x64 block (rows and columns 96:160). Both have
    the same Lp norms; the scattered one has the higher ``H_C``.
    """
    gen = torch.Generator().manual_seed(seed)
    scattered = torch.zeros(256 * 256)
    scattered[torch.randperm(256 * 256, generator=gen)[:1024]] = 1.0
    block = torch.zeros(256, 256)
    inner = torch.zeros(64 * 64)
    inner[torch.randperm(64 * 64, generator=gen)[:1024]] = 1.0
    block[96:160, 96:160] = inner.view(64, 64)
    return scattered.view(256, 256), block


def _flatten_conv(weight: Tensor) -> Tensor:
    # The engine already passes conv weights as (K, out, in*kh*kw); accept rank 4+ too.
    return weight.flatten(2) if weight.dim() > 3 else weight


@register
class ConfigurationEntropy(Regularizer):
    """The paper formula's reading: per layer ``l_C(W) = -H_C(W)``.

    The added term is ``coefficient * sum_layers l_C(W)``: the paper's formula
    defines its right-hand side as the *negative* of the sparsity loss, so
    minimising the loss maximises ``H_C``. The prose's reading (minimise
    ``+H_C``) is the separate arm ``configuration_entropy_prose``, which only
    flips :attr:`sign`. Conv weights arrive from the engine as
    ``(K, out, in*kh*kw)``. :meth:`value` (the sum over the layers, what the
    training loss gets) is one fused autograd node for all layers; it equals
    the sum of :meth:`measure` over them.
    """

    name = "configuration_entropy"
    description = "configuration entropy, paper formula: coefficient * sum_layers (-H_C(W))"
    sign: ClassVar[float] = -1.0
    """``measure = sign * H_C``: -1 for the paper's formula (``l_C = -H_C``)."""

    def entropy(self, weight: Tensor) -> Tensor:
        """``H_C`` of stacked matrices ``(K, out, in)``, shape ``(K,)``."""
        return configuration_entropy(_flatten_conv(weight))

    def measure(self, weight: Tensor) -> Tensor:
        return self.sign * self.entropy(weight)

    def value(self, weights: Mapping[str, Tensor]) -> Tensor:
        selected = [_flatten_conv(w) for w in self.select(weights).values()]
        return self.sign * configuration_entropy_sum(selected)

    def writes_gradient(self, weights: Mapping[str, Tensor]) -> bool:
        return self.coefficient != 0.0 and in_place_gradient_available(
            list(self.select(weights).values())
        )

    def add_loss_gradient(self, weights: Mapping[str, Tensor]) -> Tensor:
        scale = self.sign * self.coefficient
        return add_entropy_gradient(list(self.select(weights).values()), scale)
