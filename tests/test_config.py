"""The shipped config and its validation: every mistake named before any job runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sparsebench.config import ConfigError, apply_preset, load_config, validate_schema

CONFIG = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())


def with_change(path: str, value) -> dict:
    config = copy.deepcopy(CONFIG)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[last] = value
    return config


def test_main_experiment_is_the_paper_protocol() -> None:
    main = load_config(CONFIG)["main"]
    assert list(main.arms) == ["none", "weight_decay", "entropy", "entropy_weight_decay"]
    assert len(main.seeds) == 64
    assert (main.train.lr, main.train.epochs, main.train.batch_size) == (1e-4, 100, 64)
    assert main.arms["entropy_weight_decay"].regularizers == (
        {"name": "configuration_entropy", "coefficient": 1.0},
        {"name": "weight_decay", "coefficient": 1.0e-4},
    )
    assert len(main.prune.percentiles()) == 1001
    assert main.prune.percentiles()[:3] == [0.0, 0.1, 0.2]
    assert main.prune.percentiles()[-1] == 100.0


def test_entropy_ablation_holds_both_readings() -> None:
    ablation = load_config(CONFIG)["entropy_ablation"]
    assert len(ablation.seeds) == 8
    readings = {
        arm: (spec["name"], spec["coefficient"])
        for arm, config in ablation.arms.items()
        for spec in config.regularizers
    }
    assert readings == {
        "formula_c1": ("configuration_entropy", 1.0),
        "formula_c0.1": ("configuration_entropy", 0.1),
        "formula_c0.01": ("configuration_entropy", 0.01),
        "prose_c1": ("configuration_entropy_prose", 1.0),
        "prose_c0.01": ("configuration_entropy_prose", 0.01),
    }


def test_quick_preset_reduces_seeds_epochs_and_samples() -> None:
    quick = load_config({**CONFIG, "preset": "quick"})["main"]
    main = load_config(CONFIG)["main"]
    assert len(quick.seeds) < len(main.seeds)
    assert quick.train.epochs < main.train.epochs
    assert quick.train.train_samples is not None and quick.train.train_samples < 60_000
    assert quick.arms == main.arms


def test_seeds_per_job_follows_the_device() -> None:
    assert load_config(CONFIG, "cpu")["main"].seeds_per_job == CONFIG["seeds_per_job"]["cpu"]
    cuda = load_config(CONFIG, "cuda")["main"]
    assert cuda.seeds_per_job == CONFIG["seeds_per_job"]["cuda"]
    chunks = cuda.seed_chunks()
    assert sum(len(c) for c in chunks) == 64
    assert sorted(s for c in chunks for s in c) == list(range(64))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("experiments.main.train.epochs", -1, "config.experiments.main.train.epochs: -1"),
        ("experiments.main.train.lr", "fast", "config.experiments.main.train.lr"),
        ("device", "tpu", "config.device"),
        ("experiments.main.prune.criteria", ["taylor"], "taylor"),
        ("experiments.main.arms.none.regularisers", [], "'regularisers' was unexpected"),
        ("experiments.main.report.baseline_arm", "missing_arm", "missing_arm"),
        ("experiments.main.model", "resnet", "unknown model 'resnet'"),
        ("preset", "slow", "unknown preset 'slow'"),
        ("experiment", "mian", "unknown experiment(s) ['mian']"),
    ],
)
def test_invalid_config_names_the_problem(path: str, value, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(with_change(path, value))
    assert message in str(error.value)


def test_unknown_regularizer_and_option_are_named() -> None:
    bad = with_change("experiments.main.arms.none.regularizers", [{"name": "l0_gates"}])
    with pytest.raises(ConfigError, match=r"arms\.none\.regularizers\[0\]: unknown regularizer"):
        load_config(bad)
    bad = with_change(
        "experiments.main.arms.none.regularizers", [{"name": "weight_decay", "strength": 2}]
    )
    with pytest.raises(ConfigError, match="unknown option.*strength"):
        load_config(bad)


def test_preset_keys_are_validated_too() -> None:
    config = copy.deepcopy(CONFIG)
    config["presets"]["quick"]["train"]["epochs"] = 0
    with pytest.raises(ConfigError, match="presets.quick.train.epochs"):
        validate_schema(config)
    assert apply_preset(CONFIG) == CONFIG  # no preset: unchanged


@pytest.fixture
def unbatchable_arm(unbatchable_regularizer) -> dict:
    """The config with the main experiment's weight-decay arm on an unbatchable regularizer."""
    return with_change(
        "experiments.main.arms.weight_decay.regularizers", [{"name": unbatchable_regularizer.name}]
    )


def test_auto_seeds_per_job_is_one_where_a_regularizer_cannot_batch(unbatchable_arm) -> None:
    assert load_config(unbatchable_arm, "cuda")["main"].seeds_per_job == 1
    assert load_config(CONFIG, "cuda")["main"].seeds_per_job == 64  # the others keep theirs
    assert load_config(unbatchable_arm, "cuda")["entropy_ablation"].seeds_per_job > 1


def test_explicit_seeds_per_job_above_one_with_such_a_regularizer_is_named(
    unbatchable_arm,
) -> None:
    unbatchable_arm["experiments"]["main"]["seeds_per_job"] = 4
    with pytest.raises(ConfigError) as error:
        load_config(unbatchable_arm)
    message = str(error.value)
    assert "config.experiments.main.seeds_per_job: 4" in message
    assert "weight_decay: one_seed_at_a_time" in message
    unbatchable_arm["experiments"]["main"]["seeds_per_job"] = 1
    assert load_config(unbatchable_arm)["main"].seeds_per_job == 1
    with pytest.raises(ConfigError, match=r"seeds_per_job \(preset 'quick' applied\): 3, but"):
        load_config({**unbatchable_arm, "preset": "quick"})  # the quick preset stacks 3
