"""Speed of the training engine and the pruning sweep, measured side by side in one run.

Prints, on this machine (batch 64, LeNet300, real MNIST when given, else synthetic):

(a) the naive loop (torchvision dataset + DataLoader + per-sample transforms, one
    seed, ``nn.Sequential``) against the engine, time per epoch per seed;
(b) K seeds trained together (stacked) against K one after another;
(c) an epoch with configuration entropy against a plain epoch (the engine);
(d) a 1001-point sweep of one LeNet300 on the test set: fast path against the
    reference path (the reference is timed on a subset of points and scaled). The
    network is trained here for one epoch, or read from a train job's ``weights.pt``
    (``--sweep-weights``); the fast path's time depends on it (margins), so its test
    accuracy is printed too, and where its time goes (the certified steps, the exact tail);
(e) on a GPU (or with ``--pipeline``): the main experiment end to end through
    ``snakemake --cores all``, stage by stage (``--until``), with each stage's wall time,
    the GPUs' mean and peak utilisation during it (sampled by ``nvidia-smi``) and each
    train job's own time (seeds x epochs of one arm, from its networks' metadata). With
    ``--pipeline-dir`` and ``--pipeline-budget`` it stops cleanly after that many seconds,
    and the next call with the same folder goes on (for machines that allow only short runs).

Every ratio compares runs made in this process, interleaved, so machine load affects
both sides alike. Epoch times can be measured on a subset of the training set
(``--train-samples``) and are then scaled to the full epoch.

    python benchmarks/engine.py --mnist ../shared/data/mnist [--threads 2] [--seeds 4]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench import regularizers
from sparsebench.config import PruneHparams, TrainHparams
from sparsebench.data import MNIST_MEAN, MNIST_STD, load_mnist, write_synthetic_mnist
from sparsebench.models import build_model
from sparsebench.prune import criterion_scores, sweep_fast, sweep_reference
from sparsebench.train import evaluate, train_networks

FULL_EPOCH = 60_000


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def naive_epoch(raw_dir: Path, samples: int, device: torch.device) -> None:
    """The obvious way: torchvision dataset, DataLoader, per-sample transforms."""
    import torchvision
    from torchvision import transforms

    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "MNIST" / "raw"  # torchvision reads the decompressed files
        raw.mkdir(parents=True)
        for gz in Path(raw_dir).glob("*-ubyte.gz"):
            (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
        dataset = torchvision.datasets.MNIST(
            root,
            train=True,
            download=False,
            transform=transforms.Compose(
                [
                    transforms.ToTensor(),
                    transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)),
                    transforms.Lambda(torch.flatten),
                ]
            ),
        )
        subset = torch.utils.data.Subset(dataset, range(samples))
        loader = torch.utils.data.DataLoader(subset, batch_size=64, shuffle=True)
        model = nn.Sequential(
            nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
        ).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        for images, labels in loader:
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def engine_epoch(
    data, seeds: list[int], regs: list[dict], device: torch.device, autograd: bool = False
):
    """One epoch of the engine; returns the trained (stacked) model. ``autograd``: every
    regularizer's gradient through autograd, none added to ``.grad`` in place."""
    hparams = TrainHparams(epochs=1, batch_size=64)
    built = [regularizers.build(spec) for spec in regs]
    for reg in built if autograd else []:
        reg.writes_gradient = lambda weights: False
    return train_networks("lenet300", seeds, built, hparams, data.train, data.test, device)[0]


def start_gpu_sampler(period_ms: int = 200) -> subprocess.Popen[str] | None:
    """``nvidia-smi`` printing every GPU's utilisation (percent) every ``period_ms``; None
    where there is no ``nvidia-smi``."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
    return subprocess.Popen(
        ["nvidia-smi", *query, f"--loop-ms={period_ms}"], stdout=subprocess.PIPE, text=True
    )


def gpu_utilisation(sampler: subprocess.Popen[str] | None) -> str:
    """Stop ``sampler``; its samples' mean and peak, over time and GPUs."""
    if sampler is None:
        return "GPU utilisation: no nvidia-smi"
    sampler.terminate()
    output, _ = sampler.communicate()
    samples = [float(line) for line in output.split() if line.replace(".", "", 1).isdigit()]
    if not samples:
        return "GPU utilisation: no samples"
    return f"GPU busy {statistics.mean(samples):.0f} % on average, peak {max(samples):.0f} %"


def train_job_times(workdir: Path) -> list[tuple[str, int, int, float, str]]:
    """Each train job's arm, seeds, epochs, training time (over all its attempts) and a
    remark, from its networks' metadata."""
    jobs = {}
    for path in workdir.glob("results/*/*/train/seeds*/seed*/metadata.json"):
        record = json.loads(path.read_text())
        job = (record["experiment"], record["arm"], tuple(record["seeds_in_job"]))
        epochs = record["settings"]["train"]["epochs"]
        arm = f"{record['experiment']}/{record['arm']}"
        resumed = record.get("resumed_after_epoch")
        remark = "" if resumed is None else f"  (resumed after epoch {resumed})"
        jobs[job] = (arm, len(job[2]), epochs, record["train_seconds_for_job"], remark)
    return sorted(jobs.values())


STAGES = ("download", "train", "prune", "aggregate", "figures")


def run_for_at_most(command: list[str], seconds: float | None) -> tuple[float, bool]:
    """Run ``command`` in its own process group until it ends or ``seconds`` pass, then stop
    it as Ctrl-C in a terminal would (Snakemake stops, its train jobs save a checkpoint
    after their epoch). Returns the wall time and whether the command finished."""
    started = time.perf_counter()
    process = subprocess.Popen(command, start_new_session=True)
    try:
        process.wait(timeout=seconds)
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as stop:
        os.killpg(process.pid, signal.SIGINT)
        process.wait()
        if isinstance(stop, KeyboardInterrupt):
            raise
        return time.perf_counter() - started, False
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    return time.perf_counter() - started, True


def pipeline_stages(
    raw_dir: Path, extra_config: list[str], folder: Path | None, budget_s: float | None
) -> None:
    """Run the main experiment through Snakemake one stage at a time; print wall times.

    In ``folder`` (else a temporary one) the run can be stopped after ``budget_s`` seconds
    and continued by the next call with the same folder: Snakemake reruns what is missing,
    train jobs go on from their checkpoints, and each stage's time is the sum over calls
    (kept in ``engine_stages.json`` there).
    """
    repo = Path(__file__).resolve().parents[1]
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        folder.mkdir(parents=True, exist_ok=True)
        record_path = folder / "engine_stages.json"
        record = {"pipeline_config": list(extra_config), "calls": []}
        if record_path.exists():
            record = json.loads(record_path.read_text())
            if record["pipeline_config"] != list(extra_config):
                sys.exit(
                    f"{folder} holds a run made with --pipeline-config "
                    f"{record['pipeline_config']}; give another --pipeline-dir"
                )
        common = [
            sys.executable,  # this interpreter's snakemake, wherever its scripts went
            "-m",
            "snakemake",
            "--snakefile",
            str(repo / "Snakefile"),
            "--directory",
            str(folder),
            "--configfile",
            str(repo / "config.yaml"),
            "--cores",
            "all",
            "--quiet",  # not "all": that hides the errors too
            "--rerun-incomplete",
            "--config",
            f"data_mirror={Path(raw_dir).resolve()}",  # snakemake runs in the folder
            *extra_config,
        ]
        deadline = None if budget_s is None else time.monotonic() + budget_s
        print("(e) the main experiment through snakemake --cores all, per stage")
        finished = {call["stage"] for call in record["calls"] if call["finished"]}
        for stage in STAGES:
            if stage in finished:
                continue
            left = None if deadline is None else deadline - time.monotonic()
            done = False
            if left is None or left > 0:
                sampler = start_gpu_sampler()
                seconds, done = run_for_at_most([*common, "--until", stage], left)
                call = {"stage": stage, "seconds": seconds, "finished": done}
                record["calls"].append({**call, "gpu": gpu_utilisation(sampler)})
                record_path.write_text(json.dumps(record, indent=1))
            if not done:
                print(
                    f"    stopped in stage {stage} after the --pipeline-budget; run the same"
                    f" command again to go on from there (--pipeline-dir {folder})"
                )
                return
        total = 0.0
        for stage in STAGES:
            calls = [call for call in record["calls"] if call["stage"] == stage]
            seconds = sum(call["seconds"] for call in calls)
            total += seconds
            over = "" if len(calls) == 1 else f"; over {len(calls)} calls, the last one's"
            print(f"    {stage:<10} {seconds:8.1f} s  ({calls[-1]['gpu']}{over})")
        print(f"    {'total':<10} {total:8.1f} s  (target on one H200: <= 900 s)")
        print("    train jobs, each training its seeds together (target for 64 seeds x 100")
        print("    epochs on one H200: <= 180 s):")
        for arm, seeds, epochs, seconds, remark in train_job_times(folder):
            print(f"      {arm:<36} {seeds:3d} seeds x {epochs:3d} epochs {seconds:8.1f} s{remark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", type=Path, help="folder of the original MNIST .gz files")
    parser.add_argument("--train-samples", type=int, default=15_000)
    parser.add_argument("--seeds", type=int, default=4, help="K for (b)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reference-points", type=int, default=21)
    parser.add_argument("--skip", default="", help="parts to skip, e.g. 'a,d'")
    parser.add_argument(
        "--sweep-weights", type=Path, help="a train job's weights.pt to sweep in (d)"
    )
    parser.add_argument(
        "--pipeline", action="store_true", help="run (e) even without a GPU (very long on a CPU)"
    )
    parser.add_argument(
        "--pipeline-config", nargs="*", default=[], help="extra --config items for (e)"
    )
    parser.add_argument(
        "--pipeline-dir",
        type=Path,
        help="(e)'s working folder, kept: a later call with it goes on where this one stopped",
    )
    parser.add_argument(
        "--pipeline-budget",
        type=float,
        help="seconds (e) may run in this call (with --pipeline-dir); then it stops cleanly",
    )
    args = parser.parse_args()
    if args.pipeline_budget is not None and args.pipeline_dir is None:
        parser.error("--pipeline-budget needs --pipeline-dir, where the next call goes on")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    skip = set(args.skip.split(","))

    tmp = tempfile.TemporaryDirectory()
    raw_dir = args.mnist
    if raw_dir is None:
        raw_dir = Path(tmp.name)
        write_synthetic_mnist(raw_dir, train_samples=FULL_EPOCH, test_samples=10_000)
    data = load_mnist(raw_dir, train_samples=args.train_samples, device=device)
    scale = FULL_EPOCH / args.train_samples
    entropy = [{"name": "configuration_entropy", "coefficient": 1.0}]
    print(f"device {device}, {args.threads} threads, epochs timed on {args.train_samples}")
    print(f"training samples and scaled x{scale:.1f} to a 60,000-image epoch; batch 64\n")

    # Warm up every path once (JIT compiles, allocator, thread pools).
    engine_epoch(load_mnist(raw_dir, train_samples=640, device=device), [0], entropy, device)

    if "a" not in skip:
        naive = engine = 0.0
        naive_times, engine_times = [], []
        for _ in range(args.repeats):
            naive_times.append(timed(lambda: naive_epoch(raw_dir, args.train_samples, device)))
            engine_times.append(timed(lambda: engine_epoch(data, [0], [], device)))
        naive, engine = statistics.median(naive_times), statistics.median(engine_times)
        print("(a) naive loop vs engine, one seed, per epoch")
        print(f"    naive  {naive * scale:7.2f} s   engine {engine * scale:7.2f} s")
        print(f"    engine speed-up: {naive / engine:.2f}x  (target >= 3)\n")

    if "b" not in skip:
        k = args.seeds
        seeds = list(range(k))
        stacked, sequential = [], []
        for _ in range(args.repeats):
            stacked.append(timed(lambda: engine_epoch(data, seeds, [], device)))
            sequential.append(timed(lambda: [engine_epoch(data, [s], [], device) for s in seeds]))
        stacked_t, sequential_t = statistics.median(stacked), statistics.median(sequential)
        print(f"(b) {k} seeds stacked vs {k} one after another, per epoch")
        print(f"    stacked {stacked_t * scale:7.2f} s   sequential {sequential_t * scale:7.2f} s")
        print(f"    stacked speed-up: {sequential_t / stacked_t:.2f}x\n")

    if "c" not in skip:
        plain_times, entropy_times, autograd_times = [], [], []
        for _ in range(args.repeats):
            plain_times.append(timed(lambda: engine_epoch(data, [0], [], device)))
            entropy_times.append(timed(lambda: engine_epoch(data, [0], entropy, device)))
            autograd_times.append(
                timed(lambda: engine_epoch(data, [0], entropy, device, autograd=True))
            )
        plain, with_entropy, by_autograd = (
            statistics.median(t) for t in (plain_times, entropy_times, autograd_times)
        )
        # Each entropy epoch against the plain epoch run just before it: the machine's
        # speed drifts between repeats more than between neighbours.
        pairs = sorted(e / p for e, p in zip(entropy_times, plain_times))
        print("(c) configuration-entropy epoch vs plain epoch, one seed")
        print(f"    plain {plain * scale:7.2f} s   entropy {with_entropy * scale:7.2f} s")
        print(
            f"    ratio: {statistics.median(pairs):.2f}  (targets: <= 2.0, engine issue <= 1.25;"
            f" median of {len(pairs)} back-to-back pairs, which ranged"
            f" {pairs[0]:.2f}-{pairs[-1]:.2f})"
        )
        print(
            f"    (its gradient through an autograd node instead of in place: "
            f"{by_autograd * scale:.2f} s, ratio {by_autograd / plain:.2f})\n"
        )

    if "d" not in skip:
        if args.sweep_weights is None:
            model = engine_epoch(data, [0], [], device)  # a trained network: one epoch
            source = f"trained here, 1 epoch on {args.train_samples} images"
        else:
            model = build_model("lenet300", [0], device)
            state = torch.load(args.sweep_weights, map_location=device)
            model.load_network_state_dicts([state])
            source = str(args.sweep_weights)
        accuracy = float(evaluate(model, data.test)[1][0])
        scores = criterion_scores("sensitivity", model, data.train, seed=0)
        percentiles = PruneHparams().percentiles()
        step = max(1, len(percentiles) // args.reference_points)
        subset = percentiles[::step]
        sweep_fast(model, scores, percentiles, data.test)  # compiles or loads its kernels
        phases: dict = {}  # the last run's, where the numba path ran
        fast_times = sorted(
            timed(lambda: sweep_fast(model, scores, percentiles, data.test, phases))
            for _ in range(args.repeats)
        )
        fast = statistics.median(fast_times)
        reference = timed(lambda: sweep_reference(model, scores, subset, data.test))
        reference_full = reference * len(percentiles) / len(subset)
        print(f"(d) {len(percentiles)}-point sweep of one LeNet300 on {len(data.test)} test images")
        print(f"    network: {source}; unpruned test accuracy {accuracy:.2f} %")
        print(
            f"    fast {fast:7.2f} s   reference {reference_full:7.2f} s"
            f" (from {len(subset)} points)"
        )
        # An absolute target: the spread shows how much the machine's speed moved meanwhile.
        print(
            f"    (fast: median of {len(fast_times)} runs, which ranged"
            f" {fast_times[0]:.2f}-{fast_times[-1]:.2f} s)"
        )
        if phases:
            print(
                f"    (fast, last run: certified steps before step {phases['exact_from']}"
                f" {phases['certified_seconds']:.2f} s, exact tail from there"
                f" {phases['exact_seconds']:.2f} s)"
            )
        print(f"    fast speed-up: {reference_full / fast:.1f}x  (target: fast <= 3 s)\n")

    if args.pipeline or (device.type == "cuda" and "e" not in skip):
        pipeline_stages(raw_dir, args.pipeline_config, args.pipeline_dir, args.pipeline_budget)
    tmp.cleanup()


if __name__ == "__main__":
    main()
