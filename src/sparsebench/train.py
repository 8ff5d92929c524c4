"""The training engine: K seeds of one arm trained at once, vectorised across seeds.

Each seed keeps its own initialisation, its own data order and its own Adam state:
the stacked networks' losses are summed, so the gradient of copy k is the gradient
of its own loss alone, and Adam (element-wise) on stacked tensors is K independent
Adams. The dataset stays on the device; batches are gathered by per-seed index
permutations drawn on the device, with no per-sample Python work.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsebench.config import TrainHparams
from sparsebench.data import Split
from sparsebench.models import StackedMLP, build_model
from sparsebench.regularizers import Regularizer


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the seed and epoch."""


@dataclass
class EpochRecord:
    """One epoch of one network: the row of its training log."""

    epoch: int
    train_loss: float  # mean cross-entropy over the epoch's batches
    regularizer_values: dict[str, float]  # each regularizer's own measure at the epoch's end
    objective: float  # mean training objective: loss + regularizer terms
    test_loss: float
    test_accuracy: float  # percent
    seconds: float

    def as_row(self) -> dict[str, float]:
        row = {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "objective": self.objective,
        }
        row.update({f"reg_{name}": value for name, value in self.regularizer_values.items()})
        row.update(test_loss=self.test_loss, test_accuracy=self.test_accuracy, seconds=self.seconds)
        return row


@dataclass
class TrainProgress:
    """Everything training needs to go on after ``epoch`` exactly as if it had not stopped:
    the stacked networks, Adam's state, each seed's data-order generator and the logs so far.
    As a checkpoint: tensors, lists and dicts only, which load with ``weights_only=True``."""

    epoch: int
    networks: dict[str, Tensor]
    optimizer: dict[str, Any]
    data_order: list[Tensor]
    logs: list[list[EpochRecord]]  # per seed

    def as_checkpoint(self) -> dict[str, Any]:
        checkpoint = {f.name: getattr(self, f.name) for f in fields(self)}  # tensors not copied
        checkpoint["logs"] = [[asdict(record) for record in log] for log in self.logs]
        return checkpoint

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> TrainProgress:
        logs = [[EpochRecord(**row) for row in log] for log in checkpoint["logs"]]
        return cls(**{**checkpoint, "logs": logs})


def permutation_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per seed for its data order, independent of the init stream."""
    return [torch.Generator(device=device).manual_seed(10_007 * int(s) + 1) for s in seeds]


def epoch_permutations(
    n: int, generators: Sequence[torch.Generator], device: torch.device
) -> Tensor:
    """Per-seed permutations of range(n), shape (K, n), drawn on ``device``."""
    return torch.stack([torch.randperm(n, generator=g, device=device) for g in generators])


@torch.no_grad()
def evaluate(model: StackedMLP, split: Split, batch_size: int = 10000) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy (percent) of every stacked network, each (K,)."""
    k = model.num_networks
    loss_sum = torch.zeros(k, device=split.images.device)
    correct = torch.zeros(k, device=split.images.device, dtype=torch.float64)  # exact counts
    for start in range(0, len(split.labels), batch_size):
        x = split.images[start : start + batch_size]
        y = split.labels[start : start + batch_size]
        logits = model(x)
        loss_sum += (
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(k), reduction="none")
            .view(k, -1)
            .sum(1)
        )
        correct += (logits.argmax(-1) == y).sum(1)
    n = len(split.labels)
    return loss_sum / n, 100.0 * correct / n


def regularizer_keys(regularizers: Sequence[Regularizer]) -> list[str]:
    """Unique column names for the arm's regularizers (a name repeated gets a suffix)."""
    keys: list[str] = []
    for reg in regularizers:
        key, i = reg.name, 2
        while key in keys:
            key, i = f"{reg.name}_{i}", i + 1
        keys.append(key)
    return keys


def make_optimizer(
    model: StackedMLP, hparams: TrainHparams, regularizers: Sequence[Regularizer]
) -> torch.optim.Optimizer:
    weight_decay = sum(reg.optimizer_weight_decay() for reg in regularizers)
    if hparams.optimizer != "adam":
        raise ValueError(f"unknown optimizer {hparams.optimizer!r}")
    # One fused kernel for the whole update instead of a dozen element-wise passes; the
    # arithmetic is Adam's (coupled L2 included), so the numbers do not depend on it. On a GPU
    # it can be captured in a CUDA graph (its step count already lives on the device).
    on_gpu = next(model.parameters()).device.type == "cuda"
    return torch.optim.Adam(
        model.parameters(), lr=hparams.lr, weight_decay=weight_decay, fused=True, capturable=on_gpu
    )


#: Eager steps before a training step is captured as a CUDA graph (cuBLAS handles, Adam's
#: state and kernel compilation all happen in these), as torch's CUDA-graph notes ask.
GRAPH_WARMUP_STEPS = 3


class TrainStep:
    """One optimizer step of the stacked networks on a batch of per-seed indices ``(K, B)``,
    adding each network's loss and objective to :attr:`loss_sum` and :attr:`objective_sum`.

    On a GPU the full-size batch's step is captured once as a CUDA graph (after
    :data:`GRAPH_WARMUP_STEPS` eager ones) and replayed: the same kernels on the same
    tensors, without the Python and launch overhead that otherwise leaves the GPU idle most
    of the time at this network size. Other batch sizes (an epoch's last, short batch) and
    the CPU run eagerly.
    """

    def __init__(
        self,
        model: StackedMLP,
        optimizer: torch.optim.Optimizer,
        regularizers: Sequence[Regularizer],
        train: Split,
        hparams: TrainHparams,
        use_graph: bool,
    ) -> None:
        self.model, self.optimizer, self.regularizers = model, optimizer, list(regularizers)
        self.train, self.lr = train, hparams.lr
        device = train.images.device
        k = model.num_networks
        self.loss_sum = torch.zeros(k, device=device)
        self.objective_sum = torch.zeros(k, device=device)
        # Regularizers with a closed-form gradient add it to .grad after the backward pass.
        self.direct = [reg.writes_gradient(model.weight_matrices()) for reg in self.regularizers]
        # Only those with an update of their own (the base's is a no-op) are called after
        # the optimizer step: on a CPU each call costs more than a small layer's kernels.
        self.stepping = [
            reg for reg in self.regularizers if type(reg).after_step is not Regularizer.after_step
        ]
        self.graph_batch = hparams.batch_size if use_graph and device.type == "cuda" else None
        self.eager_full_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_index: Tensor | None = None

    def __call__(self, index: Tensor) -> None:
        if self.graph_batch is None or index.shape[1] != self.graph_batch:
            self._step(index)
        elif self.graph is not None:
            self.graph_index.copy_(index)
            self.graph.replay()
        elif self.eager_full_steps < GRAPH_WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(index)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_full_steps += 1
        else:
            try:
                self.graph_index = index.clone()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):  # records the step; runs nothing
                    self._step(self.graph_index)
            except Exception as err:  # something in the step that cannot be captured
                warnings.warn(
                    f"the training step could not be captured as a CUDA graph ({err!r}); "
                    "training goes on with eager steps (same numbers, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.graph, self.graph_batch = None, None
                self._step(index)  # the capture ran none of it
                return
            self.graph.replay()

    def _step(self, index: Tensor) -> None:
        k = self.model.num_networks
        logits = self.model(self.train.images[index])
        loss = (
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                self.train.labels[index].reshape(-1),
                reduction="none",
            )
            .view(k, -1)
            .mean(1)
        )
        objective = loss
        weights = self.model.weight_matrices()
        for reg, writes in zip(self.regularizers, self.direct):
            term = None if writes else reg.loss_term(weights)
            if term is not None:
                objective = objective + term
        self.optimizer.zero_grad(set_to_none=True)
        objective.sum().backward()
        objective = objective.detach()  # the terms below join it without autograd nodes
        for reg, writes in zip(self.regularizers, self.direct):
            if writes:
                objective = objective + reg.add_loss_gradient(weights)
        self.optimizer.step()
        for reg in self.stepping:
            reg.after_step(self.model.weight_matrices(), self.lr)
        self.loss_sum.add_(loss.detach())
        self.objective_sum.add_(objective)


def train_networks(
    model_name: str,
    seeds: Sequence[int],
    regularizers: Sequence[Regularizer],
    hparams: TrainHparams,
    train: Split,
    test: Split,
    device: torch.device,
    on_epoch: Callable[[int, list[EpochRecord]], None] | None = None,
    on_checkpoint: Callable[[TrainProgress], None] | None = None,
    resume_from: TrainProgress | None = None,
    cuda_graph: bool = True,
) -> tuple[StackedMLP, list[list[EpochRecord]]]:
    """Train one network per seed under ``regularizers``; return the model and per-seed logs.

    ``train`` and ``test`` must already be on ``device``; the networks take their dtype.
    ``on_epoch(epoch, records)`` is called after every epoch with that epoch's record of
    each seed; ``on_checkpoint(progress)`` after every epoch, with the state to go on from
    (references to the live tensors: save it, do not keep it). Given ``resume_from`` (such
    a state, for the same seeds and settings), training goes on after its epoch and ends
    with the numbers an uninterrupted run gives (from the last epoch's state: no training).
    ``cuda_graph``: on a GPU, replay the training step as a CUDA graph (see
    :class:`TrainStep`); the numbers are the eager ones.
    """
    unbatchable = [r.name for r in regularizers if not r.supports_batching]
    if unbatchable and len(seeds) > 1:
        raise ValueError(f"regularizer(s) {unbatchable} do not support batched seeds: use 1")
    model = build_model(model_name, seeds, device).to(train.images.dtype)
    optimizer = make_optimizer(model, hparams, regularizers)
    generators = permutation_generators(seeds, device)
    keys = regularizer_keys(regularizers)
    k, n, batch = len(seeds), len(train.labels), hparams.batch_size
    logs: list[list[EpochRecord]] = [[] for _ in seeds]
    first_epoch = 1
    if resume_from is not None:
        model.load_state_dict(resume_from.networks)
        optimizer.load_state_dict(resume_from.optimizer)
        for generator, state in zip(generators, resume_from.data_order, strict=True):
            generator.set_state(state)
        logs = [list(log) for log in resume_from.logs]
        first_epoch = resume_from.epoch + 1
    step = TrainStep(model, optimizer, regularizers, train, hparams, use_graph=cuda_graph)

    for epoch in range(first_epoch, hparams.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = epoch_permutations(n, generators, device)
        step.loss_sum.zero_()
        step.objective_sum.zero_()
        steps = 0
        for start in range(0, n, batch):
            step(order[:, start : start + batch])
            steps += 1

        loss_sum, objective_sum = step.loss_sum.cpu(), step.objective_sum.cpu()  # waits for it
        check_finite(objective_sum, seeds, epoch)
        model.eval()
        with torch.no_grad():
            weights = model.weight_matrices()
            reg_values = [reg.value(weights).cpu() for reg in regularizers]
        test_loss, test_accuracy = evaluate(model, test, hparams.eval_batch_size)
        seconds = time.perf_counter() - started
        records = [
            EpochRecord(
                epoch=epoch,
                train_loss=float(loss_sum[i] / steps),
                regularizer_values={key: float(v[i]) for key, v in zip(keys, reg_values)},
                objective=float(objective_sum[i] / steps),
                test_loss=float(test_loss[i]),
                test_accuracy=float(test_accuracy[i]),
                seconds=seconds,
            )
            for i in range(k)
        ]
        for log, record in zip(logs, records):
            log.append(record)
        if on_epoch is not None:
            on_epoch(epoch, records)
        if on_checkpoint is not None:
            on_checkpoint(
                TrainProgress(
                    epoch=epoch,
                    networks=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    data_order=[g.get_state() for g in generators],
                    logs=logs,
                )
            )
    return model, logs


def check_finite(objective_sum: Tensor, seeds: Sequence[int], epoch: int) -> None:
    bad = [int(s) for s, ok in zip(seeds, torch.isfinite(objective_sum).tolist()) if not ok]
    if bad:
        raise NonFiniteLossError(
            f"NaN or infinite training loss in epoch {epoch} for seed(s) {bad}; "
            "lower the learning rate or the regularizer coefficient"
        )
