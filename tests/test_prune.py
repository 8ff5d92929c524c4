"""The pruning sweep: the right weights at the right percentiles, fast path = reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsebench import prune
from sparsebench.data import Split
from sparsebench.models import StackedMLP, build_model
from sparsebench.prune import (
    criterion_scores,
    kept_masks,
    removal_counts,
    sensitivity_scores,
    sweep,
    sweep_fast,
    sweep_reference,
)
from sparsebench.train import evaluate


def tiny_model() -> StackedMLP:
    """A 3-2-2 network whose 10 weights have the distinct magnitudes 1..10."""
    model = StackedMLP((3, 2, 2), num_networks=1)
    with torch.no_grad():
        model.layers["fc1"].weight[0] = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
        model.layers["fc2"].weight[0] = torch.tensor([[7.0, -8.0], [-9.0, 10.0]])
        model.layers["fc1"].bias[0] = torch.tensor([0.5, -0.5])
        model.layers["fc2"].bias[0] = torch.tensor([0.25, -0.25])
    return model


def random_split(n: int, features: int, classes: int, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    return Split(
        torch.randn(n, features, generator=generator),
        torch.randint(0, classes, (n,), generator=generator),
    )


def test_removal_counts_round_half_up_and_cover_both_ends() -> None:
    assert removal_counts(10, [0.0, 10.0, 25.0, 55.0, 100.0]) == [0, 1, 3, 6, 10]
    assert removal_counts(266200, [0.1]) == [266]


def test_known_scores_keep_exactly_the_top_weights() -> None:
    model = tiny_model()
    scores = criterion_scores("magnitude", model, random_split(4, 3, 2, 0), seed=0)
    masks = kept_masks(scores, 30.0)  # prune the 3 smallest: magnitudes 1, 2, 3
    assert masks["fc1"].tolist() == [[False, False, False], [True, True, True]]
    assert masks["fc2"].all()
    masks = kept_masks(scores, 70.0)  # keep the 3 largest: 8, 9, 10
    assert masks["fc1"].sum() == 0
    assert masks["fc2"].tolist() == [[False, True], [True, True]]


def test_ties_are_broken_by_position() -> None:
    scores = {"a": torch.zeros(2, 2), "b": torch.zeros(1, 2)}
    masks = kept_masks(scores, 50.0)  # 3 of 6 pruned: the first three positions
    assert masks["a"].tolist() == [[False, False], [False, True]]
    assert masks["b"].tolist() == [[True, True]]


def test_sweep_counts_per_layer_and_leaves_biases_alone() -> None:
    model = tiny_model()
    test = random_split(50, 3, 2, 1)
    biases = [layer.bias.clone() for layer in model.layers.values()]
    scores = criterion_scores("magnitude", model, test, seed=0)
    frame = sweep_reference(model, scores, [0.0, 30.0, 70.0, 100.0], test)
    assert frame["kept_total"].tolist() == [10, 7, 3, 0]
    assert frame["kept_fc1"].tolist() == [6, 3, 0, 0]
    assert frame["kept_fc2"].tolist() == [4, 4, 3, 0]
    for layer, bias in zip(model.layers.values(), biases):
        assert torch.equal(layer.bias, bias)
    # With every weight pruned only the biases speak: the output is relu(b1) W2 + b2 = b2.
    predicted = torch.tensor(0 if 0.25 > -0.25 else 1)
    expected = 100.0 * float((test.labels == predicted).float().mean())
    assert frame["test_accuracy"].iloc[-1] == pytest.approx(expected)
    # The sweep restores the network it was given.
    assert torch.equal(model.layers["fc2"].weight[0], tiny_model().layers["fc2"].weight[0])


def test_unpruned_end_reproduces_the_model_accuracy() -> None:
    model = build_model("lenet300", [5])
    test = random_split(300, 784, 10, 2)
    scores = criterion_scores("random", model, test, seed=5)
    for run in (sweep_reference, sweep_fast):
        frame = run(model, scores, [0.0], test)
        _, accuracy = evaluate(model, test)
        assert frame["test_accuracy"].iloc[0] == pytest.approx(float(accuracy[0]), abs=1e-4)
        assert frame["kept_total"].iloc[0] == 784 * 300 + 300 * 100 + 100 * 10


def test_sensitivity_is_weight_times_gradient_of_plain_cross_entropy() -> None:
    model = build_model("lenet300", [1])
    train = random_split(64, 784, 10, 3)
    scores = sensitivity_scores(model, train, batch_size=20)  # several batches
    reference = torch.nn.Sequential(
        torch.nn.Linear(784, 300),
        torch.nn.ReLU(),
        torch.nn.Linear(300, 100),
        torch.nn.ReLU(),
        torch.nn.Linear(100, 10),
    )
    reference.load_state_dict(
        {
            f"{i}.{kind}": tensor
            for i, (name) in zip((0, 2, 4), ("fc1", "fc2", "fc3"))
            for kind, tensor in (
                ("weight", model.layers[name].weight[0]),
                ("bias", model.layers[name].bias[0]),
            )
        }
    )
    F.cross_entropy(reference(train.images), train.labels).backward()
    for i, name in zip((0, 2, 4), ("fc1", "fc2", "fc3")):
        expected = (reference[i].weight * reference[i].weight.grad).abs()
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("criterion", ["sensitivity", "magnitude", "random"])
def test_fast_sweep_equals_reference_sweep(criterion: str) -> None:
    model = build_model("lenet300", [7])
    train, test = random_split(200, 784, 10, 4), random_split(400, 784, 10, 5)
    # A trained-looking spread of scores matters less than exercising every layer.
    scores = criterion_scores(criterion, model, train, seed=7)
    percentiles = [i * 2.5 for i in range(41)]
    fast = sweep_fast(model, scores, percentiles, test)
    reference = sweep_reference(model, scores, percentiles, test)
    kept_columns = ["kept_total", "kept_fc1", "kept_fc2", "kept_fc3"]
    assert fast[kept_columns].equals(reference[kept_columns])
    assert (fast["test_accuracy"] - reference["test_accuracy"]).abs().max() <= 0.5  # 2 of 400


def test_sweep_has_one_block_per_criterion_and_rejects_unknown() -> None:
    model = build_model("lenet300", [0])
    data = random_split(100, 784, 10, 6)
    frame = sweep(model, ["magnitude", "random"], [0.0, 50.0, 100.0], data, data, seed=0)
    assert frame["criterion"].tolist() == ["magnitude"] * 3 + ["random"] * 3
    with pytest.raises(ValueError, match="unknown pruning criterion 'taylor'"):
        sweep(model, ["taylor"], [0.0], data, data, seed=0)


# --------------------------------------------------------------------------------------------
# The fast sweep: numba path (certified lazy refresh) and torch path against the reference.


def clustered_split(n: int, features: int, classes: int, seed: int, noise: float = 1.0) -> Split:
    """Gaussian clusters, one per class: data a small network learns with clear margins (the
    more ``noise``, the less clear)."""
    generator = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, features, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, classes, (n,), generator=generator)
    images = centres[labels] + noise * torch.randn(n, features, generator=generator)
    return Split(images, labels)


def trained_mlp(
    layer_sizes: tuple[int, ...], seed: int, steps: int = 150, noise: float = 1.0, lr: float = 0.01
) -> StackedMLP:
    """A StackedMLP fitted (full batch, Adam) to :func:`clustered_split` data."""
    model = StackedMLP(layer_sizes, num_networks=1)
    model.initialise([seed])
    data = clustered_split(400, layer_sizes[0], layer_sizes[-1], seed + 1, noise)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(data.images)[0], data.labels).backward()
        optimizer.step()
    return model


def assert_same_sweep(fast, reference, n: int, samples: int = 1) -> None:
    """Same rows and kept counts; accuracies within ``samples`` test samples (float ties)."""
    assert list(fast.columns) == list(reference.columns)
    kept = [c for c in reference.columns if c.startswith("kept")]
    assert fast[kept].equals(reference[kept])
    assert fast["percentile"].tolist() == reference["percentile"].tolist()
    assert (fast["test_accuracy"] - reference["test_accuracy"]).abs().max() <= 100.0 * samples / n


numba_only = pytest.mark.skipif(prune.numba is None, reason="numba is not installed")


@pytest.mark.parametrize("layer_sizes", [(12, 9), (20, 16, 6), (20, 16, 12, 8, 5)])
@pytest.mark.parametrize("criterion", ["sensitivity", "magnitude", "random"])
def test_fast_sweep_equals_reference_on_trained_networks(layer_sizes, criterion) -> None:
    model = trained_mlp(layer_sizes, seed=3)
    test = clustered_split(700, layer_sizes[0], layer_sizes[-1], seed=11)
    scores = criterion_scores(criterion, model, test, seed=3)
    percentiles = [round(i * 0.5, 6) for i in range(201)]
    fast = sweep_fast(model, scores, percentiles, test)
    assert_same_sweep(fast, sweep_reference(model, scores, percentiles, test), len(test))


def float64_truth(
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    order: torch.Tensor,
    removed: list[int],
    test: Split,
    tie: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """Per step: the correct predictions of the pruned network evaluated from scratch in
    float64, and its near ties, the samples whose label logit is within ``tie`` (relative to
    the largest logit) of the best other class: there a float32 path may rightly differ."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    images, labels = test.images.double(), test.labels
    hits, ties = np.zeros(len(removed), dtype=np.int64), np.zeros(len(removed), dtype=np.int64)
    for step, count in enumerate(removed):
        keep, offset, h = rank >= count, 0, images
        for k, (w, b) in enumerate(zip(weights, biases)):
            mask = keep[offset : offset + w.numel()].view_as(w)
            offset += w.numel()
            h = torch.addmm(b.double(), h if k == 0 else torch.relu(h), (w.double() * mask).t())
        at_label = h.gather(1, labels[:, None])[:, 0]
        best_other = h.scatter(1, labels[:, None], -torch.inf).amax(1)
        scale = 1.0 + h.abs().amax(1)
        hits[step] = int((h.argmax(1) == labels).sum())
        ties[step] = int(((at_label - best_other).abs() < tie * scale).sum())
    return hits, ties


@dataclass
class SweepRun:
    """Hits per step of both fast paths and of the float64 truth (with its near ties)."""

    fast: np.ndarray
    slow: np.ndarray
    truth: np.ndarray
    ties: np.ndarray
    stats: dict
    model_hits: int
    predictions: int

    def assert_fast_paths_are_the_truth(self) -> None:
        """Both paths' hits are the float64 truth's, at every step, up to its near ties."""
        assert (abs(self.fast - self.truth) <= self.ties).all()
        assert (abs(self.slow - self.truth) <= self.ties).all()
        assert self.fast[0] == self.model_hits  # the untouched network is exactly the model


def numba_and_torch_hits(
    monkeypatch, model: StackedMLP, test: Split, criterion: str, steps: int, **settings
) -> SweepRun:
    """The hits per step of the numba path (module settings overridden), of the torch path
    and of the float64 truth, with ``criterion``'s order, over ``steps`` even percentiles."""
    scores = criterion_scores(criterion, model, test, seed=5)
    names = list(model.weight_matrices())
    weights = [model.layers[n].weight[0].detach() for n in names]
    biases = [model.layers[n].bias[0].detach() for n in names]
    order = prune.pruning_order(scores)
    percentiles = [100.0 * i / (steps - 1) for i in range(steps)]
    removed = removal_counts(sum(w.numel() for w in weights), percentiles)
    for name, value in settings.items():
        monkeypatch.setattr(prune, name, value)
    stats: dict = {}
    fast = prune._sweep_hits_numba(weights, biases, order, removed, test, stats)
    slow = prune._sweep_hits_torch([weights], [biases], [order], removed, test)[0]
    truth, ties = float64_truth(weights, biases, order, removed, test)
    model_hits = int((model(test.images)[0].argmax(-1) == test.labels).sum())
    return SweepRun(fast, slow, truth, ties, stats, model_hits, len(test) * steps)


def small_run(monkeypatch, layer_sizes: tuple[int, ...], **settings) -> SweepRun:
    """:func:`numba_and_torch_hits` on a small trained network, chunks of 128 samples."""
    model = trained_mlp(layer_sizes, seed=5)
    test = clustered_split(900, layer_sizes[0], layer_sizes[-1], seed=12)
    monkeypatch.setattr(prune, "_SWEEP_CHUNK", 128)  # 8 chunks, the last one padded
    return numba_and_torch_hits(monkeypatch, model, test, "sensitivity", 401, **settings)


@numba_only
@pytest.mark.parametrize("together", [1, 10**9])  # always / never refresh a chunk at once
@pytest.mark.parametrize("segment", [7, 1000])  # the chunks' state carried between calls
@pytest.mark.parametrize("layer_sizes", [(20, 16, 6), (20, 16, 12, 6), (20, 16, 12, 8, 5)])
def test_certified_numba_sweep_is_the_float64_truth(
    monkeypatch, together, segment, layer_sizes
) -> None:
    run = small_run(
        monkeypatch,
        layer_sizes,
        _SWEEP_TOGETHER=together,
        _SWEEP_SEGMENT=segment,
        _SWEEP_EXACT_AT=2.0,  # never switch to the exact tail
    )
    run.assert_fast_paths_are_the_truth()
    # The bound did its job: most predictions were certified, not recomputed.
    assert run.stats["exact_from"] == len(run.fast)
    assert run.stats["refreshed"].sum() < 0.5 * run.predictions


@numba_only
@pytest.mark.parametrize("layer_sizes", [(20, 16, 6), (20, 16, 12, 6), (20, 16, 12, 8, 5)])
@pytest.mark.parametrize("exact_at", [0.0, 1e-9])  # exact from the start / from a segment on
def test_exact_tail_is_the_float64_truth(monkeypatch, layer_sizes, exact_at) -> None:
    run = small_run(monkeypatch, layer_sizes, _SWEEP_SEGMENT=24, _SWEEP_EXACT_AT=exact_at)
    if exact_at == 0.0:
        assert run.stats["exact_from"] == 0
    else:  # the first segment with a refresh ends the certified part
        assert 0 < run.stats["exact_from"] < len(run.fast) and run.stats["exact_from"] % 24 == 0
    run.assert_fast_paths_are_the_truth()


@numba_only
@pytest.mark.parametrize("exact_at", [2.0, None])  # certified throughout / the default switch
def test_lenet300_sweep_is_the_float64_truth(monkeypatch, exact_at) -> None:
    # LeNet300's widths, two chunks of the default size, a network at about 97 % accuracy.
    model = trained_mlp((784, 300, 100, 10), seed=3, steps=60, noise=10.0, lr=1e-3)
    test = clustered_split(1000, 784, 10, seed=5, noise=10.0)
    settings = {} if exact_at is None else {"_SWEEP_EXACT_AT": exact_at}
    run = numba_and_torch_hits(monkeypatch, model, test, "sensitivity", 201, **settings)
    run.assert_fast_paths_are_the_truth()
    assert (run.stats["exact_from"] == 201) == (exact_at is not None)


@numba_only
def test_sweep_fast_takes_the_numba_path_on_cpu_float32(monkeypatch) -> None:
    def no_torch(*args, **kwargs):
        raise AssertionError("the torch path ran")

    monkeypatch.setattr(prune, "_sweep_hits_torch", no_torch)
    model = trained_mlp((12, 10, 4), seed=1)
    test = clustered_split(50, 12, 4, seed=2)
    frame = sweep_fast(model, criterion_scores("magnitude", model, test, seed=0), [0.0, 50.0], test)
    assert len(frame) == 2


def test_torch_path_serves_float64_single_layers_and_any_percentile_order(monkeypatch) -> None:
    # float64 and a one-layer network never reach numba; neither path cares about the order.
    called = []
    monkeypatch.setattr(prune, "_sweep_hits_numba", lambda *args: called.append(args))
    model = trained_mlp((12, 10, 4), seed=2).double()
    test = clustered_split(300, 12, 4, seed=4)
    test = Split(test.images.double(), test.labels)
    scores = criterion_scores("sensitivity", model, test, seed=0)
    percentiles = [70.0, 0.0, 100.0, 35.5, 35.5, 99.9, 12.0]
    fast = sweep_fast(model, scores, percentiles, test)
    assert_same_sweep(fast, sweep_reference(model, scores, percentiles, test), len(test))
    single = trained_mlp((12, 4), seed=6)
    scores = criterion_scores("magnitude", single, test, seed=0)
    test32 = Split(test.images.float(), test.labels)
    fast = sweep_fast(single, scores, percentiles, test32)
    assert_same_sweep(fast, sweep_reference(single, scores, percentiles, test32), len(test))
    assert not called


def test_torch_plan_drops_each_weight_once_at_its_step_rows_unique_per_slice() -> None:
    """The torch path's plan, for two sweeps at once: every pruned weight of each sweep in
    exactly one slice of its step, in its layer; no first-layer slice holds a row of a sweep
    twice (no racing adds on a GPU); a row's drops of a step in the order's order."""
    generator = torch.Generator().manual_seed(3)
    orders = [torch.randperm(54, generator=generator).numpy() for _ in range(2)]
    removed = [0, 10, 10, 31, 54]
    sweep, layer_of, local, plan = prune._torch_sweep_plan([(6, 5), (4, 6)], orders, removed)
    ranks = [{int(k): r for r, k in enumerate(order)} for order in orders]
    seen: list[tuple[int, int]] = []
    for s, slices in enumerate(plan):
        before = removed[s - 1] if s else 0
        assert bool(slices) == (removed[s] > before)
        for first, end, layer in slices:
            assert (layer_of[first:end] == layer).all()
            drops = [
                (int(b), int(k) + (30 if layer else 0))
                for b, k in zip(sweep[first:end], local[first:end])
            ]
            assert all(before <= ranks[b][k] < removed[s] for b, k in drops)
            if layer == 0:
                rows = [(b, k // 5) for b, k in drops]
                assert len(set(rows)) == len(rows)
            seen += drops
    assert sorted(seen) == [(b, k) for b in range(2) for k in range(54)]
    for slices in plan:  # within a row of the first layer: the order's order
        by_row: dict[tuple[int, int], list[int]] = {}
        for first, end, layer in slices:
            for b, k in zip(sweep[first:end], local[first:end]):
                if layer == 0:
                    by_row.setdefault((int(b), int(k) // 5), []).append(ranks[b][int(k)])
        assert all(r == sorted(r) for r in by_row.values())
    assert max(len(slices) for slices in plan) > 2  # some step has a row dropped twice


def test_sweeps_together_equal_sweeps_one_by_one() -> None:
    """The batched torch sweep (the GPU's) gives each network's own sweep: its kept counts
    exactly, its hits up to float rounding of the stacked products."""
    models = [trained_mlp((20, 16, 12, 6), seed=seed) for seed in (1, 2)]
    test = clustered_split(300, 20, 6, seed=7)
    percentiles = [100.0 * i / 60 for i in range(61)]
    score_sets = [
        criterion_scores(criterion, model, test, seed=3)
        for model in models
        for criterion in ("sensitivity", "random")
    ]
    together = prune.sweep_fast_together(
        [m for m in models for _ in range(2)], score_sets, percentiles, test
    )
    for model, scores, frame in zip([m for m in models for _ in range(2)], score_sets, together):
        assert_same_sweep(frame, sweep_reference(model, scores, percentiles, test), len(test))


@numba_only
def test_numba_path_takes_any_percentile_order() -> None:
    model = trained_mlp((20, 16, 6), seed=8)
    test = clustered_split(300, 20, 6, seed=9)
    scores = criterion_scores("random", model, test, seed=1)
    percentiles = [100.0, 50.0, 0.0, 75.25, 75.25, 10.0, 99.5]
    fast = sweep_fast(model, scores, percentiles, test)
    assert_same_sweep(fast, sweep_reference(model, scores, percentiles, test), len(test))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
@pytest.mark.parametrize("at_once", [None, 2])  # as many as fit / groups of two sweeps
@pytest.mark.parametrize("layer_sizes", [(12, 9), (20, 16, 12, 6), (784, 300, 100, 10)])
def test_networks_swept_together_on_a_gpu_equal_the_reference(
    layer_sizes, at_once, monkeypatch
) -> None:
    """The prune job's GPU path: every network's sweep, each criterion, at once (or in
    groups, where the GPU's free memory holds fewer)."""
    if at_once is not None:
        monkeypatch.setattr(prune, "sweeps_at_once", lambda *args: at_once)
    device = torch.device("cuda")
    models = [trained_mlp(layer_sizes, seed=seed).to(device) for seed in (1, 2, 3)]
    test = clustered_split(500, layer_sizes[0], layer_sizes[-1], seed=7).to(device)
    percentiles = [round(i * 0.5, 6) for i in range(201)]
    criteria = ["sensitivity", "magnitude", "random"]
    frames = prune.sweep_networks(models, criteria, percentiles, test, test, seeds=[1, 2, 3])
    for model, seed, frame in zip(models, (1, 2, 3), frames):
        reference = sweep(model, criteria, percentiles, test, test, seed, fast=False)
        assert frame["criterion"].tolist() == reference["criterion"].tolist()
        for criterion in criteria:
            assert_same_sweep(
                frame[frame.criterion == criterion].drop(columns="criterion"),
                reference[reference.criterion == criterion].drop(columns="criterion"),
                len(test),
            )
