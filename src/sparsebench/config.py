"""Typed hyperparameters of an experiment, built from the validated ``config.yaml``.

The config is checked against ``workflow/schemas/config.schema.yaml`` (unknown keys,
types, ranges) and then against the registries (regularizer and model names, arm
references), so every mistake is reported before any job runs, with its place named.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key or value."""


@dataclass(frozen=True)
class TrainHparams:
    optimizer: str = "adam"
    lr: float = 1e-4
    epochs: int = 100
    batch_size: int = 64
    train_samples: int | None = None
    subset_seed: int = 0
    eval_batch_size: int = 10000


@dataclass(frozen=True)
class PruneHparams:
    criteria: tuple[str, ...] = ("sensitivity", "magnitude", "random")
    percentile_step: float = 0.1

    def percentiles(self) -> list[float]:
        """0, step, 2*step, ..., 100 (inclusive), rounded to avoid float drift."""
        count = round(100.0 / self.percentile_step)
        return [round(i * 100.0 / count, 6) for i in range(count + 1)]


@dataclass(frozen=True)
class ReportSettings:
    baseline_arm: str
    accuracy_levels: tuple[float, ...] = (90.0, 95.0, 96.0, 97.0, 98.0)
    weight_figure_arms: tuple[str, ...] = ()
    weight_figure_seed: int = 0


@dataclass(frozen=True)
class ArmConfig:
    name: str
    regularizers: tuple[dict[str, Any], ...]
    description: str = ""


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    dataset: str
    model: str
    seeds: tuple[int, ...]
    seeds_per_job: int
    train: TrainHparams
    prune: PruneHparams
    report: ReportSettings
    arms: dict[str, ArmConfig] = field(default_factory=dict)
    description: str = ""

    def seed_chunks(self) -> list[tuple[int, ...]]:
        """The seeds split into the groups that one train job trains together."""
        k = self.seeds_per_job
        return [self.seeds[i : i + k] for i in range(0, len(self.seeds), k)]


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _location(error: jsonschema.ValidationError) -> str:
    return "config" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.path)


def validate_schema(config: Mapping[str, Any]) -> None:
    """Check ``config`` against the JSON schema; raise ConfigError naming every problem."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path)))
    if errors:
        lines = [f"{_location(e)}: {e.message}" for e in errors]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, recursively for nested mappings."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_preset(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with its ``preset`` (if any) merged into every experiment."""
    name = config.get("preset")
    if not name:
        return dict(config)
    presets = config.get("presets", {})
    if name not in presets:
        raise ConfigError(f"config.preset: unknown preset {name!r}; defined: {sorted(presets)}")
    experiments = {
        exp_name: deep_merge(experiment, presets[name])
        for exp_name, experiment in config["experiments"].items()
    }
    return {**config, "experiments": experiments}


def selected_experiments(config: Mapping[str, Any]) -> list[str]:
    """The experiment names that ``rule all`` builds, checked against the defined ones."""
    chosen = config["experiment"]
    names = [chosen] if isinstance(chosen, str) else list(chosen)
    unknown = [n for n in names if n not in config["experiments"]]
    if unknown:
        raise ConfigError(
            f"config.experiment: unknown experiment(s) {unknown}; "
            f"defined: {sorted(config['experiments'])}"
        )
    return names


def _unbatchable_regularizers(
    exp_name: str, arm_name: str, specs: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Build each of an arm's regularizers (a bad entry is a ConfigError naming it); return
    the names of those that cannot train stacked seeds."""
    from sparsebench import regularizers

    unbatchable = []
    for i, spec in enumerate(specs):
        where = f"config.experiments.{exp_name}.arms.{arm_name}.regularizers[{i}]"
        try:
            regularizer = regularizers.build(spec)
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"{where}: {error}") from None
        if not regularizer.supports_batching:
            unbatchable.append(f"{arm_name}: {regularizer.name}")
    return unbatchable


def resolve_seeds_per_job(
    value: int | str,
    device_type: str,
    defaults: Mapping[str, int],
    unbatchable: Sequence[str] = (),
    where: str = "seeds_per_job",
) -> int:
    """Seeds per train job: ``value``, or the device type's default for ``auto``.

    ``unbatchable`` lists the experiment's regularizers (``"arm: name"``) that cannot train
    stacked seeds: ``auto`` is then 1, and an explicit value above 1 a ConfigError.
    """
    if value == "auto":
        return 1 if unbatchable else int(defaults.get(device_type, 1))
    if int(value) > 1 and unbatchable:
        raise ConfigError(
            f"{where}: {value}, but regularizer(s) {list(unbatchable)} cannot train stacked "
            "seeds; set it to 1 or auto for this experiment"
        )
    return int(value)


def experiment_config(
    config: Mapping[str, Any], name: str, device_type: str = "cpu"
) -> ExperimentConfig:
    """The typed, checked settings of experiment ``name`` (preset already applied)."""
    from sparsebench.models import MODELS

    raw = config["experiments"][name]
    if raw["model"] not in MODELS:
        raise ConfigError(
            f"config.experiments.{name}.model: unknown model {raw['model']!r}; "
            f"registered: {sorted(MODELS)}"
        )
    arms = {}
    unbatchable: list[str] = []
    for arm_name, arm in raw["arms"].items():
        unbatchable += _unbatchable_regularizers(name, arm_name, arm["regularizers"])
        arms[arm_name] = ArmConfig(
            name=arm_name,
            regularizers=tuple(dict(r) for r in arm["regularizers"]),
            description=arm.get("description", ""),
        )
    report = ReportSettings(
        baseline_arm=raw["report"].get("baseline_arm", next(iter(arms))),
        accuracy_levels=tuple(raw["report"].get("accuracy_levels", ReportSettings.accuracy_levels)),
        weight_figure_arms=tuple(raw["report"].get("weight_figure_arms", ())),
        weight_figure_seed=raw["report"].get("weight_figure_seed", 0),
    )
    for arm_name in (report.baseline_arm, *report.weight_figure_arms):
        if arm_name not in arms:
            raise ConfigError(
                f"config.experiments.{name}.report names arm {arm_name!r}, "
                f"which the experiment does not define (arms: {sorted(arms)})"
            )
    seeds = tuple(range(raw["seeds"]))
    if report.weight_figure_seed not in seeds:
        raise ConfigError(
            f"config.experiments.{name}.report.weight_figure_seed: seed "
            f"{report.weight_figure_seed} is not among the {len(seeds)} seeds"
        )
    seeds_per_job_key = f"config.experiments.{name}.seeds_per_job"
    if config.get("preset"):  # the value may be the preset's
        seeds_per_job_key += f" (preset {config['preset']!r} applied)"
    prune = dict(raw["prune"])
    if "criteria" in prune:
        prune["criteria"] = tuple(prune["criteria"])
    return ExperimentConfig(
        name=name,
        dataset=raw["dataset"],
        model=raw["model"],
        seeds=seeds,
        seeds_per_job=resolve_seeds_per_job(
            raw.get("seeds_per_job", "auto"),
            device_type,
            config.get("seeds_per_job", {}),
            unbatchable,
            where=seeds_per_job_key,
        ),
        train=TrainHparams(**raw["train"]),
        prune=PruneHparams(**prune),
        report=report,
        arms=arms,
        description=raw.get("description", ""),
    )


def load_config(config: Mapping[str, Any], device_type: str = "cpu") -> dict[str, ExperimentConfig]:
    """Validate a raw config and return the typed settings of every defined experiment."""
    validate_schema(config)
    merged = apply_preset(config)
    validate_schema(merged)
    selected_experiments(merged)
    return {name: experiment_config(merged, name, device_type) for name in merged["experiments"]}
