"""Aggregation over seeds: hand-made sweeps with known medians, minima, maxima and thresholds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from sparsebench.aggregate import (
    default_table_paths,
    kept_at_accuracy,
    kept_at_accuracy_markdown,
    read_sweeps,
    summarize,
    summary_markdown,
    write_tables,
)

PERCENTILES = [0.0, 50.0, 90.0, 99.0]
KEPT = [20000, 10000, 2000, 200]
# test accuracy (percent) per arm and seed at PERCENTILES, sensitivity criterion
ACCURACY = {
    "plain": {0: [98, 97, 90, 50], 1: [97, 96, 85, 40], 2: [99, 98, 88, 60]},
    "sparse": {0: [98, 98, 97, 92], 1: [98, 97, 96, 80], 2: [97, 98, 97, 91]},
}
# medians: plain 98, 97, 88, 50 (min 97, 96, 85, 40; max 99, 98, 90, 60)
#          sparse 98, 98, 97, 91
LEVELS = [90.0, 97.0, 98.0, 99.5]


def sweep_frame(arm: str, seed: int) -> pd.DataFrame:
    rows = []
    magnitude_offset = -1.0 if arm == "plain" else 0.5
    for criterion, offset in (("sensitivity", 0.0), ("magnitude", magnitude_offset)):
        for i, percentile in enumerate(PERCENTILES):
            kept = KEPT[i] + (4 if (seed == 2 and percentile == 90.0) else 0)
            rows.append(
                {
                    "criterion": criterion,
                    "percentile": percentile,
                    "kept_total": kept,
                    "kept_fc1": kept - kept // 10,
                    "kept_fc2": kept // 10,
                    "test_accuracy": ACCURACY[arm][seed][i] + offset,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture
def entries(tmp_path: Path) -> list[tuple[str, int, Path]]:
    result = []
    for arm in ("plain", "sparse"):
        for seed in (0, 1, 2):
            path = tmp_path / "sweeps" / f"{arm}_seed{seed}.csv"
            path.parent.mkdir(exist_ok=True)
            sweep_frame(arm, seed).to_csv(path, index=False)
            result.append((arm, seed, path))
    return result


def row(frame: pd.DataFrame, **where) -> pd.Series:
    mask = pd.Series(True, index=frame.index)
    for column, value in where.items():
        mask &= frame[column] == value
    selected = frame[mask]
    assert len(selected) == 1, where
    return selected.iloc[0]


def test_read_sweeps_adds_arm_and_seed(entries):
    sweeps = read_sweeps(entries)
    assert len(sweeps) == 6 * 8
    assert list(sweeps.columns[:2]) == ["arm", "seed"]
    assert sorted(sweeps["seed"].unique()) == [0, 1, 2]
    assert row(sweeps, arm="sparse", seed=1, criterion="sensitivity", percentile=99.0)[
        "test_accuracy"
    ] == pytest.approx(80)


def test_summarize_median_min_max(entries):
    summary = summarize(read_sweeps(entries))
    assert len(summary) == 2 * 2 * 4
    plain = row(summary, arm="plain", criterion="sensitivity", percentile=90.0)
    assert plain["accuracy_median"] == pytest.approx(88)
    assert plain["accuracy_min"] == pytest.approx(85)
    assert plain["accuracy_max"] == pytest.approx(90)
    assert plain["kept_median"] == 2000
    assert plain["kept_min"] == 2000
    assert plain["kept_max"] == 2004
    assert plain["kept_fc1_median"] == 1800
    assert plain["kept_fc2_median"] == 200
    assert plain["n_seeds"] == 3
    sparse = row(summary, arm="sparse", criterion="sensitivity", percentile=99.0)
    assert (sparse["accuracy_median"], sparse["accuracy_min"], sparse["accuracy_max"]) == (
        91,
        80,
        92,
    )
    magnitude = row(summary, arm="sparse", criterion="magnitude", percentile=99.0)
    assert magnitude["accuracy_median"] == pytest.approx(91.5)


def test_summarize_percentile_float_noise_groups_together(entries, tmp_path):
    arm, seed, path = entries[0]
    frame = pd.read_csv(path)
    frame.loc[frame["percentile"] == 90.0, "percentile"] = 90.00000000000001
    frame.to_csv(path, index=False)
    summary = summarize(read_sweeps(entries))
    assert row(summary, arm="plain", criterion="sensitivity", percentile=90.0)["n_seeds"] == 3


def test_arm_order_first_seen_or_given(entries):
    reordered = entries[3:] + entries[:3]  # sparse first
    summary = summarize(read_sweeps(reordered))
    assert list(dict.fromkeys(summary["arm"])) == ["sparse", "plain"]
    summary = summarize(read_sweeps(reordered), arm_order=["plain", "sparse"])
    assert list(dict.fromkeys(summary["arm"])) == ["plain", "sparse"]
    assert list(summary["percentile"][:4]) == PERCENTILES
    with pytest.raises(ValueError, match="ghost"):
        summarize(read_sweeps(entries), arm_order=["ghost"])


def test_kept_at_accuracy_values_and_ratio(entries):
    table = kept_at_accuracy(summarize(read_sweeps(entries)), LEVELS, baseline_arm="plain")
    assert len(table) == 2 * 2 * len(LEVELS)
    sens = table[table["criterion"] == "sensitivity"].set_index(["arm", "level"])
    expected_kept = {
        ("plain", 90.0): 10000,  # 88 at p90 is below 90
        ("plain", 97.0): 10000,
        ("plain", 98.0): 20000,
        ("sparse", 90.0): 200,
        ("sparse", 97.0): 2000,
        ("sparse", 98.0): 10000,
    }
    for key, kept in expected_kept.items():
        assert sens.loc[key, "kept_median"] == kept, key
        assert bool(sens.loc[key, "reached"])
    assert sens.loc[("sparse", 90.0), "accuracy_median"] == pytest.approx(91)
    assert sens.loc[("sparse", 90.0), "percentile"] == 99.0
    assert sens.loc[("sparse", 90.0), "reduction_vs_baseline"] == pytest.approx(50.0)
    assert sens.loc[("sparse", 97.0), "reduction_vs_baseline"] == pytest.approx(5.0)
    assert sens.loc[("sparse", 98.0), "reduction_vs_baseline"] == pytest.approx(2.0)
    assert sens.loc[("plain", 97.0), "reduction_vs_baseline"] == pytest.approx(1.0)
    for arm in ("plain", "sparse"):
        assert not bool(sens.loc[(arm, 99.5), "reached"])
        assert math.isnan(sens.loc[(arm, 99.5), "kept_median"])
        assert math.isnan(sens.loc[(arm, 99.5), "reduction_vs_baseline"])
    # magnitude: plain one point lower (medians 97, 96, 87, 49), sparse half a point higher
    # (98.5, 98.5, 97.5, 91.5); the baseline is looked up within the same criterion
    mag = table[table["criterion"] == "magnitude"].set_index(["arm", "level"])
    assert mag.loc[("sparse", 97.0), "kept_median"] == 2000
    assert mag.loc[("sparse", 97.0), "reduction_vs_baseline"] == pytest.approx(10.0)
    assert math.isnan(mag.loc[("plain", 98.0), "kept_median"])
    assert mag.loc[("sparse", 98.0), "kept_median"] == 10000
    assert math.isnan(mag.loc[("sparse", 98.0), "reduction_vs_baseline"])  # baseline unreached


def test_kept_at_accuracy_errors(entries):
    summary = summarize(read_sweeps(entries))
    with pytest.raises(ValueError, match="baseline arm 'none'.*plain"):
        kept_at_accuracy(summary, LEVELS, baseline_arm="none")
    with pytest.raises(ValueError, match="percentages"):
        kept_at_accuracy(summary, [0.9, 120.0], baseline_arm="plain")


def test_missing_column_error_names_file(entries):
    _, _, path = entries[4]
    pd.read_csv(path).drop(columns=["test_accuracy"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"sparse_seed1\.csv.*test_accuracy"):
        read_sweeps(entries)


def test_empty_file_error_names_file(entries):
    _, _, path = entries[1]
    pd.read_csv(path).iloc[:0].to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"plain_seed1\.csv.*no rows"):
        read_sweeps(entries)
    path.write_text("")
    with pytest.raises(ValueError, match=r"plain_seed1\.csv.*empty"):
        read_sweeps(entries)


def test_duplicate_entry_errors(entries):
    with pytest.raises(ValueError, match="given twice"):
        read_sweeps([*entries, entries[0]])


def test_markdown_contains_numbers(entries):
    summary = summarize(read_sweeps(entries))
    table = kept_at_accuracy(summary, LEVELS, baseline_arm="plain")
    markdown = kept_at_accuracy_markdown(table, baseline_arm="plain")
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| arm"))
    assert "90 %" in header and "99.5 %" in header
    sparse = next(line for line in lines if line.startswith("| sparse"))
    cells = [cell.strip() for cell in sparse.strip("|").split("|")]
    assert cells == ["sparse", "3", "200 (50.0x)", "2,000 (5.0x)", "10,000 (2.0x)", "not reached"]
    plain = next(line for line in lines if line.startswith("| plain"))
    assert "20,000 (1.0x)" in plain
    assert "Criterion" not in markdown  # one criterion: no headings
    both = kept_at_accuracy_markdown(table, criterion=None)
    assert "### Criterion: sensitivity" in both and "### Criterion: magnitude" in both
    assert "10,000 (n/a)" in both  # magnitude: sparse reaches 98 where plain does not
    with pytest.raises(ValueError, match="random"):
        kept_at_accuracy_markdown(table, criterion="random")

    compact = summary_markdown(summary, percentiles=[90.0], criterion="sensitivity")
    assert "[85.00, 90.00]" in compact and "88.00" in compact and "2,000" in compact
    assert "magnitude" not in compact
    with pytest.raises(ValueError, match=r"\['random'\] not in the summary"):
        summary_markdown(summary, percentiles=[90.0], criterion="random")


def test_write_tables_writes_all_files_with_provenance(entries, tmp_path):
    out = tmp_path / "reports" / "tables"
    paths = default_table_paths(out)
    result = write_tables(
        entries,
        **paths,
        levels=LEVELS,
        baseline_arm="plain",
        experiment="toy",
        extra_provenance={"config": {"epochs": 1}},
    )
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0, path
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())

    summary = pd.read_csv(paths["accuracy_csv"])
    assert len(summary) == len(result["summary"]) == 16
    kept = pd.read_csv(paths["kept_csv"])
    sparse90 = kept[
        (kept["arm"] == "sparse") & (kept["criterion"] == "sensitivity") & (kept["level"] == 90)
    ]
    assert sparse90["reduction_vs_baseline"].iloc[0] == pytest.approx(50.0)

    kept_md = paths["kept_md"].read_text()
    assert kept_md.startswith("# toy")
    assert kept_md.index("Criterion: sensitivity") < kept_md.index("Criterion: magnitude")
    assert "200 (50.0x)" in kept_md
    assert "88.00" in paths["accuracy_md"].read_text()

    record = json.loads(paths["provenance_json"].read_text())
    assert record["experiment"] == "toy"
    assert record["arms"] == ["plain", "sparse"]
    assert record["seeds"] == {"plain": [0, 1, 2], "sparse": [0, 1, 2]}
    assert record["baseline_arm"] == "plain"
    assert record["levels"] == LEVELS
    assert record["config"] == {"epochs": 1}
    assert len(record["inputs"]) == 6
    assert all(len(item["sha256"]) == 64 for item in record["inputs"])
    assert "versions" in record and "git_commit" in record and "created" in record


def test_write_tables_unknown_baseline_writes_nothing(entries, tmp_path):
    paths = default_table_paths(tmp_path / "out")
    with pytest.raises(ValueError, match="baseline"):
        write_tables(entries, **paths, levels=LEVELS, baseline_arm="none", experiment="toy")
    assert not any(path.exists() for path in paths.values())
