"""Targets, paths and per-job settings derived from the validated config."""

from dataclasses import asdict

from sparsebench.config import apply_preset, load_config, selected_experiments
from sparsebench.data import MNIST_FILES
from sparsebench.devices import device_type
from sparsebench.environment import export_source_path

export_source_path()  # jobs in a conda environment (--sdm conda) import sparsebench from here

# Validates the whole config (schema, registries, arm references) before any job.
DEVICE_TYPE = device_type(config["device"])
EXPERIMENTS = load_config(config, DEVICE_TYPE)
RUN = selected_experiments(apply_preset(config))
RESULTS = config.get("results_dir", "results")
REPORTS = config.get("reports_dir", "reports")
RESOURCES = config.get("resources", {})
NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9_.-]*"

DATA_DIR = f"{RESULTS}/data/mnist/raw"
TRAIN_DIR = f"{RESULTS}/{{experiment}}/{{arm}}/train/{{chunk}}"
SWEEP_DIR = f"{RESULTS}/{{experiment}}/{{arm}}/prune/{{chunk}}"
TABLES = f"{REPORTS}/{{experiment}}/tables"
FIGURES = f"{REPORTS}/{{experiment}}/figures"
CONDA_ENV = "../../envs/sparsebench.yaml"
TABLE_NAMES = ("accuracy_vs_kept", "kept_at_accuracy")
FIGURE_NAMES = ("entropy_matrices", "weight_matrices", "accuracy_vs_kept")


wildcard_constraints:
    experiment=NAME_PATTERN,
    arm=NAME_PATTERN,
    chunk=r"seeds\d+-\d+",
    seed=r"\d+",


def chunk_name(seeds):
    return f"seeds{seeds[0]}-{seeds[-1]}"


def chunk_seeds(experiment, chunk):
    """The seeds one train job trains together (its `chunk` wildcard)."""
    for seeds in EXPERIMENTS[experiment].seed_chunks():
        if chunk_name(seeds) == chunk:
            return list(seeds)
    raise ValueError(f"no seed chunk {chunk!r} in experiment {experiment!r}")


def chunk_of_seed(experiment, seed):
    for seeds in EXPERIMENTS[experiment].seed_chunks():
        if int(seed) in seeds:
            return chunk_name(seeds)
    raise ValueError(f"seed {seed} is not in experiment {experiment!r}")


def train_dir_of_seed(experiment, arm, seed):
    chunk = chunk_of_seed(experiment, seed)
    return TRAIN_DIR.format(experiment=experiment, arm=arm, chunk=chunk)


def sweep_dir_of_seed(experiment, arm, seed):
    chunk = chunk_of_seed(experiment, seed)
    return SWEEP_DIR.format(experiment=experiment, arm=arm, chunk=chunk)


def sweep_entries(experiment):
    """(arm, seed, folder of its prune job) for every network of the experiment."""
    exp = EXPERIMENTS[experiment]
    return [
        (arm, seed, sweep_dir_of_seed(experiment, arm, seed))
        for arm in exp.arms
        for seed in exp.seeds
    ]


def sweep_dirs(experiment):
    return sorted({folder for _, _, folder in sweep_entries(experiment)})


def table_files(experiment, ext):
    return [
        f"{TABLES}/{name}.{ext}".format(experiment=experiment) for name in TABLE_NAMES
    ]


def figure_files(experiment, ext):
    return [
        f"{FIGURES}/{name}.{ext}".format(experiment=experiment) for name in FIGURE_NAMES
    ]


def all_targets():
    return [
        path
        for experiment in RUN
        for ext in ("csv", "md")
        for path in table_files(experiment, ext)
    ] + [
        path
        for experiment in RUN
        for ext in ("png", "svg")
        for path in figure_files(experiment, ext)
    ]


def train_settings(wildcards):
    """Everything a train job's numbers depend on (params: a change triggers a rerun)."""
    exp = EXPERIMENTS[wildcards.experiment]
    return {
        "model": exp.model,
        "dataset": exp.dataset,
        "seeds": chunk_seeds(wildcards.experiment, wildcards.chunk),
        "train": asdict(exp.train),
        "regularizers": [dict(r) for r in exp.arms[wildcards.arm].regularizers],
        "device": config["device"],
    }


def prune_settings(wildcards):
    """Everything a prune job's numbers depend on; it sweeps its train job's seeds."""
    exp = EXPERIMENTS[wildcards.experiment]
    return {
        "model": exp.model,
        "seeds": chunk_seeds(wildcards.experiment, wildcards.chunk),
        "train": asdict(exp.train),
        "prune": asdict(exp.prune),
        "device": config["device"],
    }


def train_runtime_minutes(wildcards, attempt):
    """The train job's time limit: scales with seeds x epochs, and grows on each retry."""
    exp = EXPERIMENTS[wildcards.experiment]
    seeds = len(chunk_seeds(wildcards.experiment, wildcards.chunk))
    per_seed_epoch = RESOURCES.get("train_minutes_per_seed_epoch", 0.5)
    return attempt * max(10, int(per_seed_epoch * seeds * exp.train.epochs) + 5)


def prune_runtime_minutes(wildcards, attempt):
    """The prune job's time limit: scales with its networks, and grows on each retry."""
    seeds = len(chunk_seeds(wildcards.experiment, wildcards.chunk))
    per_seed = RESOURCES.get("prune_minutes_per_seed", 10)
    return attempt * max(10, int(per_seed * seeds) + 5)


def gpus_per_job():
    return 1 if DEVICE_TYPE == "cuda" else 0


def weight_figure_dirs(wildcards):
    report_settings = EXPERIMENTS[wildcards.experiment].report
    return [
        train_dir_of_seed(wildcards.experiment, arm, report_settings.weight_figure_seed)
        for arm in report_settings.weight_figure_arms
    ]
