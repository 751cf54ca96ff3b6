"""Dense mode of a multi-scale model: the fine encoder slides over the tile, the context encoder
over one sub-sampled block per residue class of its view's stride, and the answers equal the
per-patch ones (backbone, sweep, infer.py, ensembles); old checkpoints gain the mode."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._inference_models import infer_config, make_run, two_volume_cohort
from xpression.inference.pipeline import infer
from xpression.inference.predictor import InferenceError, Predictor
from xpression.inference.writers import read_maps
from xpression.models.backbones import create_backbone

torch.set_num_threads(1)
CNN = {"name": "cnn3d", "widths": [4, 8, 8], "kernel_size": [[3, 4, 4], [3, 4, 4], [1, 3, 3]], "pool": [1, 2, 2],
       "padding": "valid", "dense_width": 8, "dropout": 0.0}
RESNET = {"name": "resnet3d", "arch": "mc3", "widths": [4, 8], "layers": [1, 1], "strides": [[1, 1, 1], [1, 2, 2]],
          "stem_kernel": [1, 5, 5], "stem_stride": [1, 2, 2], "padding": "valid"}
CONTEXT_UM = [100.0, 600.0, 600.0]  # stride (3, 3, 3) around the 5 x 33 x 33 voxel patch at 6.4 um


def _per_patch(model, x, context, k, step):
    """The features of every dense output computed one patch (and view) at a time."""
    p = model.patch_shape
    span = [(a - 1) * b + 1 for a, b in zip(p, k)]
    q = [s * m for s, m in zip(model.output_stride, step)]
    n = [(s - a) // qq + 1 for s, a, qq in zip(x.shape[2:], p, q)]
    out = torch.empty((x.shape[0], model.num_features, *n))
    for j in itertools.product(*map(range, n)):
        s = [a * b for a, b in zip(j, q)]
        fine = x[(slice(None), slice(None)) + tuple(slice(a, a + b) for a, b in zip(s, p))]
        view = context[(slice(None), slice(None)) + tuple(slice(a, a + b, c) for a, b, c in zip(s, span, k))]
        out[(slice(None), slice(None)) + j] = model.forward_features(torch.cat([fine, view], 1))
    return out


@pytest.mark.parametrize("fine", [CNN, RESNET], ids=["cnn3d", "resnet3d"])
@pytest.mark.parametrize("k,step,shape", [((3, 3, 3), (1, 1, 1), (7, 60, 57)),   # the default view's stride
                                          ((2, 3, 1), (1, 2, 3), (6, 70, 50)),   # uneven strides, stepped outputs
                                          ((1, 1, 1), (1, 1, 1), (5, 40, 40))])  # a view as fine as the patch
def test_dense_features_equal_the_per_patch_features(fine, k, step, shape):
    torch.manual_seed(0)
    model = create_backbone("multiscale", patch_shape=(5, 33, 33), fine=fine).eval()
    assert model.dense_equivalent and model.output_stride == (1, 4, 4)
    x = torch.rand(2, 1, *shape)
    context = torch.rand(2, 1, *model.context_shape(shape, k))
    with torch.no_grad():
        dense = model.dense_features(x, context, k, step)
        expected = _per_patch(model, x, context, k, step)
    assert dense.shape == expected.shape and dense.shape[2:].numel() >= 4
    np.testing.assert_allclose(dense.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # the context encoder's half varies over the outputs (most features: a few ReLUs are dead)
    assert (dense[:, model.fine.num_features:].std(dim=(2, 3, 4)) > 1e-4).float().mean() >= 0.5


def test_a_padded_encoder_keeps_the_patch_mode():
    model = create_backbone("multiscale", patch_shape=(5, 33, 33), fine={**CNN, "padding": "same"})
    assert not model.dense_equivalent and model.output_stride is None
    with pytest.raises(NotImplementedError, match="not both dense-equivalent"):
        model.dense_features(torch.zeros(1, 1, 5, 33, 33), torch.zeros(1, 1, 13, 97, 97), (3, 3, 3))


def test_dense_features_need_a_matching_context_block():
    model = create_backbone("multiscale", patch_shape=(5, 33, 33), fine=CNN)
    with pytest.raises(ValueError, match="needs the context block and its stride"):
        model.dense_features(torch.zeros(1, 1, 5, 40, 40))
    with pytest.raises(ValueError, match=r"expected \(1, 1, 13, 104, 104\) for context stride \(3, 3, 3\)"):
        model.dense_features(torch.zeros(1, 1, 5, 40, 40), torch.zeros(1, 1, 13, 97, 97), (3, 3, 3))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return two_volume_cohort(tmp_path_factory.mktemp("phantom") / "c")


@pytest.fixture(scope="module")
def runs(cohort, tmp_path_factory):
    """Two untrained multi-scale cnn3d runs (seeds 0, 1) in a multirun-like folder."""
    root = tmp_path_factory.mktemp("multirun")
    runs = [make_run(root / str(i), cohort, seed=i, context_um=CONTEXT_UM) for i in range(2)]
    for run in runs:  # a sharper head: maps that span more than the float16 storage's rounding
        ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
        ckpt["state_dict"]["net.head.fc.weight"] *= 30
        torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    return root, runs


def _infer(out: Path, **over) -> tuple[np.ndarray, dict]:
    infer(infer_config(**{"volumes": ["mock_0"], "figures": False, "ct_preview": False, "evaluate": False,
                          "output": str(out), **over}))
    arr, meta = read_maps(out / "mock_0" / "maps.ome.zarr")
    return arr[:].astype(np.float32), meta


def test_infer_sweeps_a_multiscale_run_densely_with_the_patch_answers(runs, tmp_path):
    _, (r0, _) = runs
    dense, meta = _infer(tmp_path / "dense", run=str(r0))
    patch, meta_patch = _infer(tmp_path / "patch", run=str(r0), mode="patch")
    assert meta["settings"]["mode"] == "dense" and meta_patch["settings"]["mode"] == "patch"
    assert meta["grid"] == meta_patch["grid"]
    tissue = np.isfinite(dense[0])
    assert tissue.sum() > 100 and np.array_equal(tissue, np.isfinite(patch[0]))
    np.testing.assert_allclose(dense, patch, atol=5e-4, equal_nan=True)  # float16 storage
    assert (np.nanmax(dense, axis=(1, 2, 3)) - np.nanmin(dense, axis=(1, 2, 3))).min() > 0.01  # maps, not constants


def test_a_dense_multiscale_ensemble_equals_its_patch_ensemble(runs, tmp_path):
    root, _ = runs
    dense, meta = _infer(tmp_path / "dense", run=str(root), uncertainty="ensemble")
    patch, _ = _infer(tmp_path / "patch", run=str(root), uncertainty="ensemble", mode="patch")
    assert len(meta["uncertainty"]["members"]) == 2 and meta["settings"]["mode"] == "dense"
    np.testing.assert_allclose(dense, patch, atol=5e-4, equal_nan=True)
    assert np.nanmean(dense[6:]) > 0.01  # the two members disagree


def test_a_checkpoint_from_before_the_dense_mode_gains_it(runs, cohort, tmp_path):
    """Multi-scale checkpoints trained before this mode recorded no output stride; dense equals
    patch, so they sweep densely. A recorded stride that differs is still an error."""
    from xpression.data.input_spec import INPUT_SPEC_KEY
    from xpression.inference.runs import load_predictor, resolve_run

    _, (r0, _) = runs
    old = tmp_path / "old"
    make_run(old, cohort, seed=0, context_um=CONTEXT_UM)
    ckpt = torch.load(r0 / "checkpoints" / "best.ckpt", weights_only=False)
    ckpt[INPUT_SPEC_KEY]["model"].update(output_stride=None, dense_equivalent=False)
    torch.save(ckpt, old / "checkpoints" / "best.ckpt")
    pred = load_predictor(resolve_run(old, "best"), device="cpu")
    assert pred.can_dense and pred.context_stride == (3, 3, 3)
    ckpt[INPUT_SPEC_KEY]["model"].update(output_stride=[1, 2, 2], dense_equivalent=True)
    torch.save(ckpt, old / "checkpoints" / "best.ckpt")
    with pytest.raises(InferenceError, match=r"records output_stride=\[1, 2, 2\] but the model built from it has \[1, 4, 4\]"):
        load_predictor(resolve_run(old, "best"), device="cpu")


def test_the_sweep_says_what_a_multiscale_model_lacks(runs, cohort, tmp_path):
    from xpression.inference.grid import OutputGrid
    from xpression.inference.runs import load_model, resolve_run
    from xpression.inference.sweep import ContextSource, sweep

    _, (r0, _) = runs
    info = resolve_run(r0, "best")
    model = load_model(info)
    volume = np.zeros((20, 80, 80), np.float32)

    class Vol:  # a bare in-memory volume
        shape, dtype, voxel_size_um, origin_um = volume.shape, volume.dtype, (6.4, 6.4, 6.4), (0.0, 0.0, 0.0)

        @staticmethod
        def read_block(lo, hi, fill=0):
            out = np.full(tuple(np.asarray(hi) - np.asarray(lo)), fill, np.float32)
            return out

    grid = OutputGrid((8, 40, 40), (5, 4, 4), (1, 2, 2), (6.4, 6.4, 6.4), (0.0, 0.0, 0.0))
    with pytest.raises(InferenceError, match=r"needs context=ContextSource"):
        sweep(Vol(), model, grid, mode="dense")
    source = ContextSource(Vol(), lambda b: b, info.spec.context)
    with pytest.raises(InferenceError, match=r"context_stride None is not the context view's stride \(3, 3, 3\)"):
        sweep(Vol(), Predictor(model, device="cpu"), grid, mode="dense", context=source)
    out = sweep(Vol(), model, grid, mode="dense", context=source)  # a module: the stride comes from the view
    assert out.shape == (6, 1, 2, 2) and np.isfinite(out).all()
    single = make_run(tmp_path / "single", cohort, seed=0)
    with pytest.raises(InferenceError, match="context= given, but the network takes the patch only"):
        sweep(Vol(), load_model(resolve_run(single, "best")), grid, mode="dense", context=source)
