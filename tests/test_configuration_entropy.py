"""Configuration entropy: its properties, every implementation against the conv2d
reference, and the two registered arms (paper formula and prose reading)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sparsebench.regularizers as regs
from sparsebench.regularizers import configuration_entropy as ce

BACKENDS = [
    "eager",
    pytest.param("numba", marks=pytest.mark.skipif(ce.numba is None, reason="numba not installed")),
]
SHAPES = [(1, 1, 1), (1, 1, 9), (2, 9, 1), (1, 2, 2), (3, 2, 2), (2, 3, 5), (4, 17, 33)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Force one code path of :func:`configuration_entropy` for the test."""
    monkeypatch.setattr(ce, "BACKEND", request.param)
    return request.param


def _value_and_grad(fn, w):
    w = w.detach().clone().requires_grad_()
    h = fn(w)
    (g,) = torch.autograd.grad(h.sum(), w)
    return h.detach(), g, h.grad_fn


def _rand(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_backend_flag_selects_the_code_path(backend):
    w = _rand((2, 4, 5)).requires_grad_()
    expected = {"numba": "_FusedEntropyBackward", "eager": "_EagerEntropyBackward"}[backend]
    assert type(ce.configuration_entropy(w).grad_fn).__name__ == expected


@pytest.mark.parametrize("a", [-3.0, 0.5, 10.0])
def test_scale_invariance(backend, a):
    w = _rand((3, 20, 30))
    h = ce.configuration_entropy(w)
    torch.testing.assert_close(ce.configuration_entropy(a * w), h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce.configuration_entropy_reference(a * w), h)


def test_figure1_matrices():
    scattered, block = ce.figure1_matrices(seed=0)
    for m in (scattered, block):
        assert m.shape == (256, 256)
        assert set(m.unique().tolist()) == {0.0, 1.0}
        assert int(m.sum()) == 1024
    inside = block[96:160, 96:160]
    assert int(inside.sum()) == 1024
    # Scattered over the whole matrix: ones outside the central block too.
    assert int(scattered.sum()) - int(scattered[96:160, 96:160].sum()) > 900
    # Same Lp norms; reproducible per seed, different across seeds.
    for p in (1, 2, 3):
        assert torch.linalg.vector_norm(scattered, p) == torch.linalg.vector_norm(block, p)
    assert torch.equal(ce.figure1_matrices(0)[0], scattered)
    assert not torch.equal(ce.figure1_matrices(1)[0], scattered)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_figure1_scattered_has_higher_entropy(backend, seed):
    scattered, block = ce.figure1_matrices(seed=seed)
    h_ref = ce.configuration_entropy_reference(torch.stack([scattered, block]))
    h = ce.configuration_entropy(torch.stack([scattered, block]))
    torch.testing.assert_close(h, h_ref)
    assert h[0] > h[1] + 0.05  # about 0.12 over seeds 0..49 (0.11 at least)
    # Scattered ones are mostly isolated: each isolated one adds 2 * 236 / 1024 to S.
    assert h[0] == pytest.approx(0.5 * math.log(1024 * 236 / 1024) - math.log(1024), abs=0.05)


@pytest.mark.parametrize("shape", [(2, 5, 7), (2, 1, 4), (2, 4, 1), (2, 3, 3)])
def test_gradient_matches_finite_differences(backend, shape):
    w = _rand(shape, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(ce.configuration_entropy, (w,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(ce.configuration_entropy_reference, (w,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [*SHAPES, (1, 300, 784)])
def test_fast_equals_reference_float32(backend, shape):
    w = _rand(shape, dtype=torch.float32, seed=2)
    h, g, _ = _value_and_grad(ce.configuration_entropy, w)
    h_ref, g_ref, _ = _value_and_grad(ce.configuration_entropy_reference, w)
    assert h.dtype == g.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())


def test_fast_equals_reference_float64_and_noncontiguous(backend):
    w = _rand((3, 11, 6)).transpose(1, 2)  # not contiguous
    h, g, _ = _value_and_grad(ce.configuration_entropy, w)
    h_ref, g_ref, _ = _value_and_grad(ce.configuration_entropy_reference, w)
    assert h.dtype == torch.float64
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.skipif(ce.numba is None, reason="numba not installed")
@pytest.mark.parametrize("runs", [1, 2, 3, 5])
def test_work_runs_cover_every_row_once_in_equal_shares(runs):
    ws = tuple(np.zeros(shape, np.float32) for shape in [(2, 30, 98), (2, 10, 30), (2, 1, 10)])
    pieces, start = ce._work_runs(ws, runs)
    assert len(start) == runs + 1 and start[0] == 0 and start[-1] == len(pieces)
    assert (np.diff(start) >= 0).all()
    rows = sorted((s, k, i) for s, k, r0, r1 in pieces for i in range(r0, r1))
    assert rows == [
        (s, k, i) for s, w in enumerate(ws) for k in range(2) for i in range(w.shape[1])
    ]
    for t in range(runs):  # each run: the same share (to a row) of every matrix
        mine = pieces[start[t] : start[t + 1]]
        for s, w in enumerate(ws):
            for k in range(2):
                taken = sum(r1 - r0 for s2, k2, r0, r1 in mine if (s2, k2) == (s, k))
                assert w.shape[1] // runs <= taken <= -(-w.shape[1] // runs)


@pytest.mark.skipif(ce.numba is None, reason="numba not installed")
@pytest.mark.parametrize(
    "shapes", [[(3, 17, 33)], [(2, 1, 5), (2, 40, 3)], [(2, 30, 20), (2, 7, 30)]]
)
def test_parallel_kernels_equal_serial_ones(shapes):
    """However the layers' rows are cut into runs, the parallel kernels equal the serial
    ones; the gradient kernels add to their outputs; the one-call step equals the two."""
    ws = tuple(
        _rand(shape, dtype=torch.float32, seed=5 + i).numpy() for i, shape in enumerate(shapes)
    )
    kk = shapes[0][0]
    sums = ce._sums_serial(ws)
    coef = ce._gradient_coefficients(sums, np.arange(1.0, kk + 1), ws[0].dtype)
    outs = tuple(np.zeros_like(w) for w in ws)
    ce._gradients_serial(ws, outs, coef)
    for runs in (1, 2, 3, 7):
        np.testing.assert_allclose(ce._sums_parallel(ws, runs), sums, rtol=1e-5)
        twice = tuple(np.zeros_like(w) for w in ws)
        ce._gradients_parallel(ws, twice, coef, runs)
        ce._gradients_parallel(ws, twice, coef, runs)
        for out, out2 in zip(outs, twice):
            np.testing.assert_allclose(out2, 2 * out, rtol=1e-5, atol=2e-6 * np.abs(out).max())
    h = ce._entropy_total(sums, 1.0, ws[0].dtype)
    once = ce._gradient_coefficients(sums, np.full(kk, -2.0), ws[0].dtype)
    expected = tuple(np.ones_like(w) for w in ws)
    ce._gradients_serial(ws, expected, once)
    for step in (
        lambda o: ce._step_serial(ws, o, -2.0),
        lambda o: ce._step_parallel(ws, o, -2.0, 3),
    ):
        stepped = tuple(np.ones_like(w) for w in ws)
        np.testing.assert_allclose(step(stepped), -2.0 * h, rtol=1e-6)
        for out, out2 in zip(expected, stepped):
            np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-6 * np.abs(out).max())


@pytest.mark.parametrize("min_numel", [0, 10**9])
def test_parallel_and_serial_paths_equal_reference(monkeypatch, min_numel):
    monkeypatch.setattr(ce, "BACKEND", "auto")
    monkeypatch.setattr(ce, "PARALLEL_MIN_NUMEL", min_numel)
    w = _rand((3, 30, 20), dtype=torch.float32, seed=6)
    h, g, _ = _value_and_grad(ce.configuration_entropy, w)
    h_ref, g_ref, _ = _value_and_grad(ce.configuration_entropy_reference, w)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())


# A few training steps with configuration entropy, in a process of its own; prints the
# weights' digest.
_TRAIN_AND_DIGEST = """
import hashlib, torch
from sparsebench import regularizers
from sparsebench.config import TrainHparams
from sparsebench.data import Split
from sparsebench.train import train_networks
g = torch.Generator().manual_seed(0)
data = Split(torch.randn(512, 784, generator=g), torch.randint(0, 10, (512,), generator=g))
entropy = regularizers.build({"name": "configuration_entropy", "coefficient": 1.0})
hparams = TrainHparams(epochs=2, batch_size=64, eval_batch_size=512)
model, _ = train_networks("lenet300", [4, 7], [entropy], hparams, data, data, "cpu")
weights = b"".join(w.detach().numpy().tobytes() for w in model.weight_matrices().values())
print(hashlib.sha256(weights).hexdigest())
"""


@pytest.mark.skipif(ce.numba is None, reason="numba not installed")
def test_training_gives_the_same_bits_with_kernels_compiled_afresh_or_from_the_cache(tmp_path):
    """The first process compiles the kernels into an empty numba cache, the second loads
    them from it: the same numbers (a job that compiled and one that did not agree)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "SPARSEBENCH_ENTROPY_BACKEND": "numba"}
    digests = [
        subprocess.run(
            [sys.executable, "-c", _TRAIN_AND_DIGEST], env=env, capture_output=True, text=True
        )
        for _ in range(2)
    ]
    assert [d.returncode for d in digests] == [0, 0], digests[0].stderr[-2000:]
    assert digests[0].stdout == digests[1].stdout


@pytest.mark.skipif(ce.numba is None, reason="numba not installed")
@pytest.mark.parametrize("threads", [1, 2])
def test_torch_thread_count_is_left_alone(monkeypatch, threads):
    """numba's parallel launch sets OpenMP's thread count; torch's must survive it."""
    monkeypatch.setattr(ce, "BACKEND", "numba")
    monkeypatch.setattr(ce, "PARALLEL_MIN_NUMEL", 0)
    monkeypatch.setattr(ce, "_compiled", set())  # the warm-up launches too
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        w = _rand((2, 30, 20), dtype=torch.float32).requires_grad_()
        torch.autograd.grad(ce.configuration_entropy(w).sum(), w)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_sum_over_layers_is_one_node_equal_to_the_per_layer_sum(backend):
    ws = [
        _rand(shape, dtype=torch.float32, seed=i).requires_grad_()
        for i, shape in enumerate([(3, 30, 40), (3, 7, 30), (3, 1, 7)])
    ]
    frozen = _rand((3, 5, 5), dtype=torch.float32, seed=9)  # needs no gradient
    total = ce.configuration_entropy_sum([*ws, frozen])
    if backend == "numba":
        assert type(total.grad_fn).__name__ == "_FusedEntropyBackward"
    grads = torch.autograd.grad((total * torch.tensor([1.0, -2.0, 0.5])).sum(), ws)
    ref = sum(ce.configuration_entropy_reference(w) for w in [*ws, frozen])
    ref_grads = torch.autograd.grad((ref * torch.tensor([1.0, -2.0, 0.5])).sum(), ws)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(
            ce.configuration_entropy_sum(ws),
            ref - ce.configuration_entropy_reference(frozen),
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(ValueError):
        ce.configuration_entropy_sum([])


def test_value_without_grad_and_2d_input(backend):
    w = _rand((2, 6, 9))
    with torch.no_grad():
        h = ce.configuration_entropy(w)
    torch.testing.assert_close(h, ce.configuration_entropy_reference(w))
    torch.testing.assert_close(ce.configuration_entropy(w[1]), h[1])
    assert ce.configuration_entropy(w[1]).shape == ()


@pytest.mark.parametrize("fn", ["fast", "reference"])
def test_finite_on_zero_and_single_nonzero(backend, fn):
    f = ce.configuration_entropy if fn == "fast" else ce.configuration_entropy_reference
    zero = torch.zeros(2, 6, 7)
    single = torch.zeros(2, 6, 7)
    single[0, 3, 4] = 2.5  # inside
    single[1, 0, 0] = -1.0  # in a corner
    tiny = torch.zeros(1, 1, 1) + 0.5  # S = 0 with A > 0
    for w in (zero, single, tiny, torch.zeros(1, 1, 1)):
        h, g, _ = _value_and_grad(f, w)
        assert torch.isfinite(h).all() and torch.isfinite(g).all()
    h, g, _ = _value_and_grad(f, zero)
    assert torch.equal(h, torch.zeros(2)) and torch.equal(g, torch.zeros_like(zero))
    # An isolated one: S = 2 * (9 + 100 + 9) * 2 / 1024, A = 1.
    h, _, _ = _value_and_grad(f, single)
    assert h[0].item() == pytest.approx(0.5 * math.log(236 / 1024), rel=1e-5)


def test_numba_failure_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(ce, "BACKEND", "auto")
    monkeypatch.setattr(ce, "_numba_broken", False)

    def broken(w):
        raise RuntimeError("no JIT here")

    monkeypatch.setattr(ce, "_fused", broken)
    w = _rand((2, 5, 6), dtype=torch.float32)
    if ce.numba is not None:
        with pytest.warns(RuntimeWarning, match="falling back"):
            h = ce.configuration_entropy(w)
        assert ce._numba_broken
    h = ce.configuration_entropy(w)  # no second warning: eager from now on
    torch.testing.assert_close(h, ce.configuration_entropy_reference(w))
    monkeypatch.setattr(ce, "BACKEND", "numba")
    with pytest.raises(RuntimeError):
        ce.configuration_entropy(w)


def test_bad_backend_and_other_dtypes(monkeypatch):
    monkeypatch.setattr(ce, "BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="BACKEND"):
        ce.configuration_entropy(torch.ones(1, 2, 2))
    monkeypatch.setattr(ce, "BACKEND", "auto")
    w = _rand((1, 5, 6), dtype=torch.float32)
    h16, g16, fn = _value_and_grad(ce.configuration_entropy, w.to(torch.bfloat16))
    assert type(fn).__name__ == "_EagerEntropyBackward"  # numba kernels are float32/64 only
    assert h16.dtype == torch.bfloat16 and torch.isfinite(g16.float()).all()
    torch.testing.assert_close(h16.float(), ce.configuration_entropy(w), rtol=0.05, atol=0.05)


def test_registered_arms(backend):
    w = _rand((3, 8, 12), dtype=torch.float32)
    h = ce.configuration_entropy_reference(w)
    paper = regs.get("configuration_entropy")(coefficient=2.0)
    prose = regs.get("configuration_entropy_prose")(coefficient=2.0)
    torch.testing.assert_close(paper.loss_term({"fc1": w}), -2 * h)
    torch.testing.assert_close(prose.loss_term({"fc1": w}), 2 * h)
    # Batched K=3 equals three K=1 calls; layers add up.
    single = torch.cat([paper.loss_term({"fc1": w[k : k + 1]}) for k in range(3)])
    torch.testing.assert_close(paper.loss_term({"fc1": w}), single)
    v = _rand((3, 4, 5), dtype=torch.float32, seed=3)
    torch.testing.assert_close(
        paper.loss_term({"fc1": w, "fc2": v}), -2 * (h + ce.configuration_entropy_reference(v))
    )
    # value() (one fused node for all layers) is the sum of measure() over them.
    for arm in (paper, prose):
        layers = {"fc1": w, "fc2": v}
        torch.testing.assert_close(
            arm.value(layers), arm.measure(w) + arm.measure(v), rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(regs.get(arm.name)(layers=["fc2"]).value(layers), arm.measure(v))
    # A conv weight given as (K, out, in, kh, kw) is read as (K, out, in*kh*kw).
    conv = _rand((3, 4, 2, 3, 3), dtype=torch.float32, seed=4)
    torch.testing.assert_close(
        paper.measure(conv), -ce.configuration_entropy_reference(conv.flatten(2))
    )
    # The gradient flows through the arm with the arm's sign.
    wg = w.clone().requires_grad_()
    (g,) = torch.autograd.grad(paper.loss_term({"fc1": wg}).sum(), wg)
    _, g_ref, _ = _value_and_grad(ce.configuration_entropy_reference, w)
    torch.testing.assert_close(g, -2 * g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(ce.numba is None, reason="numba not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_gradient_adds_the_reference_gradient(monkeypatch, dtype):
    """add_entropy_gradient adds scale * dH_C/dW to each .grad and returns scale * sum_l H_C."""
    monkeypatch.setattr(ce, "BACKEND", "auto")
    w = _rand((3, 17, 33), dtype=dtype, seed=7).requires_grad_()
    v = _rand((3, 5, 17), dtype=dtype, seed=8).requires_grad_()
    w.grad = torch.ones_like(w)  # an existing gradient is added to; a missing one created
    assert ce.in_place_gradient_available([w, v])
    total = ce.add_entropy_gradient([w, v], scale=-2.0)
    h_w, g_w, _ = _value_and_grad(ce.configuration_entropy_reference, w)
    h_v, g_v, _ = _value_and_grad(ce.configuration_entropy_reference, v)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(total, -2.0 * (h_w + h_v), **tol)
    torch.testing.assert_close(w.grad, 1 - 2 * g_w, **tol)
    torch.testing.assert_close(v.grad, -2 * g_v, **tol)


def test_in_place_gradient_only_where_the_fused_kernels_run(monkeypatch):
    w = _rand((2, 6, 7), dtype=torch.float32).requires_grad_()
    arm = regs.get("configuration_entropy")(coefficient=1.0)
    monkeypatch.setattr(ce, "BACKEND", "eager")
    assert not arm.writes_gradient({"fc1": w})
    monkeypatch.setattr(ce, "BACKEND", "auto")
    assert arm.writes_gradient({"fc1": w}) == (ce.numba is not None)
    assert not regs.get("configuration_entropy")(coefficient=0.0).writes_gradient({"fc1": w})
    assert not arm.writes_gradient({"fc1": w.detach().clone().view(2, 6, 7, 1)})  # conv: autograd
    assert not arm.writes_gradient({"fc1": w * 2})  # not a leaf: its .grad is not the weight's
    assert not regs.get("weight_decay")(coefficient=1e-4).writes_gradient({"fc1": w})


@pytest.mark.skipif(ce.numba is None, reason="numba not installed")
def test_arm_gradient_in_place_equals_its_loss_term_through_autograd(monkeypatch):
    monkeypatch.setattr(ce, "BACKEND", "auto")
    layers = {"fc1": _rand((2, 9, 12), seed=9), "fc2": _rand((2, 4, 9), seed=10)}
    for name in ("configuration_entropy", "configuration_entropy_prose"):
        arm = regs.get(name)(coefficient=0.5, layers=["fc2", "fc1"])
        by_autograd = {k: w.clone().requires_grad_() for k, w in layers.items()}
        term = arm.loss_term(by_autograd)
        term.sum().backward()
        in_place = {k: w.clone().requires_grad_() for k, w in layers.items()}
        assert arm.writes_gradient(in_place)
        torch.testing.assert_close(arm.add_loss_gradient(in_place), term.detach())
        for k in layers:
            torch.testing.assert_close(in_place[k].grad, by_autograd[k].grad)


# The Triton kernels (the GPU's path). In Triton's interpreter on the CPU (it must be chosen
# before Triton is imported: a fresh process), and on a GPU where there is one.
TRITON_CHECK = """
import torch
from sparsebench import entropy_triton as et
from sparsebench.regularizers import configuration_entropy as ce
for i, shape in enumerate([(1, 1, 1), (3, 1, 5), (2, 7, 1), (2, 2, 2), (2, 19, 150), (1, 40, 9)]):
    for dtype in (torch.float32, torch.float64):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=dtype)
        scale = torch.linspace(0.5, 2.0, shape[0], dtype=torch.float64)
        ref = w.double().requires_grad_()
        (ce.configuration_entropy_reference(ref) * scale).sum().backward()
        s, a = et.entropy_sums(w)
        h = ce._entropy_from_sums(s, a)
        out = torch.full_like(w, 0.25)  # the kernel adds to what is there
        et.add_gradient(w, out, (scale / (s + 2 * ce._SCALE * ce._EPS2)).to(dtype),
                        (scale / (a + ce.EPS)).to(dtype))
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        h_ref = ce.configuration_entropy_reference(w.double())
        torch.testing.assert_close(h, h_ref, rtol=tol, atol=tol)
        g = (out - 0.25).double()
        torch.testing.assert_close(g, ref.grad, rtol=tol, atol=tol * ref.grad.abs().max().item())
print("triton kernels match the reference")
"""


def test_triton_kernels_equal_the_reference_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "match the reference" in done.stdout


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_paths_equal_the_reference(monkeypatch, dtype):
    """On a GPU: values (Triton), the in-place gradient (Triton) and autograd (eager)."""
    monkeypatch.setattr(ce, "BACKEND", "auto")
    shapes = [(2, 17, 33), (2, 3, 5), (2, 1, 9)]
    ws = [_rand(shape, dtype=dtype, seed=i).cuda() for i, shape in enumerate(shapes)]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        h = ce.configuration_entropy_sum(ws)
    h_ref = sum(ce.configuration_entropy_reference(w) for w in ws)
    torch.testing.assert_close(h, h_ref, rtol=tol, atol=tol)
    leaves = [w.clone().requires_grad_() for w in ws]
    assert ce.in_place_gradient_available(leaves)
    total = ce.add_entropy_gradient(leaves, scale=-0.5)
    torch.testing.assert_close(total, -0.5 * h_ref, rtol=tol, atol=tol)
    for w, leaf in zip(ws, leaves):
        _, g_ref, _ = _value_and_grad(ce.configuration_entropy_reference, w)
        torch.testing.assert_close(leaf.grad, -0.5 * g_ref, rtol=tol, atol=tol * g_ref.abs().max())
    h, g, fn = _value_and_grad(ce.configuration_entropy, ws[0])
    assert type(fn).__name__ == "_EagerEntropyBackward"
    torch.testing.assert_close(h, ce.configuration_entropy_reference(ws[0]), rtol=tol, atol=tol)


def test_triton_that_cannot_run_falls_back_to_eager_once(monkeypatch):
    """Where the kernels cannot compile or run (here: no GPU for the warm-up matrix), the
    eager form serves, with one warning; with BACKEND='triton' the error is raised."""
    monkeypatch.setattr(ce, "_triton_state", {"module": None, "broken": False, "checked": set()})
    monkeypatch.setattr(ce, "BACKEND", "triton")
    if not torch.cuda.is_available():
        with pytest.raises(Exception):  # noqa: B017 - whatever the missing GPU raises
            ce._triton_kernels(torch.float32)
    monkeypatch.setattr(ce, "BACKEND", "auto")
    monkeypatch.setattr(ce.torch, "linspace", lambda *a, **k: 1 / 0)  # the warm-up fails
    with pytest.warns(RuntimeWarning, match="falling back to the eager"):
        assert ce._triton_kernels(torch.float32) is None
    assert ce._triton_kernels(torch.float64) is None  # eager from now on, without asking again


def test_triton_kernels_compile_for_a_hopper_gpu_without_one():
    """What the interpreter does not check: Triton's compiler takes the kernels, float32 and
    float64, down to sm_90 machine code (the H100/H200's), with no GPU needed."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compiler API")
    from sparsebench import entropy_triton as et

    blocks = {"BR": et.BLOCK_ROWS, "BC": et.BLOCK_COLS}
    sizes = {"n": "i32", "m": "i32", "tiles_c": "i32", "BR": "constexpr", "BC": "constexpr"}
    for dtype in ("fp32", "fp64"):
        sums = {"w_ptr": f"*{dtype}", "s_ptr": "*fp64", "a_ptr": "*fp64", **sizes}
        grad = {name: f"*{dtype}" for name in ("w_ptr", "g_ptr", "c1_ptr", "c2_ptr")} | sizes
        for kernel, signature in ((et._sums_kernel, sums), (et._grad_kernel, grad)):
            source = ASTSource(fn=kernel, signature=signature, constexprs=blocks)
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", 90, 32),
                options={"enable_fp_fusion": et.FP_FUSION},
            )
            assert len(compiled.asm["cubin"]) > 0
