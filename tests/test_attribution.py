"""Attributions: integrated gradients and occlusion find exactly the voxels a hand-built network
reads, and the command writes figures for spots and 3D points of a run on the tiny cohort."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from xpression.evaluation.attribute import main, parse_point, read_patch
from xpression.evaluation.attribution import integrated_gradients, occlusion
from tests._inference_models import two_volume_cohort

torch.set_num_threads(1)
SHAPE = (5, 9, 9)


class KnownVoxelNet(nn.Module):
    """Output t = g_t(sum of w_v x_v over the voxel subset S_t): depends on S_t only.

    Output 0 is linear (g = identity); output 1 is a softplus of its weighted sum, so its
    gradient changes along the integration path; output 2 is a product of two voxels."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(3)
        self.sets = [[(2, 4, 4), (1, 0, 8), (4, 6, 2)], [(2, 2, 2), (3, 7, 7), (0, 4, 5), (2, 4, 4)], [(1, 1, 1), (3, 5, 0)]]
        self.weights = [torch.tensor(rng.uniform(0.5, 2.0, len(s)) * rng.choice([-1, 1], len(s)), dtype=torch.float32)
                        for s in self.sets]

    def _picked(self, x: torch.Tensor, t: int) -> torch.Tensor:
        idx = self.sets[t]
        return torch.stack([x[:, 0, z, y, w] for z, y, w in idx], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = (self._picked(x, 0) * self.weights[0]).sum(dim=1)
        b = nn.functional.softplus(3.0 * (self._picked(x, 1) * self.weights[1]).sum(dim=1))
        c = self._picked(x, 2).prod(dim=1)
        return torch.stack([a, b, c], dim=1)


def _support(values: np.ndarray, rel: float = 1e-6) -> set[tuple[int, int, int]]:
    return {tuple(int(i) for i in v) for v in np.argwhere(np.abs(values) > rel * max(np.abs(values).max(), 1e-30))}


@pytest.fixture
def patch() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.2, 1.0, SHAPE).astype(np.float32)


def test_integrated_gradients_find_exactly_the_known_voxels_and_are_complete(patch):
    net = KnownVoxelNet()
    att = integrated_gradients(net, patch, np.zeros(SHAPE, np.float32), steps=64)
    for t, voxels in enumerate(net.sets):
        assert _support(att.values[t]) == set(voxels)
    # linear output: the attributions are w_v x_v exactly
    expected = {v: float(w) * float(patch[v]) for v, w in zip(net.sets[0], net.weights[0])}
    for v, e in expected.items():
        assert att.values[0][v] == pytest.approx(e, rel=1e-5)
    # completeness: sum = f(x) - f(baseline), for the curved outputs within the quadrature error
    with torch.no_grad():
        fx = net(torch.from_numpy(patch)[None, None])[0].numpy()
        fb = net(torch.zeros((1, 1) + SHAPE))[0].numpy()
    np.testing.assert_allclose(att.output, fx, rtol=1e-6)
    np.testing.assert_allclose(att.values.reshape(3, -1).sum(axis=1), fx - fb, rtol=2e-3, atol=1e-5)
    assert np.all(np.abs(att.delta) <= 2e-3 * np.abs(fx - fb) + 1e-5)
    # fewer steps: the softplus output's gap grows, the linear one stays exact
    coarse = integrated_gradients(net, patch, np.zeros(SHAPE, np.float32), steps=2, targets=[0, 1])
    assert abs(coarse.delta[0]) < 1e-5 and abs(coarse.delta[1]) > abs(att.delta[1])


def test_occlusion_with_one_voxel_cubes_finds_the_same_voxels(patch):
    net = KnownVoxelNet()
    att = occlusion(net, patch, np.zeros(SHAPE, np.float32), cube=(1, 1, 1))
    for t, voxels in enumerate(net.sets):
        assert _support(att.values[t]) == set(voxels)
    for v, w in zip(net.sets[0], net.weights[0]):  # linear: removing a voxel drops w_v x_v
        assert att.values[0][v] == pytest.approx(float(w) * float(patch[v]), rel=1e-5)
    # a 3-voxel cube spreads each drop over the cubes covering the voxel; every voxel is covered
    big = occlusion(net, patch, np.zeros(SHAPE, np.float32), cube=(3, 3, 3), stride=(2, 2, 2), targets=[0])
    assert big.values.shape == (1,) + SHAPE
    for v in net.sets[0]:
        assert abs(big.values[0][v]) > 0


def test_points_parse_and_patches_refuse_the_edge():
    assert parse_point("12.5, 300,4e2") == (12.5, 300.0, 400.0)
    assert parse_point("ACGTACGTACGTACGT-1") == "ACGTACGTACGTACGT-1"
    assert parse_point("infected_0_s0:ACGT-1") == "infected_0_s0:ACGT-1"

    class Vol:
        shape = (10, 40, 40)
        voxel_size_um = (2.0, 5.0, 5.0)
        origin_um = (0.0, 0.0, 0.0)

        def __getitem__(self, key):
            return np.arange(10 * 40 * 40, dtype=np.float32).reshape(self.shape)[key]

    p, centre = read_patch(Vol(), np.array([10.0, 100.0, 100.0]), (5, 9, 9), lambda b: b / 16000.0)
    assert p.shape == (5, 9, 9) and centre.tolist() == [5, 20, 20]
    assert p[2, 4, 4] == pytest.approx((5 * 1600 + 20 * 40 + 20) / 16000.0)
    with pytest.raises(ValueError, match="reaches outside the volume"):
        read_patch(Vol(), np.array([2.0, 100.0, 100.0]), (5, 9, 9), lambda b: b)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return two_volume_cohort(tmp_path_factory.mktemp("phantom") / "c")


def _assert_progress_lines(err: str, spot: str) -> None:
    """One progress line as each point and method starts (a forest's take seconds each), the
    first of ``spot``, the last "k of k"."""
    steps = [line for line in err.splitlines() if line.startswith("attributing ")]
    assert steps and [line.split(": ")[1].split(" (")[0] for line in steps[:2]] == ["ig", "occlusion"]
    last = steps[-1].split(" (")[1].split(",")[0].split(" of ")
    assert spot in steps[0] and last[0] == last[1]  # the last step is "k of k"


def test_command_on_a_run_of_the_tiny_cohort(cohort, tmp_path, capsys):
    import anndata as ad

    from tests._inference_models import make_run
    from xpression.data.manifest import load_manifest

    run = make_run(tmp_path / "run", cohort)
    section = load_manifest(cohort).sections[0]
    a = ad.read_h5ad(section.adata)
    z0 = float(a.obsm["ct_position_um"][:, 0].mean())
    centre = np.median(a.obsm["ct_position_um"], axis=0)
    spot = str(a.obs_names[int(np.argmin(np.linalg.norm(a.obsm["ct_position_um"] - centre, axis=1)))])
    out = tmp_path / "att"
    point = f"{z0:.1f},250,250"
    code = main([str(run), "--points", spot, point, "--volume", section.volume_id, "--out", str(out), "--steps", "8",
                 "--cube-um", "19.2", "--targets", "alveolar", "airway"])
    err = capsys.readouterr().err
    assert code == 0, err
    _assert_progress_lines(err, spot)
    table = pd.read_csv(out / "attributions.csv")
    assert set(table["method"]) == {"ig", "occlusion"} and set(table["target"]) == {"alveolar", "airway"}
    assert len(table) == 2 * 2 * 2 and table["spot"].dropna().unique().tolist() == [spot]
    ig = table[table["method"] == "ig"]
    # completeness on the untrained cnn3d (softmax outputs): within 5 % of |f(x) - f(b)| with 8 steps
    assert np.all(np.abs(ig["completeness_gap"]) <= 0.05 * np.abs(ig["f_x"] - ig["f_baseline"]) + 1e-4)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 4 and any(spot in p for p in pngs)
    saved = np.load(next(out.glob(f"*{spot}*.npz")))
    assert saved["patch"].shape == (5, 33, 33) and saved["ig"].shape == (2, 5, 33, 33)
    assert 0.0 <= saved["patch"].min() and saved["patch"].max() <= 1.0 and saved["patch"].std() > 0
    # nothing is overwritten; unknown spots and outside points are one-line errors
    assert main([str(run), "--points", spot, "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main([str(run), "--points", "NOTASPOT-1", "--out", str(tmp_path / "x")]) == 1
    assert "neither a position" in capsys.readouterr().err
    assert main([str(run), "--points", "0,0,0", "--volume", section.volume_id, "--out", str(tmp_path / "y")]) == 1
    assert "reaches outside the volume" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_two_view_network_is_attributed_one_view_at_a_time(patch):
    """Outputs that read known voxels of the context view (channel 1) only: its attributions
    find them, the patch's are zero; and the reverse."""
    from xpression.evaluation.attribute import with_view_fixed

    known = KnownVoxelNet()

    class TwoViews(nn.Module):
        def __init__(self, channel: int) -> None:
            super().__init__()
            self.channel = channel

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return known(x[:, self.channel : self.channel + 1])

    view = np.random.default_rng(5).uniform(0.2, 1.0, SHAPE).astype(np.float32)
    zero = np.zeros(SHAPE, np.float32)
    for channel, (mine, other) in enumerate([(patch, view), (view, patch)]):
        net = TwoViews(channel)
        # attribute channel `channel`, the other view held
        att = integrated_gradients(with_view_fixed(net, other, 1 - channel), mine, zero, steps=64)
        for t, voxels in enumerate(known.sets):
            assert _support(att.values[t]) == set(voxels)
        held = integrated_gradients(with_view_fixed(net, mine, channel), other, zero, steps=16)
        assert np.abs(held.values).max() == 0.0  # the view the outputs do not read gets nothing


def test_command_on_a_multiscale_run(cohort, tmp_path, capsys):
    import anndata as ad

    from tests._inference_models import make_run
    from xpression.data.manifest import load_manifest

    run = make_run(tmp_path / "run", cohort, context_um=[100.0, 600.0, 600.0])
    section = load_manifest(cohort).sections[0]
    a = ad.read_h5ad(section.adata)
    centre = np.median(a.obsm["ct_position_um"], axis=0)
    spot = str(a.obs_names[int(np.argmin(np.linalg.norm(a.obsm["ct_position_um"] - centre, axis=1)))])
    out = tmp_path / "att"
    code = main([str(run), "--points", spot, "--out", str(out), "--steps", "8", "--cube-um", "19.2",
                 "--targets", "alveolar", "airway"])
    err = capsys.readouterr().err
    assert code == 0, err
    _assert_progress_lines(err, spot)
    table = pd.read_csv(out / "attributions.csv")
    assert sorted(set(table["view"])) == ["context", "patch"] and len(table) == 2 * 2 * 2
    ig = table[table["method"] == "ig"]
    assert np.all(np.abs(ig["completeness_gap"]) <= 0.05 * np.abs(ig["f_x"] - ig["f_baseline"]) + 1e-4)
    # both views start from the same f(patch, view)
    fx = ig.pivot(index="target", columns="view", values="f_x")
    np.testing.assert_allclose(fx["patch"], fx["context"], atol=1e-6)
    label = next(out.glob("*.npz")).stem
    assert spot in label and sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{label}_{m}{v}.png" for m in ("ig", "occlusion") for v in ("", "_context"))
    saved = np.load(next(out.glob("*.npz")))
    assert saved["context"].shape == (5, 33, 33) and saved["context_ig"].shape == (2, 5, 33, 33)
    assert saved["context"].std() > 0 and not np.array_equal(saved["context"], saved["patch"])


def test_a_fitted_model_is_attributed_by_occlusion_and_ig_on_it_is_one_line():
    from xpression.evaluation.attribute import AttributionError, _methods_for
    from xpression.models.closed_form import ClosedFormModel

    fitted = ClosedFormModel({"names": ["a", "b"], "kind": "composition"}, SHAPE)
    assert _methods_for(KnownVoxelNet(), None) == ["ig", "occlusion"]
    assert _methods_for(fitted, None) == ["occlusion"]
    assert _methods_for(fitted, ["occlusion"]) == ["occlusion"]
    with pytest.raises(AttributionError, match="--methods ig: ClosedFormModel has no gradients .*use --methods occlusion"):
        _methods_for(fitted, ["ig", "occlusion"])
