"""The Snakemake workflow end to end on synthetic data, config validation, determinism."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from docutils.core import publish_doctree
from pipeline import REPO, run_snakemake, tiny_overlay

from sparsebench.config import PruneHparams, TrainHparams
from sparsebench.jobs import run_prune_job, run_train_job

pytestmark = pytest.mark.slow

TABLES = ("accuracy_vs_kept.csv", "accuracy_vs_kept.md", "kept_at_accuracy.csv")
FIGURES = ("entropy_matrices", "weight_matrices", "accuracy_vs_kept")


@pytest.fixture(scope="module")
def tiny_run(synthetic_mnist, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("tiny_run")
    overlay = tiny_overlay(synthetic_mnist.dir, synthetic_mnist.checksums)
    run_snakemake(workdir, overlay, "--cores", "2")
    return workdir


def test_pipeline_writes_every_table_and_figure(tiny_run: Path) -> None:
    reports = tiny_run / "reports" / "tiny"
    for name in TABLES:
        assert (reports / "tables" / name).stat().st_size > 0, name
    for name in FIGURES:
        assert (reports / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (reports / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    summary = pd.read_csv(reports / "tables" / "accuracy_vs_kept.csv")
    assert set(summary["arm"]) == {"none", "entropy"}
    assert set(summary["criterion"]) == {"sensitivity", "magnitude", "random"}
    assert (summary["n_seeds"] == 2).all()
    kept = pd.read_csv(reports / "tables" / "kept_at_accuracy.csv")
    assert set(kept["level"]) == {20, 50, 80}


def test_sweep_csv_and_provenance(tiny_run: Path) -> None:
    sweep = pd.read_csv(tiny_run / "results/tiny/entropy/prune/seeds0-1/seed1.csv")
    assert len(sweep) == 3 * 101
    assert list(sweep.columns) == [
        "criterion",
        "percentile",
        "kept_total",
        "kept_fc1",
        "kept_fc2",
        "kept_fc3",
        "test_accuracy",
    ]
    first = sweep[sweep["criterion"] == "sensitivity"].iloc[0]
    assert first["kept_total"] == 784 * 300 + 300 * 100 + 100 * 10
    assert (sweep.groupby("criterion")["kept_total"].last() == 0).all()

    meta = json.loads((tiny_run / "results/tiny/entropy/prune/seeds0-1/seed1.json").read_text())
    train_meta = json.loads(
        (tiny_run / "results/tiny/entropy/train/seeds0-1/seed1/metadata.json").read_text()
    )
    for record in (meta, train_meta):
        assert record["seed"] == 1
        assert record["seeds_in_job"] == [0, 1]  # one prune job per train job
        assert record["arm"] == "entropy"
        assert record["device"].startswith("cpu")
        assert record["versions"]["torch"]
        assert record["git_commit"]
    assert train_meta["settings"]["regularizers"] == [
        {"name": "configuration_entropy", "coefficient": 1.0}
    ]
    # The unpruned end of the sweep is the trained network itself.
    assert meta["unpruned_test_accuracy"] == pytest.approx(
        meta["final_test_accuracy_in_training"], abs=1e-6
    )
    log = pd.read_csv(tiny_run / "results/tiny/entropy/train/seeds0-1/seed1/log.csv")
    assert list(log["epoch"]) == [1]
    assert {"train_loss", "reg_configuration_entropy", "test_accuracy"} <= set(log.columns)


def test_rerun_has_nothing_to_do(tiny_run: Path, synthetic_mnist) -> None:
    overlay = tiny_overlay(synthetic_mnist.dir, synthetic_mnist.checksums)
    result = run_snakemake(tiny_run, overlay, "-n", "--cores", "1")
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"experiments": {"tiny": {"arms": {"bad": {"regularizers": [{"name": "l7"}]}}}}}, "l7"),
        ({"experiments": {"tiny": {"train": {"epochs": -1}}}}, "epochs"),
        ({"experiments": {"tiny": {"train": {"epoch": 3}}}}, "'epoch' was unexpected"),
        ({"experiment": "nonexistent"}, "nonexistent"),
        ({"preset": "quik"}, "quik"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, synthetic_mnist, change, named) -> None:
    overlay = tiny_overlay(synthetic_mnist.dir, synthetic_mnist.checksums, **change)
    result = run_snakemake(tmp_path, overlay, "--cores", "1", check=False)
    assert result.returncode != 0
    assert named in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_default_config_plans_the_paper_experiment(tmp_path) -> None:
    result = run_snakemake(tmp_path, {"device": "cpu"}, "-n", "--cores", "1", "--quiet", "rules")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.MULTILINE))
    assert counts["prune"] == "256"
    assert counts["train"] == "256"  # seeds_per_job is 1 on the CPU: one seed per job
    assert counts["download"] == "1"
    assert counts["aggregate"] == "1"
    assert counts["figures"] == "1"


def test_one_prune_job_sweeps_the_networks_of_one_train_job(tmp_path) -> None:
    # The quick preset trains each arm's 3 seeds in one job: one prune job per arm too.
    overlay = {"device": "cpu", "preset": "quick"}
    result = run_snakemake(tmp_path, overlay, "-n", "--cores", "1", "--quiet", "rules")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.MULTILINE))
    assert counts["train"] == counts["prune"] == "4"


def test_same_seed_gives_identical_sweeps(synthetic_mnist, tmp_path) -> None:
    """Train and sweep the same seed twice on the CPU: byte-identical sweep CSVs."""
    settings = {
        "model": "lenet300",
        "dataset": "mnist",
        "seeds": [3],
        "train": vars(TrainHparams(lr=1e-3, epochs=1, batch_size=32, eval_batch_size=500)),
        "regularizers": [{"name": "configuration_entropy", "coefficient": 1.0}],
        "device": "cpu",
    }
    prune = {"criteria": ["sensitivity", "random"], "percentile_step": 2.0}
    sweeps = []
    for run in ("a", "b"):
        train_dir, prune_dir = tmp_path / run / "train", tmp_path / run / "prune"
        run_train_job(
            synthetic_mnist.dir, train_dir, tmp_path / run / "train.log", "x", "e", settings
        )
        run_prune_job(
            synthetic_mnist.dir,
            train_dir,
            prune_dir,
            tmp_path / run / "prune.log",
            "x",
            "e",
            {**settings, "prune": vars(PruneHparams(**prune))},
        )
        sweeps.append((prune_dir / "seed3.csv").read_bytes())
    assert sweeps[0] == sweeps[1]
    assert len(pd.read_csv(tmp_path / "a" / "prune" / "seed3.csv")) == 2 * 51


def test_a_failed_prune_job_keeps_its_finished_sweeps_for_the_rerun(
    synthetic_mnist, tmp_path
) -> None:
    overlay = tiny_overlay(synthetic_mnist.dir, synthetic_mnist.checksums)
    trained, target = "results/tiny/none/train/seeds0-1", "results/tiny/none/prune/seeds0-1"
    swept = tmp_path / target
    run_snakemake(tmp_path, overlay, "--cores", "1", trained)
    weights = tmp_path / trained / "seed1" / "weights.pt"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])  # seed 1's network unreadable

    failed = run_snakemake(tmp_path, overlay, "--cores", "1", target, check=False)
    assert failed.returncode != 0
    assert not swept.exists()  # Snakemake removes a failed job's output...
    partial = swept.with_name("seeds0-1.partial")  # ...not the sweep it had finished
    assert sorted(p.name for p in partial.iterdir()) == ["attempts.log", "seed0.csv", "seed0.json"]
    finished = (partial / "seed0.csv").read_bytes()

    weights.write_bytes(intact)
    run_snakemake(tmp_path, overlay, "--cores", "1", target)

    assert (swept / "seed0.csv").read_bytes() == finished
    assert (swept / "seed1.csv").is_file() and not partial.exists()
    # Snakemake deleted the failed attempt's log; the rerun's starts with its lines.
    log = (tmp_path / "logs/tiny/none/prune_seeds0-1.log").read_text()
    assert 0 <= log.find("swept seeds [0]") < log.find("seed 0: its sweep from an earlier run")


def test_snakefile_lints_clean() -> None:
    result = run_snakemake(REPO, None, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "caption", sorted((REPO / "workflow" / "report").glob("*.rst")), ids=lambda p: p.name
)
def test_report_captions_are_clean_restructured_text(caption: Path) -> None:
    # `snakemake --report` renders each caption as reStructuredText: a problem there (`|w|`
    # read as a substitution, say) shows up as an error box in the HTML report.
    problems = io.StringIO()
    publish_doctree(
        caption.read_text(), settings_overrides={"warning_stream": problems, "report_level": 2}
    )
    assert problems.getvalue() == ""


@pytest.mark.realdata
def test_quick_preset_smallest_case_on_real_mnist(real_mnist_dir: Path, tmp_path: Path) -> None:
    """One network of the quick preset on the real MNIST, through the workflow."""
    target = "results/main/entropy/prune/seeds0-0"  # the prune job of seed 0 alone
    overlay = {
        "preset": "quick",
        "presets": {"quick": {"seeds_per_job": 1}},
        "device": "cpu",
        "data_mirror": str(real_mnist_dir),
    }
    run_snakemake(tmp_path, overlay, "--cores", "2", target)
    assert sorted(p.name for p in (tmp_path / target).glob("seed*")) == ["seed0.csv", "seed0.json"]
    sweep = pd.read_csv(tmp_path / target / "seed0.csv")
    sensitivity = sweep[sweep["criterion"] == "sensitivity"].set_index("percentile")
    assert len(sensitivity) == 1001
    assert sensitivity.loc[0.0, "kept_total"] == 266_200
    assert sensitivity.loc[0.0, "test_accuracy"] > 90.0  # a few epochs of LeNet300
    assert sensitivity.loc[100.0, "kept_total"] == 0
    # Pruning the least sensitive half costs little; pruning everything leaves chance.
    assert sensitivity.loc[50.0, "test_accuracy"] > sensitivity.loc[0.0, "test_accuracy"] - 2.0
    assert sensitivity.loc[100.0, "test_accuracy"] < 20.0
    meta = json.loads((tmp_path / target / "seed0.json").read_text())
    assert meta["trained_with"]["train_samples"] == 30_000
