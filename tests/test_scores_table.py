"""The printed score table: its legend names the columns it shows, and only those."""

from xpression.evaluation.scores import scores_table


def _rows(predictors):
    return [{"volume_id": "mock_0", "condition": "mock", "where": "test spots", "distance_um": float("nan"),
             "predictor": p, "pearson_mean": 0.5, "r2_mean": 0.2, "n": 40} for p in predictors]


def test_the_legend_names_only_the_columns_shown():
    table = scores_table(_rows(["model", "extrusion", "knn", "animal_mean"]), "t")
    headers = [c.header for c in table.columns]
    assert "extr. r" in headers and "kNN r" in headers and not any("all-spot" in h for h in headers)
    assert "extr.: 2D extrusion" in table.caption and "kNN: mean of the" in table.caption
    assert "all-spot" not in table.caption and "ridge:" not in table.caption
    table = scores_table(_rows(["model", "ridge", "section_extrusion"]), "t")
    assert "all-spot extr. r" in [c.header for c in table.columns]
    assert "ridge: features + ridge on the same patch" in table.caption and "all-spot extr.: extrusion" in table.caption
    assert "kNN:" not in table.caption
