"""The training engine: stacked seeds equal separate runs; errors name the problem."""

from __future__ import annotations

import math

import pytest
import torch

from sparsebench import regularizers
from sparsebench.config import TrainHparams
from sparsebench.data import Split
from sparsebench.models import StackedLinear, build_model, stacked_affine
from sparsebench.regularizers import configuration_entropy as ce
from sparsebench.train import NonFiniteLossError, train_networks

DEVICE = torch.device("cpu")
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
HPARAMS = TrainHparams(lr=1e-3, epochs=2, batch_size=16, eval_batch_size=64)


def split(n: int, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = torch.randn(n, 784, generator=generator) * 0.5
    for offset in range(20):  # a block of 20 bright pixels per class: learnable
        images[torch.arange(n), labels * 50 + offset] += 2.0
    return Split(images, labels)


TRAIN, TEST = split(100, 0), split(60, 1)


def test_each_stacked_copy_is_initialised_from_its_own_seed() -> None:
    stacked = build_model("lenet300", [4, 9])
    alone = build_model("lenet300", [9])
    for name, w in stacked.weight_matrices().items():
        assert torch.equal(w[1], alone.weight_matrices()[name][0])
    assert not torch.equal(stacked.layers["fc1"].weight[0], stacked.layers["fc1"].weight[1])
    bound = 1 / math.sqrt(784)
    assert stacked.layers["fc1"].weight.abs().max() <= bound


@pytest.mark.parametrize("device", DEVICES)
def test_a_stacked_layer_computes_what_separate_linear_layers_do(device: str) -> None:
    layer = StackedLinear(3, 7, 5).to(device, torch.float64)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 4, 7, dtype=torch.float64, device=device, requires_grad=True)
    out = layer(x)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    for k in range(3):
        alone = torch.nn.Linear(7, 5).to(device, torch.float64)
        with torch.no_grad():
            alone.weight.copy_(layer.weight[k])
            alone.bias.copy_(layer.bias[k])
        xk = x[k].detach().requires_grad_()
        out_k = alone(xk)
        out_k.backward(upstream[k])
        torch.testing.assert_close(out[k], out_k)
        torch.testing.assert_close(layer.weight.grad[k], alone.weight.grad)
        torch.testing.assert_close(layer.bias.grad[k], alone.bias.grad)
        torch.testing.assert_close(x.grad[k], xk.grad)
    inputs = (x.detach(), layer.weight.detach(), layer.bias.detach())
    assert torch.autograd.gradcheck(stacked_affine, [t.requires_grad_() for t in inputs])


ARMS = {
    "none": [],
    "weight_decay": [{"name": "weight_decay", "coefficient": 1e-2}],
    "entropy": [{"name": "configuration_entropy", "coefficient": 1.0}],
    "entropy+wd": [
        {"name": "configuration_entropy", "coefficient": 0.5},
        {"name": "weight_decay", "coefficient": 1e-2},
    ],
}


def regs_of(arm: str) -> list[regularizers.Regularizer]:
    return [regularizers.build(spec) for spec in ARMS[arm]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arm", sorted(ARMS))
def test_batched_seeds_equal_separate_runs(arm: str, device: str) -> None:
    """In double precision, so that Adam's normalised steps cannot amplify rounding. On a
    GPU the full batches' steps are CUDA-graph replays, the epochs' last ones eager."""
    seeds = [0, 1, 2]
    device = torch.device(device)
    train, test = (Split(s.images.double(), s.labels).to(device) for s in (TRAIN, TEST))
    stacked, stacked_logs = train_networks(
        "lenet300", seeds, regs_of(arm), HPARAMS, train, test, device
    )
    for k, seed in enumerate(seeds):
        alone, alone_logs = train_networks(
            "lenet300", [seed], regs_of(arm), HPARAMS, train, test, device
        )
        for name, w in stacked.weight_matrices().items():
            torch.testing.assert_close(
                w[k], alone.weight_matrices()[name][0], rtol=1e-9, atol=1e-10
            )
        for got, expected in zip(stacked_logs[k], alone_logs[0]):
            assert got.test_accuracy == pytest.approx(expected.test_accuracy)
            assert got.train_loss == pytest.approx(expected.train_loss, rel=1e-9)
            assert got.regularizer_values.keys() == expected.regularizer_values.keys()


def test_training_learns_and_logs_every_epoch() -> None:
    regs = [regularizers.build({"name": "configuration_entropy", "coefficient": 1.0})]
    hparams = TrainHparams(lr=1e-3, epochs=6, batch_size=16)
    _, logs = train_networks("lenet300", [0], regs, hparams, TRAIN, TEST, DEVICE)
    (log,) = logs
    assert [r.epoch for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1].train_loss < log[0].train_loss
    assert log[-1].test_accuracy > 50.0  # chance is 10 %
    # The objective is the loss plus the entropy term, which is -H_C (negative: H_C > 0 here).
    term = log[0].objective - log[0].train_loss
    assert term != 0.0
    assert set(log[0].regularizer_values) == {"configuration_entropy"}


def test_weight_decay_reaches_the_optimizer() -> None:
    hparams = TrainHparams(lr=1e-3, epochs=1, batch_size=16)
    plain, _ = train_networks("lenet300", [0], [], hparams, TRAIN, TEST, DEVICE)
    decayed, _ = train_networks(
        "lenet300",
        [0],
        [regularizers.build({"name": "weight_decay", "coefficient": 1.0})],
        hparams,
        TRAIN,
        TEST,
        DEVICE,
    )
    assert decayed.layers["fc1"].weight.norm() < plain.layers["fc1"].weight.norm()


def test_nan_loss_is_an_error_naming_seed_and_epoch() -> None:
    bad = Split(TRAIN.images.clone(), TRAIN.labels)
    bad.images[5, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"epoch 1 for seed\(s\) \[3\]"):
        train_networks("lenet300", [3], [], HPARAMS, bad, TEST, DEVICE)


def test_same_seed_same_numbers() -> None:
    runs = [train_networks("lenet300", [11], [], HPARAMS, TRAIN, TEST, DEVICE)[0] for _ in "ab"]
    for w1, w2 in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(w1, w2)


def test_entropy_gradient_in_place_trains_like_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's in-place path for a closed-form gradient gives autograd's networks."""
    train, test = (Split(s.images.double(), s.labels) for s in (TRAIN, TEST))

    def run() -> tuple[dict[str, torch.Tensor], list]:
        regs = [regularizers.build(spec) for spec in ARMS["entropy+wd"]]
        model, logs = train_networks("lenet300", [0, 1], regs, HPARAMS, train, test, DEVICE)
        return model.weight_matrices(), logs

    entropy = regularizers.get("configuration_entropy")
    calls = []
    original = entropy.add_loss_gradient
    monkeypatch.setattr(
        entropy, "add_loss_gradient", lambda self, w: calls.append(1) or original(self, w)
    )
    in_place, in_place_logs = run()
    assert bool(calls) == (ce.numba is not None)  # the in-place path ran where it can
    monkeypatch.setattr(entropy, "writes_gradient", lambda self, weights: False)
    autograd, autograd_logs = run()
    for name, w in in_place.items():
        torch.testing.assert_close(w, autograd[name], rtol=1e-9, atol=1e-10)
    for got, expected in zip(in_place_logs[1], autograd_logs[1]):
        assert got.objective == pytest.approx(expected.objective, rel=1e-12)
        assert got.regularizer_values == pytest.approx(expected.regularizer_values, rel=1e-12)


class _ShrinkAfterStep(regularizers.Regularizer):
    """A proximal-style plug-in: after every optimizer step, scales the selected weights."""

    name = "shrink_after_step"
    acts_through_loss = False

    def __init__(self, coefficient: float = 1.0, **kwargs) -> None:
        super().__init__(coefficient, **kwargs)
        self.calls = 0

    @torch.no_grad()
    def after_step(self, weights, lr) -> None:
        self.calls += 1
        for w in self.select(weights).values():
            w.mul_(self.coefficient)


def test_an_update_after_each_step_runs_at_every_optimizer_step() -> None:
    shrink = _ShrinkAfterStep(0.5, layers=["fc3"])
    model, _ = train_networks("lenet300", [3], [shrink], HPARAMS, TRAIN, TEST, DEVICE)
    steps_per_epoch = math.ceil(len(TRAIN.labels) / HPARAMS.batch_size)
    assert shrink.calls == HPARAMS.epochs * steps_per_epoch
    plain, _ = train_networks("lenet300", [3], [], HPARAMS, TRAIN, TEST, DEVICE)
    shrunk, kept = (m.weight_matrices()["fc3"].abs().mean() for m in (model, plain))
    assert shrunk < 0.1 * kept  # halved at every step, against Adam's steps of about lr


def test_a_regularizer_that_cannot_batch_trains_one_seed_and_refuses_more(
    unbatchable_regularizer,
) -> None:
    alone = train_networks(
        "lenet300", [5], [unbatchable_regularizer()], HPARAMS, TRAIN, TEST, DEVICE
    )
    plain = train_networks("lenet300", [5], [], HPARAMS, TRAIN, TEST, DEVICE)
    for w1, w2 in zip(alone[0].parameters(), plain[0].parameters()):
        assert torch.equal(w1, w2)  # its zero measure changes nothing
    with pytest.raises(ValueError, match=r"\['one_seed_at_a_time'\] do not support batched"):
        train_networks(
            "lenet300", [5, 6], [unbatchable_regularizer()], HPARAMS, TRAIN, TEST, DEVICE
        )


@needs_cuda
@pytest.mark.parametrize("arm", ["none", "entropy+wd"])
def test_cuda_graph_replays_give_the_eager_numbers(arm: str) -> None:
    """float32: a replayed step runs the eager step's kernels on the same tensors."""
    device = torch.device("cuda")
    train, test = TRAIN.to(device), TEST.to(device)
    hparams = TrainHparams(lr=1e-3, epochs=3, batch_size=16, eval_batch_size=64)
    runs = [
        train_networks("lenet300", [0, 1], regs_of(arm), hparams, train, test, device, cuda_graph=g)
        for g in (True, False)
    ]
    (graphed, graphed_logs), (eager, eager_logs) = runs
    for name, w in graphed.weight_matrices().items():
        assert torch.equal(w, eager.weight_matrices()[name]), name
    assert [r.as_row() | {"seconds": 0} for r in graphed_logs[1]] == [
        r.as_row() | {"seconds": 0} for r in eager_logs[1]
    ]
