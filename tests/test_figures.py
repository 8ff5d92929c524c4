"""Figures: each writes a valid PNG and SVG, and figure 1 reports H_C in the paper's order."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sparsebench.aggregate import summarize
from sparsebench.figures import (
    plot_accuracy_vs_kept,
    plot_entropy_matrices,
    plot_weight_matrices,
    weight_matrices,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 2000) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) >= min_bytes, (path, len(data))
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width > 100 and height > 100
    return width, height


def assert_svg(path: Path) -> None:
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg"), root.tag
    assert len(list(root.iter())) > 10


def assert_only(directory: Path, names: set[str]) -> None:
    """The outputs and nothing else (no temporary files left behind)."""
    assert {p.name for p in directory.iterdir()} == names


def test_entropy_matrices_values_and_files(tmp_path):
    png, svg = tmp_path / "entropy.png", tmp_path / "entropy.svg"
    values = plot_entropy_matrices(png, svg, seed=0)
    assert_png(png)
    assert_svg(svg)
    assert_only(tmp_path, {"entropy.png", "entropy.svg"})
    scattered, block = values["scattered"], values["block"]
    assert scattered["H_C"] > block["H_C"]  # the paper's Figure 1
    for record in (scattered, block):  # equal Lp norms: 1024 ones each
        assert record["L1"] == pytest.approx(1024.0)
        assert record["L2"] == pytest.approx(32.0)


def small_state_dict(seed: int, zero_columns: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    fc1 = torch.randn(8, 12, generator=gen)
    fc1[:, :zero_columns] = 0.0
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=gen),
        "conv.bias": torch.zeros(4),
        "norm.weight": torch.ones(4),  # 1-D: not a matrix
        "fc1.weight": fc1,
        "fc1.bias": torch.zeros(8),
    }


def test_weight_matrices_selects_and_reshapes():
    matrices = weight_matrices(small_state_dict(0))
    assert list(matrices) == ["conv", "fc1"]
    assert matrices["conv"].shape == (4, 18)
    assert matrices["fc1"].shape == (8, 12)


def test_weight_matrices_figure(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(small_state_dict(0), path)
    sparse = small_state_dict(1, zero_columns=6)
    png, svg = tmp_path / "out" / "weights.png", tmp_path / "out" / "weights.svg"
    records = plot_weight_matrices({"plain": path, "sparse": sparse}, png, svg)
    assert_png(png)
    assert_svg(svg)
    assert_only(tmp_path / "out", {"weights.png", "weights.svg"})
    assert [(r["arm"], r["layer"]) for r in records] == [
        ("plain", "conv"),
        ("plain", "fc1"),
        ("sparse", "conv"),
        ("sparse", "fc1"),
    ]
    sparse_fc1 = records[3]
    assert sparse_fc1["shape"] == (8, 12)
    assert sparse_fc1["zero_fraction"] == pytest.approx(0.5)
    expected_scale = np.percentile(np.abs(sparse["fc1.weight"].numpy()), 99.0)
    assert sparse_fc1["scale"] == pytest.approx(expected_scale)
    assert records[0]["zero_fraction"] == 0.0

    one = plot_weight_matrices({"plain": path, "sparse": sparse}, png, svg, layer="fc1.weight")
    assert [(r["arm"], r["layer"]) for r in one] == [("plain", "fc1"), ("sparse", "fc1")]
    with pytest.raises(ValueError, match="fc9"):
        plot_weight_matrices({"plain": path}, png, svg, layer="fc9")


def toy_summary() -> pd.DataFrame:
    rows = []
    total = 1000
    for k, arm in enumerate(["plain", "sparse", "both"]):
        for seed in range(3):
            for criterion in ("sensitivity", "random"):
                for percentile in (0.0, 50.0, 90.0, 99.0, 100.0):
                    kept = round(total * (1 - percentile / 100))
                    accuracy = 10 + 88 * (kept / total) ** (0.1 / (k + 1)) + 0.3 * seed
                    rows.append(
                        {
                            "arm": arm,
                            "seed": seed,
                            "criterion": criterion,
                            "percentile": percentile,
                            "kept_total": kept,
                            "test_accuracy": accuracy,
                        }
                    )
    return summarize(pd.DataFrame(rows))


def test_accuracy_vs_kept_figure(tmp_path):
    summary = toy_summary()
    png, svg = tmp_path / "acc.png", tmp_path / "acc.svg"
    arms = plot_accuracy_vs_kept(summary, png, svg, levels=[95.0])
    assert arms == ["plain", "sparse", "both"]
    width, height = assert_png(png)
    assert_svg(svg)
    assert_only(tmp_path, {"acc.png", "acc.svg"})

    # every criterion, one row each: taller figure; explicit arm order
    arms = plot_accuracy_vs_kept(
        summary, png, svg, criterion=None, arm_order=["both", "sparse", "plain"]
    )
    assert arms == ["both", "sparse", "plain"]
    _, taller = assert_png(png)
    assert taller > height
    with pytest.raises(ValueError, match="magnitude"):
        plot_accuracy_vs_kept(summary, png, svg, criterion="magnitude")
    with pytest.raises(ValueError, match="ghost"):
        plot_accuracy_vs_kept(summary, png, svg, arm_order=["ghost"])
