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
- :func:`add_entropy_gradient`: what training uses on CPU: the value, and the
  closed-form gradient added straight into each weight's ``.grad`` after the
  backward pass of the rest of the loss (no autograd node, no gradient buffer).
- :func:`configuration_entropy`: a ``torch.autograd.Function`` with the
  closed-form backward (training's path where the in-place one is not
  available). On CPU (float32 / float64) both run fused numba kernels, one pass
  over W each: the value sums ``S`` and ``A`` row by row; the gradient pass
  recomputes ``P = Cx^T Cx W + Cy^T Cy W`` row by row (a separable-sum 5x5
  stencil, see the comment above ``_grad_rows``) and adds
  ``g * (P / S - sign(W) / A)`` to its output directly, so nothing of W's size
  is kept between the two. Matrices of at
  least ``PARALLEL_MIN_NUMEL`` elements run on torch's thread count (chunks
  of rows), smaller ones serially. The first call per dtype compiles the
  kernels once per installation: about 4 s for the serial ones, 12 s with
  the parallel ones (compiled only when torch runs more than one thread) on
  this project's 2-core machine; numba's on-disk cache (``cache=True``) then
  makes every later process load them in about 0.3 s. Where numba is missing,
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
    @njit(fastmath=True, cache=True)
    def _sums_rows(w, k, r0, r1):  # pragma: no cover - compiled
        """(S_raw, A) over rows ``r0:r1`` of matrix ``k``: ``S_raw = |32 Cx W|^2 + |32 Cy W|^2``.

        Per row, a vertical pass over three rows of W (smoothing [3, 10, 3] and
        difference [1, 0, -1]) into zero-padded row buffers, then the horizontal
        difference and smoothing, squared and summed.
        """
        n, m = w.shape[1], w.shape[2]
        dt = w.dtype
        sv = np.zeros(m + 2, dtype=dt)  # one zero column each side
        dv = np.zeros(m + 2, dtype=dt)
        zrow = np.zeros(m, dtype=dt)
        # Constants in the array's dtype: a bare 3 would promote float32 math to float64.
        c = np.zeros(3, dtype=dt)
        c[1], c[2] = 3, 10
        zero, c3, c10 = c[0], c[1], c[2]
        s_acc = 0.0
        a_acc = 0.0
        for i in range(r0, r1):
            wu = w[k, i - 1] if i >= 1 else zrow  # zero rows outside the matrix
            wc = w[k, i]
            wd = w[k, i + 1] if i <= n - 2 else zrow
            acc = zero  # per-row sums in the array's dtype (vectorises), totals in float64
            for j in range(m):
                u = wu[j]
                d = wd[j]
                x = wc[j]
                sv[j + 1] = c3 * (u + d) + c10 * x
                dv[j + 1] = u - d
                acc += abs(x)
            a_acc += acc
            acc = zero
            for j in range(m):
                ex = sv[j] - sv[j + 2]
                ey = c3 * (dv[j] + dv[j + 2]) + c10 * dv[j + 1]
                acc += ex * ex + ey * ey
            s_acc += acc
        return s_acc, a_acc

    @njit(fastmath=True, cache=True)
    def _border_p(q2, t2, q0, j, m, t1j):  # pragma: no cover - compiled
        """P_raw at a border column ``j`` (0 or m-1): H1 centre 2 -> 1, H2 centre 118 -> 109."""
        pj = q2[j] + q2[j + 4] + 60 * (t2[j + 1] + t2[j + 3]) + q0[j + 2]
        borders = (1 if j == 0 else 0) + (1 if j == m - 1 else 0)
        return pj - borders * (t1j + 9 * t2[j + 2])

    @njit(fastmath=True, cache=True)
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

    @njit(fastmath=True, cache=True)
    def _finish(s_part, a_part, nchunk, h, sums):  # pragma: no cover - compiled
        """Per-matrix totals of the chunks' partial sums; ``h[k] = H_C``."""
        for k in range(h.shape[0]):
            s = 0.0
            a = 0.0
            for t in range(k * nchunk, (k + 1) * nchunk):
                s += s_part[t]
                a += a_part[t]
            sums[0, k] = s
            sums[1, k] = a
            h[k] = 0.5 * np.log(0.5 * s / _SCALE + _EPS2) - np.log(a + EPS)

    @njit(fastmath=True, cache=True)
    def _coefficients(g, sums, k, dt):  # pragma: no cover - compiled
        """``g / (S_raw + 2 EPS^2 1024)``, ``g / (A + EPS)``: dH/dW = c1 P_raw - c2 sign(W)."""
        c1 = g[k] / (sums[0, k] + 2 * _SCALE * _EPS2)
        c2 = g[k] / (sums[1, k] + EPS)
        return dt.type(c1), dt.type(c2)

    @njit(parallel=True, fastmath=True, cache=True)
    def _value_parallel(w, rows_per_chunk, h, sums):  # pragma: no cover - compiled
        """Writes ``h[k] = H_C(w[k])`` and ``sums[:, k] = (S_raw, A)``; chunks of rows."""
        kk, n = w.shape[0], w.shape[1]
        nchunk = (n + rows_per_chunk - 1) // rows_per_chunk
        s_part = np.zeros(kk * nchunk)
        a_part = np.zeros(kk * nchunk)
        for t in prange(kk * nchunk):
            r0 = (t % nchunk) * rows_per_chunk
            r1 = min(n, r0 + rows_per_chunk)
            s_part[t], a_part[t] = _sums_rows(w, t // nchunk, r0, r1)
        _finish(s_part, a_part, nchunk, h, sums)

    @njit(fastmath=True, cache=True)
    def _value_serial(w, rows_per_chunk, h, sums):  # pragma: no cover - compiled
        """As :func:`_value_parallel`, on the calling thread (one chunk per matrix)."""
        kk = w.shape[0]
        s_part = np.zeros(kk)
        a_part = np.zeros(kk)
        for k in range(kk):
            s_part[k], a_part[k] = _sums_rows(w, k, 0, w.shape[1])
        _finish(s_part, a_part, 1, h, sums)

    @njit(parallel=True, fastmath=True, cache=True)
    def _grad_parallel(w, rows_per_chunk, g, sums, out):  # pragma: no cover - compiled
        """``out[k] += g[k] * dH_C/dW`` from the forward's ``sums``; chunks of rows."""
        kk, n = w.shape[0], w.shape[1]
        nchunk = (n + rows_per_chunk - 1) // rows_per_chunk
        for t in prange(kk * nchunk):
            k = t // nchunk
            r0 = (t % nchunk) * rows_per_chunk
            c1, c2 = _coefficients(g, sums, k, w.dtype)
            _grad_rows(w, out, k, r0, min(n, r0 + rows_per_chunk), c1, c2)

    @njit(fastmath=True, cache=True)
    def _grad_serial(w, rows_per_chunk, g, sums, out):  # pragma: no cover - compiled
        """As :func:`_grad_parallel`, on the calling thread."""
        for k in range(w.shape[0]):
            c1, c2 = _coefficients(g, sums, k, w.dtype)
            _grad_rows(w, out, k, 0, w.shape[1], c1, c2)


PARALLEL_MIN_NUMEL = int(os.environ.get("SPARSEBENCH_ENTROPY_PARALLEL_MIN", "50000"))
"""Stacks with fewer elements (or a single thread) run the serial kernels."""


def _rows_per_chunk(kk: int, n: int, threads: int) -> int:
    # Enough work items to keep every thread busy.
    per_matrix = max(1, -(-2 * threads // kk))
    return max(8, -(-n // per_matrix))


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


def _numba_value(wn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, sums (S_raw, A) as a float64 (2, K) array) of a C-contiguous array."""
    parallel, rows_per_chunk = _plan(wn)
    h = np.empty(wn.shape[0], dtype=wn.dtype)
    sums = np.empty((2, wn.shape[0]))
    (_value_parallel if parallel else _value_serial)(wn, rows_per_chunk, h, sums)
    return h, sums


def _add_gradient(wn: np.ndarray, g: np.ndarray, sums: np.ndarray, out: np.ndarray) -> None:
    """``out[k] += g[k] * dH_C/dW[k]`` for the C-contiguous stack ``wn`` and its forward sums."""
    parallel, rows_per_chunk = _plan(wn)
    (_grad_parallel if parallel else _grad_serial)(wn, rows_per_chunk, g, sums, out)


def _plan(wn: np.ndarray) -> tuple[bool, int]:
    """(parallel?, rows per chunk) for the stack ``wn``."""
    if wn.size < PARALLEL_MIN_NUMEL:
        return False, wn.shape[1]
    threads = _threads()
    return threads > 1, _rows_per_chunk(wn.shape[0], wn.shape[1], threads)


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
        arrays = [_as_array(w) for w in ws]
        total = None
        sums = []
        for wn in arrays:
            h, s = _numba_value(wn)
            total = h if total is None else total + h
            sums.append(s)
        ctx.save_for_backward(*ws)
        ctx.arrays = arrays, sums
        return torch.from_numpy(total)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:
        ctx.saved_tensors  # noqa: B018 - raises if a weight was modified in place
        arrays, sums = ctx.arrays
        g = _as_array(grad)
        grads: list[Tensor | None] = []
        for wn, s, needed in zip(arrays, sums, ctx.needs_input_grad):
            if not needed:
                grads.append(None)
                continue
            out = np.zeros_like(wn)
            _add_gradient(wn, g, s, out)
            grads.append(torch.from_numpy(out))
        return tuple(grads)


_compiled: set[tuple[torch.dtype, bool]] = set()


def _warm_up(dtype: torch.dtype, parallel: bool) -> None:
    """Compile (or load from numba's cache) the serial or parallel kernels for ``dtype``.

    Done once per (dtype, kind), on a tiny matrix, inside the caller's try, so
    that a JIT that cannot work here fails in the forward (and falls back)
    rather than in a backward pass. The parallel kernels (the slower ones to
    compile) only when torch runs more than one thread.
    """
    w = torch.linspace(-1, 1, 12, dtype=dtype).view(1, 3, 4).numpy()
    out, h, sums = np.zeros_like(w), np.empty(1, w.dtype), np.empty((2, 1))
    value, grad = (_value_parallel, _grad_parallel) if parallel else (_value_serial, _grad_serial)
    with numba_threads_like_torch():  # whatever numba's launch does to OpenMP
        value(w, 2, h, sums)
        grad(w, 2, np.ones(1, w.dtype), sums, out)
    if not (np.isfinite(h).all() and np.isfinite(out).all()):
        raise RuntimeError("numba kernels gave non-finite values on a test matrix")
    _compiled.add((dtype, parallel))


def _numba_usable(w: Tensor) -> bool:
    if BACKEND in ("eager", "triton") or numba is None or _numba_broken:
        return False
    return w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64)


def _ensure_compiled(dtype: torch.dtype) -> None:
    if (dtype, False) not in _compiled:
        _warm_up(dtype, parallel=False)
    if torch.get_num_threads() > 1 and (dtype, True) not in _compiled:
        _warm_up(dtype, parallel=True)


def _fused(ws: list[Tensor]) -> Tensor:
    _ensure_compiled(ws[0].dtype)
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
        return _FusedEntropy.apply(*ws)
    return torch.from_numpy(sum(_numba_value(_as_array(w))[0] for w in ws))


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
        _ensure_compiled(ws[0].dtype)
    except Exception as err:
        _give_up_numba(err)
        return False
    return True


@torch.no_grad()
def add_entropy_gradient(weights: Sequence[Tensor], scale: float) -> Tensor:
    """``sum_l H_C(W_l)``, shape ``(K,)``, and ``W_l.grad += scale * dH_C/dW_l`` in place.

    The closed-form gradient without an autograd node (the training engine's path, after
    the backward pass of the rest of the loss): no gradient buffer is allocated and
    nothing is summed by autograd, which costs more than the kernels on small networks.
    A missing ``.grad`` is created. Needs :func:`in_place_gradient_available`.
    """
    for w in weights:
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        elif not w.grad.is_contiguous():
            w.grad = w.grad.contiguous()
    if weights[0].device.type == "cuda":
        return _add_entropy_gradient_triton(weights, scale)
    arrays = [_as_array(w) for w in weights]
    g = np.full(arrays[0].shape[0], scale, dtype=arrays[0].dtype)  # one K and dtype for all
    total = None
    for w, wn in zip(weights, arrays):
        h, sums = _numba_value(wn)
        _add_gradient(wn, g, sums, w.grad.numpy())
        total = h if total is None else total + h
    return torch.from_numpy(total)


def _add_entropy_gradient_triton(weights: Sequence[Tensor], scale: float) -> Tensor:
    """:func:`add_entropy_gradient` on the GPU: nothing waits for the host."""
    total = None
    for w in weights:
        h, s_raw, a = _triton_sums(w)
        c1 = (scale / (s_raw + 2 * _SCALE * _EPS2)).to(w.dtype)
        c2 = (scale / (a + EPS)).to(w.dtype)
        _triton_kernels(w.dtype).add_gradient(w.detach().contiguous(), w.grad, c1, c2)
        total = h if total is None else total + h
    return total


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
        return scale * add_entropy_gradient(list(self.select(weights).values()), scale)
