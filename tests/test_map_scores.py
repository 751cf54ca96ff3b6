"""Swept maps scored per volume with the baselines beside the model, on synthetic maps whose
scores are known by construction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xpression.evaluation.baselines import TrainingSpots, baseline_predictions
from xpression.evaluation.maps import score_volume
from xpression.inference.grid import OutputGrid

NAMES = ["a", "b", "c"]


def _field(points: np.ndarray) -> np.ndarray:
    """Compositions that depend on (y, x) only."""
    y, x = points[:, 1], points[:, 2]
    raw = np.stack([1.0 + np.sin(y / 120.0), 1.0 + np.cos(x / 90.0), 0.3 + 0 * x], axis=1)
    return raw / raw.sum(1, keepdims=True)


@pytest.fixture
def grid() -> OutputGrid:
    return OutputGrid(origin_vox=(2, 2, 2), step_vox=(5, 4, 4), shape=(12, 20, 20), voxel_size_um=(6.4, 6.4, 6.4))


def _maps(grid: OutputGrid, fn) -> np.ndarray:
    z, y, x = (grid.axis_um(a) for a in range(3))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    vals = fn(np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1)).T.reshape(3, *zz.shape).astype(np.float32)
    vals[:, :, :2] = np.nan  # outside the tissue mask
    return vals


def _spots(grid: OutputGrid, z_um: float) -> TrainingSpots:
    yy, xx = np.meshgrid(grid.axis_um(1), grid.axis_um(2), indexing="ij")
    pts = np.column_stack([np.full(yy.size, z_um), yy.ravel(), xx.ravel()])
    table = pd.DataFrame({"split": "train", "section_id": "v_s0", "volume_id": "v", "z_um": pts[:, 0],
                          "y_um": pts[:, 1], "x_um": pts[:, 2]})
    for j, n in enumerate(NAMES):
        table[f"true/{n}"] = _field(pts)[:, j]
    return TrainingSpots.from_table(table, [f"true/{n}" for n in NAMES])


def test_maps_constant_along_z_score_one_and_so_does_extrusion(grid):
    z0 = float(grid.axis_um(0)[3])
    train = _spots(grid, z0)
    rows = score_volume(_maps(grid, _field), grid, NAMES, _field, NAMES, "v", "composition", section_z_um=z0,
                        distances_um=[64.0, 128.0, 10_000.0], baselines_fn=lambda p: baseline_predictions(train, "v", p))
    by = {(r["where"], r["distance_um"], r["predictor"]): r for r in rows}
    assert {w for w, _, _ in by} == {"section plane", "plane"}
    assert {d for w, d, _ in by if w == "plane"} == {64.0, 128.0}  # 10 mm is outside the volume
    for d in (0.0, 64.0, 128.0):
        where = "section plane" if d == 0.0 else "plane"
        for predictor in ("model", "extrusion"):
            assert by[(where, d, predictor)]["pearson_mean"] == pytest.approx(1.0)
            assert by[(where, d, predictor)]["r2_mean"] == pytest.approx(1.0, abs=1e-6)
        assert np.isnan(by[(where, d, "animal_mean")]["pearson_mean"])  # constant within the volume
        assert by[(where, d, "animal_mean")]["r2_mean"] < 0.01
    assert by[("plane", 64.0, "model")]["n"] == 2 * 20 * 18  # both sides, tissue points only


def test_volume_without_a_section_and_the_point_cap(grid):
    maps = _maps(grid, _field)
    rows = score_volume(maps, grid, NAMES, _field, NAMES, "w", "composition", max_points=500)
    assert {r["where"] for r in rows} == {"volume"} and {r["predictor"] for r in rows} == {"model"}
    total = 12 * 20 * 18
    assert 300 < rows[0]["n"] < 700 < total  # a seeded subsample of about max_points
    again = score_volume(maps, grid, NAMES, _field, NAMES, "w", "composition", max_points=500)
    assert again[0]["n"] == rows[0]["n"] and again[0]["pearson_mean"] == rows[0]["pearson_mean"]
