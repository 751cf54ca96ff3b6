"""The sweep's figures: each uncertainty row names its own channel and unit on its colour bar."""

import numpy as np
from matplotlib.image import imread

from xpression.inference.figures import plot_orthoviews
from xpression.inference.grid import OutputGrid
from xpression.inference.pipeline import trust_label


def test_each_uncertainty_channel_gets_its_own_label():
    label = trust_label({"ood_channel": "ood", "ood": {"method": "mahalanobis"}, "calibration": {"scale": [2.0]}})
    assert label("airway_sd") == "airway: SD (calibrated)\n(target units)"
    assert label("ood") == "ood: mahalanobis distance\nfrom the training spots (training spreads)"
    plain = trust_label({"ood_channel": None})
    assert plain("airway_sd") == "airway: SD\n(target units)"


def test_orthoviews_take_a_label_per_channel(tmp_path, monkeypatch):
    import matplotlib.figure

    grid = OutputGrid((0, 0, 0), (1, 1, 1), (4, 6, 8), (10.0, 10.0, 10.0))
    maps = np.random.default_rng(0).random((2, 4, 6, 8)).astype(np.float32)
    labels: list[str] = []
    real = matplotlib.figure.Figure.colorbar

    def colorbar(self, *args, **kwargs):
        bar = real(self, *args, **kwargs)
        set_label = bar.set_label
        bar.set_label = lambda text, **kw: (labels.append(text), set_label(text, **kw))[1]
        return bar

    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", colorbar)
    out = plot_orthoviews(maps, grid, ["a_sd", "ood"], tmp_path / "u.png", value_label=lambda n: f"<{n}>",
                          section_z_um=15.0)
    assert labels == ["<a_sd>", "<ood>"] and imread(out).shape[0] > 300
    plot_orthoviews(maps, grid, ["a", "b"], tmp_path / "m.png", value_label="predicted share")
    assert labels[2:] == ["a: predicted share", "b: predicted share"]


def test_fitted_programs_are_named_with_the_program_they_were_matched_to():
    from xpression.inference.pipeline import matched_names

    names = ["program_0", "program_1", "airway"]
    assert matched_names(names, {"program_0": "immune", "program_1": "alveolar", "airway": "airway"}) == [
        "program_0 (~ immune)", "program_1 (~ alveolar)", "airway"]
    assert matched_names(names, None) == names


def test_the_run_scores_figure_says_when_the_planes_have_no_baselines(tmp_path, monkeypatch):
    import matplotlib.figure
    import pandas as pd

    from xpression.evaluation.figures import plot_run_scores

    titles: list[str] = []
    real = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **kw: (titles.append(t), real(self, t, **kw))[1])

    def rows(plane_predictors):
        spots = [{"volume_id": "v", "where": "test spots", "distance_um": float("nan"), "predictor": p,
                  "pearson_mean": 0.5, "r2_mean": 0.1} for p in ("model", "extrusion")]
        return pd.DataFrame(spots + [{"volume_id": "v", "where": "plane", "distance_um": 100.0, "predictor": p,
                                      "pearson_mean": 0.4, "r2_mean": 0.0} for p in plane_predictors])

    plot_run_scores(rows(["model"]), tmp_path / "a.png")
    plot_run_scores(rows(["model", "extrusion"]), tmp_path / "b.png")
    assert titles[0].endswith("no baselines at the planes: the run's spot table lacks the training labels they are fitted on")
    assert "no baselines" not in titles[1]
