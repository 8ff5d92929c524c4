"""Micro-benchmark of the configuration-entropy implementations (value + gradient).

Times, side by side in one run (interleaved rounds in shuffled order), the value
and gradient of H_C summed over LeNet300's three weight matrices (300x784,
100x300, 10x100), stacked K = 1 and K = 8 seeds, for:

- ``reference``: F.conv2d with the 3x3 Scharr kernels, autograd backward;
- ``eager``: the separable closed form (autograd.Function, eager torch ops);
- ``fused``: the numba kernels used in training (the default path on CPU:
  the parallel kernels for stacks of at least ``PARALLEL_MIN_NUMEL`` elements
  when torch has more than one thread, else the serial ones);
- ``fused-sum``: the same kernels, all three layers in one autograd node
  (``configuration_entropy_sum``, what the regularizer's ``value`` uses);
- ``fused-1t``: the serial numba kernels only, one node per layer;
- ``in-place``: the same kernels without autograd, the gradient added to each
  weight's ``.grad`` (``add_entropy_gradient``, what training uses on CPU);
- ``floor``: ``w.sum((1, 2))``, the same harness with a trivial function (three
  outputs summed, ``autograd.grad``; the gradient an expanded view): the part of
  every row that is not the implementation's own;
- ``compiled`` (``--compile``): torch.compile of the separable form's value, its
  gradient by autograd through the compiled graph.

and the ratio of each to the reference. Wall-clock times (median and min) and
process CPU times (which include every thread, and spinning) are both shown:
on a shared machine the CPU time and the min are the steadier numbers;
``--threads 1`` makes CPU time equal work. ``--cold`` also measures the first
call's JIT compile time of the numba kernels in fresh subprocesses, with an
empty cache and then with the cache it just wrote.

    python benchmarks/entropy_kernel.py [--rounds 200] [--compile] [--cold]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from sparsebench.regularizers import configuration_entropy as ce

SHAPES = [(300, 784), (100, 300), (10, 100)]


def _on_backend(backend: str, fn):
    """``fn`` run with configuration entropy's ``BACKEND`` set to ``backend``."""

    def run(arg):
        saved, ce.BACKEND = ce.BACKEND, backend
        try:
            return fn(arg)
        finally:
            ce.BACKEND = saved

    return run


def _per_layer(fn):
    """A function of one stack ``(K, out, in)`` made one of all layers: the sum over them."""
    return lambda weights: sum(fn(w) for w in weights)


_fused = _on_backend("numba", ce.configuration_entropy)


def _fused_serial(w):
    limit, ce.PARALLEL_MIN_NUMEL = ce.PARALLEL_MIN_NUMEL, 2**62
    try:
        return _fused(w)
    finally:
        ce.PARALLEL_MIN_NUMEL = limit


def _floor(w):
    # The cheapest differentiable (K,) function of the same weights (its gradient is
    # an expanded view, no W-sized memory): what the harness costs on its own.
    return w.sum((1, 2))


def _autograd(fn):
    """A step of ``fn`` (a function of all layers' weights, shape (K,)): value and
    gradient by autograd."""
    return lambda weights: torch.autograd.grad(fn(weights).sum(), weights)


def _in_place(weights):
    return ce.add_entropy_gradient(weights, 1.0)


def bench(impls: dict, k: int, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per implementation: (wall times, process CPU times) of ``rounds`` interleaved steps."""
    gen = torch.Generator().manual_seed(0)
    weights = [(0.05 * torch.randn(k, o, i, generator=gen)).requires_grad_() for o, i in SHAPES]
    for step in impls.values():  # warm-up (JIT, allocator)
        for _ in range(5):
            step(weights)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in impls}
    order = random.Random(0)
    names = list(impls)
    for _ in range(rounds):
        order.shuffle(names)  # no implementation always runs after the same one
        for name in names:
            step = impls[name]
            c0, t0 = time.process_time(), time.perf_counter()
            step(weights)
            t1, c1 = time.perf_counter(), time.process_time()
            times[name][0].append(t1 - t0)
            times[name][1].append(c1 - c0)
    return times


_COLD = """
import time, torch
t0 = time.perf_counter()
from sparsebench.regularizers import configuration_entropy as ce
t1 = time.perf_counter()
for dt in (torch.float32, torch.float64):
    w = torch.randn(1, 30, 40, dtype=dt, requires_grad=True)
    t = time.perf_counter()
    torch.autograd.grad(ce.configuration_entropy(w).sum(), w)
    print(f"  first call {str(dt):14s} {time.perf_counter() - t:7.3f} s")
print(f"  (import of the module incl. torch and numba: {t1 - t0:.2f} s)")
"""


def cold_start() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "SPARSEBENCH_ENTROPY_BACKEND": "numba"}
        for label in ("empty numba cache (compile)", "cache written by the run above"):
            print(f"first-call cost, {label}:")
            subprocess.run([sys.executable, "-c", _COLD], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--cold", action="store_true", help="also time the first JIT call")
    parser.add_argument("--threads", type=int, default=None, help="torch (and numba) threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    impls = {  # each a value + gradient step on all layers' weights
        "reference": _autograd(_per_layer(ce.configuration_entropy_reference)),
        "eager": _autograd(_per_layer(_on_backend("eager", ce.configuration_entropy))),
        "fused": _autograd(_per_layer(_fused)),
        "fused-sum": _autograd(_on_backend("numba", ce.configuration_entropy_sum)),
        "fused-1t": _autograd(_per_layer(_fused_serial)),
        "in-place": _in_place,
        "floor": _autograd(_per_layer(_floor)),
    }
    if args.compile:
        eager_value = torch.compile(lambda w: ce._entropy_from_sums(*ce._eager_sums(w)[2:]))
        impls["compiled"] = _autograd(_per_layer(eager_value))

    print(
        f"torch {torch.__version__}, numba {getattr(ce.numba, '__version__', 'missing')}, "
        f"torch threads {torch.get_num_threads()}; value+grad of H_C over LeNet300's "
        f"{', '.join(f'{o}x{i}' for o, i in SHAPES)}; median of {args.rounds} rounds"
    )
    print(
        "ms per value+grad step: wall median and min, process CPU time mean (all threads);\n"
        "ratio: wall median / the reference's (the CPU-time ratio in brackets)"
    )
    print(f"{'K':>3} {'impl':>10} {'wall med':>9} {'wall min':>9} {'cpu mean':>9} {'ratio':>7}")
    for k in (1, 8):
        res = bench(impls, k, args.rounds)
        ref_wall = statistics.median(res["reference"][0])
        # The mean, not the median: the other threads' CPU time reaches the process clock in
        # steps (at their scheduler ticks), which a sub-millisecond call's delta mostly misses.
        ref_cpu = statistics.mean(res["reference"][1])
        for name, (wall, cpu) in res.items():
            w_med, c_mean = statistics.median(wall), statistics.mean(cpu)
            print(
                f"{k:>3} {name:>10} {1e3 * w_med:9.3f} {1e3 * min(wall):9.3f} {1e3 * c_mean:9.3f}"
                f" {w_med / ref_wall:6.3f}x ({c_mean / ref_cpu:.3f}x)"
            )
    if args.cold:
        cold_start()


if __name__ == "__main__":
    main()
