"""docs/design.md "Extending": the target kind and map sink written there, run as they are
written, are picked up by the head, the losses, the label checks, the metrics and infer.py's
exports."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from xpression.data.geometry import DataError

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"


def _example(filename: str) -> str:
    """The python block that follows ``filename`` in docs/design.md."""
    text = DESIGN.read_text()
    at = text.index(filename)
    return re.search(r"```python\n(.*?)```", text[at:], re.S).group(1)


@pytest.fixture(scope="module")
def fraction_kind():
    from xpression.data.kinds import KINDS

    if "fraction_positive" not in KINDS:
        exec(compile(_example("xpression/data/kinds/fraction_positive.py"), "fraction_positive.py", "exec"), {})
    return KINDS.get("fraction_positive")


def test_a_new_target_kind_reaches_head_loss_checks_and_metrics(fraction_kind):
    from xpression.data.targets import TargetSpec
    from xpression.metrics import regression_metrics
    from xpression.models.heads import Head
    from xpression.models.losses import build_loss

    spec = TargetSpec(["a", "b"], "fraction_positive")
    head = Head(8, 2, spec.kind)
    out = head.activate(head(torch.randn(4, 8)))
    assert out.shape == (4, 2) and bool(((out > 0) & (out < 1)).all())
    loss = build_loss("auto", spec.kind)
    assert loss.name == "mse" and float(loss(torch.zeros(3, 2), torch.full((3, 2), 0.5))) == pytest.approx(0.0)
    with pytest.raises(DataError, match="fractions cannot be negative"):
        fraction_kind.check_declared(np.array([[0.2, -0.5]]), "s.h5ad", "target 'x'")
    metrics = regression_metrics(np.array([[0.1, 0.2], [0.3, 0.5], [0.6, 0.1]]),
                                 np.array([[0.2, 0.1], [0.3, 0.6], [0.5, 0.2]]), ["a", "b"], kind=spec.kind)
    assert metrics["pearson/a"] > 0.9 and "jsd_mean" not in metrics  # no composition metrics for this kind


def test_an_unknown_kind_names_the_registered_ones():
    from xpression.data.targets import TargetSpec

    with pytest.raises(ValueError, match=r"TargetSpec.kind must be one of \[.*'composition', 'counts'.*\], got 'proportions'"):
        TargetSpec(["a"], "proportions")


def test_the_documented_sink_writes_the_maps(tmp_path):
    from tests._inference_models import TinyValidNet
    from xpression.data.volume import open_volume
    from xpression.inference.predictor import Predictor
    from xpression.inference.sinks import SINKS, write_exports
    from xpression.inference.volume_sweep import SweepSettings, infer_volume
    from xpression.inference.writers import read_maps

    if "npy" not in SINKS:
        exec(compile(_example("xpression/inference/sinks/npy.py"), "npy.py", "exec"), {})
    np.save(tmp_path / "v.npy", np.random.default_rng(0).integers(0, 255, (8, 30, 30), dtype=np.uint8))
    volume = open_volume(tmp_path / "v.npy", voxel_size_um=6.4)
    res = infer_volume(volume, Predictor(TinyValidNet(), device="cpu"), tmp_path / "m.ome.zarr",
                       SweepSettings(spacing_um=12.8, tile_vox=(4, 16, 16), progress=False),
                       normalize=lambda b: b.astype(np.float32) / 255.0)
    assert write_exports(["npy"], res.path, tmp_path) == {"npy": tmp_path / "maps.npy"}
    np.testing.assert_array_equal(np.load(tmp_path / "maps.npy"), read_maps(res.path)[0][:].astype(np.float32))
