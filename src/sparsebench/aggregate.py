"""Aggregate pruning sweeps over seeds: accuracy vs kept parameters, and kept at given accuracy.

Inputs are the sweep CSVs written by the prune stage, one per trained network (one experiment,
one arm, one seed; :func:`sweep_files` says where in its prune job's folder), with the columns
``criterion``, ``percentile``, ``kept_total``, one ``kept_<layer>`` column per weight layer and
``test_accuracy`` (percent, 0-100).

Nothing here knows an arm by name: arms are labels given by the caller, kept in the order they
are first seen (or in an explicit ``arm_order``), and the reference arm for the reduction ratio
is a parameter (``baseline_arm``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sparsebench.provenance import (
    atomic_path,
    provenance,
    sha256sum,
    write_json_atomic,
    write_text_atomic,
)

REQUIRED_COLUMNS: tuple[str, ...] = ("criterion", "percentile", "kept_total", "test_accuracy")
"""Columns every sweep CSV must have (plus one ``kept_<layer>`` column per weight layer)."""

DEFAULT_LEVELS: tuple[float, ...] = (90.0, 95.0, 96.0, 97.0, 98.0)
"""Default accuracy levels (percent) of the kept-at-accuracy table."""

DEFAULT_SUMMARY_PERCENTILES: tuple[float, ...] = (
    0.0,
    50.0,
    80.0,
    90.0,
    95.0,
    97.0,
    98.0,
    99.0,
    99.5,
    99.8,
    99.9,
)
"""Percentiles shown in the compact Markdown summary (the CSV has all of them)."""

PERCENTILE_DECIMALS = 6
"""Percentiles are rounded to this many decimals so 0.30000000000000004 and 0.3 group together."""

_KEY = ("arm", "criterion", "percentile")


def sweep_files(sweep_dir: Path | str, seed: int) -> tuple[Path, Path]:
    """Where one seed's sweep (CSV) and its provenance (JSON) lie in its prune job's folder."""
    return Path(sweep_dir) / f"seed{int(seed)}.csv", Path(sweep_dir) / f"seed{int(seed)}.json"


def layer_columns(frame: pd.DataFrame) -> list[str]:
    """The per-layer kept columns (``kept_<layer>``, not ``kept_total``) in their frame order."""
    return [c for c in frame.columns if c.startswith("kept_") and c != "kept_total"]


def read_sweeps(entries: Iterable[tuple[str, int, Path | str]]) -> pd.DataFrame:
    """Read one sweep CSV per ``(arm, seed, path)`` into one long frame with ``arm`` and ``seed``.

    Raises ``ValueError`` naming the file when a CSV is empty or lacks a required column, and
    when the same (arm, seed) is given twice or a file repeats a (criterion, percentile).
    """
    frames = []
    seen: set[tuple[str, int]] = set()
    for arm, seed, path in entries:
        path = Path(path)
        key = (str(arm), int(seed))
        if key in seen:
            raise ValueError(f"arm {arm!r}, seed {seed} given twice (second time: {path})")
        seen.add(key)
        try:
            frame = pd.read_csv(path)
        except pd.errors.EmptyDataError as err:
            raise ValueError(f"sweep file {path} is empty") from err
        missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(
                f"sweep file {path} lacks required column(s) {missing}; "
                f"it has {list(frame.columns)}"
            )
        if frame.empty:
            raise ValueError(f"sweep file {path} has a header but no rows")
        frame["percentile"] = frame["percentile"].astype(float).round(PERCENTILE_DECIMALS)
        frame["criterion"] = frame["criterion"].astype(str)
        duplicated = frame.duplicated(["criterion", "percentile"])
        if duplicated.any():
            first = frame.loc[duplicated, ["criterion", "percentile"]].iloc[0].tolist()
            raise ValueError(f"sweep file {path} repeats (criterion, percentile) {first}")
        frame.insert(0, "seed", key[1])
        frame.insert(0, "arm", key[0])
        frames.append(frame)
    if not frames:
        raise ValueError("no sweep files given")
    return pd.concat(frames, ignore_index=True)


def order_arms(arms: Iterable[str], arm_order: Sequence[str] | None) -> list[str]:
    """Arms in first-seen order, or ``arm_order`` first (must all exist) then any others."""
    seen = list(dict.fromkeys(arms))
    if arm_order is None:
        return seen
    unknown = [a for a in arm_order if a not in seen]
    if unknown:
        raise ValueError(f"arm_order names arm(s) {unknown} that are not in the data ({seen})")
    order = list(dict.fromkeys(arm_order))
    return order + [a for a in seen if a not in order]


def select_criteria(
    frame: pd.DataFrame, criterion: str | Sequence[str] | None, what: str = "table"
) -> list[str]:
    """The criteria asked for (one, several, or None for all of ``frame``'s), checked.

    Raises ``ValueError`` naming any criterion that ``frame`` (``what``, in the message)
    does not have.
    """
    available = list(dict.fromkeys(frame["criterion"]))
    if criterion is None:
        return available
    criteria = [criterion] if isinstance(criterion, str) else list(criterion)
    unknown = [c for c in criteria if c not in available]
    if unknown:
        raise ValueError(f"criterion {unknown} not in the {what} (it has {available})")
    return criteria


def summarize(sweeps: pd.DataFrame, arm_order: Sequence[str] | None = None) -> pd.DataFrame:
    """Per arm, criterion and percentile: accuracy and kept counts over seeds.

    Columns: ``arm``, ``criterion``, ``percentile``, ``accuracy_median``, ``accuracy_min``,
    ``accuracy_max`` (test accuracy in percent over seeds), ``kept_median``, ``kept_min``,
    ``kept_max`` (of ``kept_total``), ``kept_<layer>_median`` for each layer column, and
    ``n_seeds``. Rows are ordered by arm (first seen, or ``arm_order``), criterion (first
    seen) and increasing percentile. Medians of an even number of seeds are the mean of the
    two middle values, so ``kept_median`` can end in .5.
    """
    missing = [c for c in ("arm", "seed", *REQUIRED_COLUMNS) if c not in sweeps.columns]
    if missing:
        raise ValueError(f"sweeps lack column(s) {missing}; use read_sweeps to build them")
    if sweeps.empty:
        raise ValueError("no sweep rows to summarize")
    arms = order_arms(sweeps["arm"], arm_order)
    criteria = list(dict.fromkeys(sweeps["criterion"]))
    layers = layer_columns(sweeps)

    grouped = sweeps.groupby(list(_KEY), sort=False)
    summary = grouped.agg(
        accuracy_median=("test_accuracy", "median"),
        accuracy_min=("test_accuracy", "min"),
        accuracy_max=("test_accuracy", "max"),
        kept_median=("kept_total", "median"),
        kept_min=("kept_total", "min"),
        kept_max=("kept_total", "max"),
        **{f"{c}_median": (c, "median") for c in layers},
        n_seeds=("seed", "nunique"),
    ).reset_index()
    summary["arm"] = pd.Categorical(summary["arm"], categories=arms, ordered=True)
    summary["criterion"] = pd.Categorical(summary["criterion"], categories=criteria, ordered=True)
    summary = summary.sort_values(list(_KEY), kind="stable").reset_index(drop=True)
    summary["arm"] = summary["arm"].astype(str)
    summary["criterion"] = summary["criterion"].astype(str)
    summary["n_seeds"] = summary["n_seeds"].astype(int)
    return summary


def kept_at_accuracy(
    summary: pd.DataFrame, levels: Sequence[float], baseline_arm: str
) -> pd.DataFrame:
    """Per arm, criterion and accuracy level: the fewest kept weights that hold the level.

    For each level (percent), among the percentiles whose ``accuracy_median`` is at least the
    level, the row with the smallest ``kept_median`` (ties: the higher median accuracy). Columns:
    ``arm``, ``criterion``, ``level``, ``reached`` (bool), ``kept_median``, ``kept_min``,
    ``kept_max``, ``percentile``, ``accuracy_median``, ``accuracy_min``, ``accuracy_max``,
    ``n_seeds``, ``baseline_kept`` (the baseline arm's ``kept_median`` at the same criterion
    and level) and ``reduction_vs_baseline`` = ``baseline_kept / kept_median`` (10.0: ten times
    fewer weights than the baseline arm). Unreached levels give NaN; so does the ratio when
    either side is unreached. Rows keep the summary's arm and criterion order, then levels as
    given.
    """
    arms = list(dict.fromkeys(summary["arm"]))
    if baseline_arm not in arms:
        raise ValueError(f"baseline arm {baseline_arm!r} is not among the arms {arms}")
    levels = [float(level) for level in levels]
    if not levels:
        raise ValueError("no accuracy levels given")
    bad = [level for level in levels if not 0.0 <= level <= 100.0]
    if bad:
        raise ValueError(f"accuracy levels are percentages in [0, 100]; got {bad}")

    carried = [
        "kept_median",
        "kept_min",
        "kept_max",
        "percentile",
        "accuracy_median",
        "accuracy_min",
        "accuracy_max",
    ]
    rows: list[dict[str, Any]] = []
    for (arm, criterion), group in summary.groupby(["arm", "criterion"], sort=False):
        n_seeds = int(group["n_seeds"].max())
        for level in levels:
            row: dict[str, Any] = {"arm": arm, "criterion": criterion, "level": level}
            reached = group[group["accuracy_median"] >= level]
            if reached.empty:
                row.update(reached=False, **{c: math.nan for c in carried})
            else:
                best = reached.sort_values(
                    ["kept_median", "accuracy_median"], ascending=[True, False], kind="stable"
                ).iloc[0]
                row.update(reached=True, **{c: float(best[c]) for c in carried})
            row["n_seeds"] = n_seeds
            rows.append(row)
    table = pd.DataFrame(rows)
    baseline = table.loc[table["arm"] == baseline_arm, ["criterion", "level", "kept_median"]]
    baseline = baseline.rename(columns={"kept_median": "baseline_kept"})
    table = table.merge(baseline, on=["criterion", "level"], how="left", sort=False)
    table["reduction_vs_baseline"] = table["baseline_kept"] / table["kept_median"]
    # kept 0 at an accuracy level cannot happen for a real network; keep the ratio finite-or-NaN.
    table.loc[table["kept_median"] <= 0, "reduction_vs_baseline"] = math.nan
    return table


def _format_count(value: float) -> str:
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.1f}"


def _format_level(level: float) -> str:
    return f"{level:g} %"


def kept_at_accuracy_markdown(
    table: pd.DataFrame,
    criterion: str | Sequence[str] | None = "sensitivity",
    baseline_arm: str | None = None,
) -> str:
    """Markdown of a :func:`kept_at_accuracy` table: one row per arm, one column per level.

    Cells read ``26,500 (10.1x)``: the median kept weight count at which the median accuracy
    over seeds first reaches the level, and in parentheses the reduction relative to the
    baseline arm; ``not reached`` when the arm never reaches the level, ``(n/a)`` when the
    baseline does not. ``criterion`` is one criterion, several, or None for all (one table
    per criterion, each under a ``###`` heading when there are several).
    """
    criteria = select_criteria(table, criterion)

    parts = []
    for crit in criteria:
        part = table[table["criterion"] == crit]
        levels = list(dict.fromkeys(part["level"]))
        rows = []
        for arm, group in part.groupby("arm", sort=False):
            by_level = group.set_index("level")
            row = {"arm": arm, "seeds": int(group["n_seeds"].max())}
            for level in levels:
                cell = by_level.loc[level]
                if not bool(cell["reached"]):
                    text = "not reached"
                else:
                    ratio = cell["reduction_vs_baseline"]
                    ratio_text = "n/a" if pd.isna(ratio) else f"{ratio:.1f}x"
                    text = f"{_format_count(cell['kept_median'])} ({ratio_text})"
                row[_format_level(level)] = text
            rows.append(row)
        frame = pd.DataFrame(rows)
        markdown = frame.to_markdown(
            index=False,
            disable_numparse=True,
            colalign=("left", *("right",) * (frame.shape[1] - 1)),
        )
        if len(criteria) > 1:
            markdown = f"### Criterion: {crit}\n\n{markdown}"
        parts.append(markdown)
    note = (
        "Cells: median kept weights (biases not counted) at the sparsest percentile whose "
        "median test accuracy over seeds reaches the level"
    )
    note += (
        f"; in parentheses the reduction relative to `{baseline_arm}` "
        "(its kept count divided by the arm's)."
        if baseline_arm
        else "; in parentheses the reduction relative to the baseline arm."
    )
    return "\n\n".join(parts) + "\n\n" + note + "\n"


def summary_markdown(
    summary: pd.DataFrame,
    percentiles: Sequence[float] = DEFAULT_SUMMARY_PERCENTILES,
    criterion: str | Sequence[str] | None = None,
) -> str:
    """A compact Markdown of :func:`summarize` at selected percentiles, one table per criterion.

    Columns: arm, pruning percentile, median kept weights, test accuracy median and its
    [min, max] over seeds, seeds. Percentiles absent from the data are skipped.
    """
    wanted = {round(float(p), PERCENTILE_DECIMALS) for p in percentiles}
    criteria = select_criteria(summary, criterion, "summary")
    parts = []
    for crit in criteria:
        part = summary[(summary["criterion"] == crit) & summary["percentile"].isin(wanted)]
        shown = pd.DataFrame(
            {
                "arm": part["arm"],
                "percentile": part["percentile"].map(lambda p: f"{p:g}"),
                "kept (median)": part["kept_median"].map(_format_count),
                "accuracy % (median)": part["accuracy_median"].map(lambda a: f"{a:.2f}"),
                "accuracy % [min, max]": [
                    f"[{lo:.2f}, {hi:.2f}]"
                    for lo, hi in zip(part["accuracy_min"], part["accuracy_max"], strict=True)
                ],
                "seeds": part["n_seeds"].astype(int),
            }
        )
        markdown = shown.to_markdown(
            index=False,
            disable_numparse=True,
            colalign=("left", "right", "right", "right", "right", "right"),
        )
        parts.append(f"### Criterion: {crit}\n\n{markdown}")
    return "\n\n".join(parts) + "\n"


TABLE_FILES: dict[str, str] = {
    "accuracy_csv": "accuracy_vs_kept.csv",
    "accuracy_md": "accuracy_vs_kept.md",
    "kept_csv": "kept_at_accuracy.csv",
    "kept_md": "kept_at_accuracy.md",
    "provenance_json": "tables.json",
}
"""Keyword of :func:`write_tables` -> default file name (see :func:`default_table_paths`)."""


def default_table_paths(out_dir: Path | str) -> dict[str, Path]:
    """The output paths of :func:`write_tables` under ``out_dir``, as keyword arguments."""
    return {key: Path(out_dir) / name for key, name in TABLE_FILES.items()}


def write_tables(
    entries: Iterable[tuple[str, int, Path | str]],
    *,
    accuracy_csv: Path | str,
    accuracy_md: Path | str,
    kept_csv: Path | str,
    kept_md: Path | str,
    provenance_json: Path | str,
    levels: Sequence[float] = DEFAULT_LEVELS,
    baseline_arm: str,
    experiment: str,
    arm_order: Sequence[str] | None = None,
    criterion: str | None = "sensitivity",
    extra_provenance: Mapping[str, Any] | None = None,
) -> dict[str, pd.DataFrame]:
    """Read the sweeps of one experiment and write its tables, each file atomically.

    - ``accuracy_csv``: :func:`summarize` (every arm, criterion and percentile);
    - ``accuracy_md``: :func:`summary_markdown` (selected percentiles);
    - ``kept_csv``: :func:`kept_at_accuracy` (every arm, criterion and level);
    - ``kept_md``: :func:`kept_at_accuracy_markdown`, ``criterion`` first (None: all), then the
      other criteria under their own headings;
    - ``provenance_json``: experiment, arms, seeds per arm, levels, baseline, the inputs with
      their SHA-256, the outputs, and :func:`sparsebench.provenance.provenance` fields.

    Returns ``{"summary": ..., "kept_at_accuracy": ...}``. Use :func:`default_table_paths` for
    the default file names under one folder.
    """
    entries = [(str(arm), int(seed), Path(path)) for arm, seed, path in entries]
    sweeps = read_sweeps(entries)
    summary = summarize(sweeps, arm_order=arm_order)
    kept = kept_at_accuracy(summary, levels, baseline_arm)
    arms = list(dict.fromkeys(summary["arm"]))
    criteria = list(dict.fromkeys(summary["criterion"]))
    if criterion is not None and criterion not in criteria:
        raise ValueError(f"criterion {criterion!r} not in the sweeps (they have {criteria})")
    ordered = (
        criteria if criterion is None else [criterion, *(c for c in criteria if c != criterion)]
    )

    with atomic_path(accuracy_csv) as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(kept_csv) as tmp:
        kept.to_csv(tmp, index=False)

    title = f"# {experiment}: "
    write_text_atomic(
        accuracy_md,
        title
        + "test accuracy vs kept weights (over seeds)\n\n"
        + summary_markdown(summary, criterion=ordered),
    )
    write_text_atomic(
        kept_md,
        title
        + "weights kept at given test accuracy\n\n"
        + kept_at_accuracy_markdown(kept, criterion=ordered, baseline_arm=baseline_arm),
    )

    seeds = {
        arm: sorted(int(s) for s in sweeps.loc[sweeps["arm"] == arm, "seed"].unique())
        for arm in arms
    }
    record = provenance(
        experiment=experiment,
        arms=arms,
        seeds=seeds,
        criteria=criteria,
        levels=[float(level) for level in levels],
        baseline_arm=baseline_arm,
        inputs=[
            {"arm": arm, "seed": seed, "path": str(path), "sha256": sha256sum(path)}
            for arm, seed, path in entries
        ],
        outputs={
            "accuracy_csv": str(accuracy_csv),
            "accuracy_md": str(accuracy_md),
            "kept_csv": str(kept_csv),
            "kept_md": str(kept_md),
        },
        **dict(extra_provenance or {}),
    )
    write_json_atomic(provenance_json, record)
    return {"summary": summary, "kept_at_accuracy": kept}
