"""The DataModule on the tiny phantom: metadata, batches, determinism, splits, bad inputs."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
import yaml

from xpression.data.datamodule import XPressionDataModule, image_to_float
from xpression.data.geometry import DataError
from xpression.data.sampling import JitterSampler, StratifiedSampler
from xpression.data.splits import SpatialBlocksSplit, StratifiedRandomSplit, patch_overlap
from xpression.data.targets import GenesTarget, ObsmTarget, ProgramsTarget

SECTION = "mock_0_s0"


def write_manifest(manifest: Path, out_dir: Path, volume: dict | None = None, section: dict | None = None, volume_id: str = "mock_0") -> Path:
    """A copy of ``manifest`` (absolute paths) with one volume's / its first section's fields replaced.

    The "same patches from another file format" checks only change ``image`` here.
    """
    root = manifest.parent
    doc = yaml.safe_load(manifest.read_text())
    for v in doc["volumes"]:
        v["image"] = str(root / v["image"])
        for s in v["sections"]:
            s["adata"], s["landmarks"] = str(root / s["adata"]), str(root / s["landmarks"])
        if v["id"] == volume_id:
            v.update(volume or {})
            v["sections"][0].update(section or {})
            v["sections"][0] = {k: x for k, x in v["sections"][0].items() if x is not None}
    doc["volumes"] = [{k: x for k, x in v.items() if x is not None} for v in doc["volumes"]]
    doc.pop("truth", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cohort.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def make_dm(manifest, **kw) -> XPressionDataModule:
    kw.setdefault("split", SpatialBlocksSplit(block_um=300.0))
    kw.setdefault("batch_size", 8)
    return XPressionDataModule(manifest, **kw)


def test_metadata_before_reading_voxels(tiny_cohort):
    dm = make_dm(tiny_cohort)
    assert dm.voxel_size_um == (6.4, 6.4, 6.4)
    assert dm.patch_shape_vox == (5, 33, 33)
    assert dm.target_spec.names == ["alveolar", "airway", "vascular", "infected", "immune", "remodelling"]
    assert dm.target_spec.kind == "composition"
    assert dm._datasets is None  # no slab read yet
    spots = dm.spots
    cols = {"section_id", "volume_id", "barcode", "z_um", "y_um", "x_um", "z_vox", "px_x", "px_y", "split", "dominant"}
    assert cols <= set(spots.columns)
    assert spots["section_id"].nunique() == 3 and spots["volume_id"].nunique() == 3
    assert set(spots["split"]) == {"train", "val", "test", "excluded"}


def test_registration_recovers_true_spot_positions(tiny_cohort):
    spots = make_dm(tiny_cohort).spots
    for sid, sub in spots.groupby("section_id"):
        a = ad.read_h5ad(tiny_cohort.parent / "sections" / f"{sid}.h5ad")
        true = np.asarray(a[sub["barcode"].to_numpy()].obsm["ct_position_um"])
        err = np.linalg.norm(sub[["z_um", "y_um", "x_um"]].to_numpy() - true, axis=1)
        assert err.max() < 27.5, f"{sid}: max error {err.max():.1f} um"
        np.testing.assert_allclose(sub["z_vox"], true[:, 0] / 6.4, atol=1e-9)


def test_batches_shape_dtype_and_determinism(tiny_cohort):
    def first_batches(seed):
        dm = make_dm(tiny_cohort, seed=seed, sampler=StratifiedSampler())
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        return [dm.apply_augment(next(it)) for _ in range(2)], dm

    (b1, b2), dm = first_batches(0)
    (c1, c2), _ = first_batches(0)
    (d1, _), _ = first_batches(1)
    assert b1["image"].shape == (8, 1, 5, 33, 33) and b1["image"].dtype == torch.float32
    assert b1["target"].shape == (8, 6) and b1["target"].dtype == torch.float32
    assert b1["index"].dtype == torch.int64
    for k in b1:
        assert torch.equal(b1[k], c1[k]) and torch.equal(b2[k], c2[k])
    assert not torch.equal(b1["index"], d1["index"])
    train = set(np.flatnonzero(dm.spots["split"] == "train"))
    assert set(b1["index"].tolist()) <= train
    # Targets line up with the spot table rows.
    spec = dm.target_spec
    np.testing.assert_allclose(b1["target"].sum(1), 1.0, atol=1e-5)
    assert [spec.names[i] for i in b1["target"].argmax(1)] == dm.spots["dominant"].to_numpy()[b1["index"]].tolist()

    val = next(iter(dm.val_dataloader()))
    assert set(val["index"].tolist()) <= set(np.flatnonzero(dm.spots["split"] == "val"))
    n_pred = sum(len(b["index"]) for b in dm.predict_dataloader())
    assert n_pred == len(dm.spots)


def test_patch_is_centred_on_the_spot(tiny_cohort):
    from xpression.data.volume import open_volume

    dm = make_dm(tiny_cohort, sections=[SECTION], augment=False)
    dm.setup()
    ds = dm._datasets["all"]
    vol = open_volume(tiny_cohort.parent / "volumes" / "mock_0.ome.zarr")
    row = int(np.flatnonzero(dm.spots["section_id"] == SECTION)[0])
    patch, _ = ds.patch(row)
    c = np.rint(dm.spots.loc[row, ["z_vox", "y_vox", "x_vox"]].to_numpy(float)).astype(int)
    raw = vol[c[0] - 2 : c[0] + 3, c[1] - 16 : c[1] + 17, c[2] - 16 : c[2] + 17].astype(float)
    assert np.corrcoef(raw.ravel(), patch.astype(float).ravel())[0, 1] > 0.999


@pytest.mark.parametrize("suffix", ["tif", "npy"])
def test_same_patches_from_tiff_and_omezarr(tiny_cohort, tmp_path, suffix):
    """Only the volume path changes: a TIFF stack (or .npy) copy of the OME-Zarr gives
    identical patches, normalisation included."""
    import tifffile

    from xpression.data.volume import open_volume

    source = open_volume(tiny_cohort.parent / "volumes" / "mock_0.ome.zarr")
    path = tmp_path / f"mock_0.{suffix}"
    if suffix == "tif":
        tifffile.imwrite(path, source[:, :, :], bigtiff=True)
    else:
        np.save(path, source[:, :, :])
    other = write_manifest(tiny_cohort, tmp_path / suffix, volume={"image": str(path), "voxel_size_um": list(source.voxel_size_um)})
    batches = []
    for manifest in (tiny_cohort, other):
        dm = make_dm(manifest, sections=[SECTION], check_tissue_mask=False)
        batches.append(next(iter(dm.predict_dataloader())))
    assert image_to_float(batches[0]["image"]).std() > 0.05
    for k in batches[0]:
        assert torch.equal(batches[0][k], batches[1][k]), k


def test_resampled_voxel_size(tiny_cohort):
    dm = make_dm(tiny_cohort, sections=[SECTION], sampler=JitterSampler(voxel_size_um=12.8), check_tissue_mask=False)
    assert dm.voxel_size_um == (12.8, 12.8, 12.8) and dm.patch_shape_vox == (3, 17, 17)
    b = dm.apply_augment(next(iter(dm.train_dataloader())))
    assert b["image"].shape[1:] == (1, 3, 17, 17) and -0.2 <= float(b["image"].min()) and float(b["image"].max()) <= 1.2


def test_spatial_split_has_no_patch_overlap_paper_split_has(tiny_cohort):
    counts = {}
    for name, split in [("blocks", SpatialBlocksSplit(block_um=300.0)), ("paper", StratifiedRandomSplit())]:
        dm = make_dm(tiny_cohort, split=split)
        s, planes = dm.spots, dm._prepare()["planes"]
        size = (34.0, 211.2, 211.2)  # 5 x 33 x 33 voxels of 6.4 um
        counts[name] = [patch_overlap(s[s.split == "train"], s[s.split == h], planes, size) for h in ("val", "test")]
    assert counts["blocks"] == [0, 0]
    assert counts["paper"][0] > 100 and counts["paper"][1] > 30, counts


@pytest.mark.parametrize("target", [GenesTarget(n_top=20), ProgramsTarget(n_programs=4, n_genes=100)])
def test_other_targets(tiny_cohort, target):
    dm = make_dm(tiny_cohort, target=target, sections=[SECTION], check_tissue_mask=False)
    b = next(iter(dm.predict_dataloader()))
    assert b["target"].shape == (8, dm.target_spec.n_targets)
    assert dm.target_spec.kind == ("log_expression" if isinstance(target, GenesTarget) else "composition")


# -- bad input: one clear DataError each, before any voxel is read ------------------------------------


@pytest.fixture()
def bad(tiny_cohort, tmp_path):
    """Write a modified copy of one section file and a manifest pointing at it."""

    def make(kind: str, edit=None, **fields):
        src = tiny_cohort.parent / "sections" / f"{SECTION}{'.h5ad' if kind == 'adata' else '_landmarks.csv'}"
        dst = tmp_path / src.name
        if kind == "adata" and edit is not None:
            a = ad.read_h5ad(src)
            edit(a)
            a.write_h5ad(dst)
        elif kind == "landmarks":
            lines = src.read_text().splitlines()
            dst.write_text("\n".join(edit(lines)) + "\n")
        section = {kind: str(dst)} if edit is not None else {}
        section.update(fields)
        return write_manifest(tiny_cohort, tmp_path / "m", section=section)

    return make


def _raises(manifest, match, **kw):
    dm = make_dm(manifest, sections=[SECTION], **kw)
    with pytest.raises(DataError, match=match):
        dm.target_spec
    assert dm._datasets is None


def test_bad_missing_and_unreadable_files(bad, tmp_path):
    manifest = bad("adata", lambda a: None)
    (tmp_path / f"{SECTION}.h5ad").unlink()
    with pytest.raises(ValueError, match="not found"):  # ManifestError or DataError, both ValueErrors
        make_dm(manifest, sections=[SECTION]).target_spec
    (tmp_path / f"{SECTION}.h5ad").write_bytes(b"not an hdf5 file")
    _raises(manifest, rf"{SECTION}\.h5ad: cannot read ST data")


def test_bad_obsm_key(tiny_cohort):
    _raises(tiny_cohort, r"obsm key 'chr_aa' not found; available obsm keys: \[.*'programs_true'.*\]", target=ObsmTarget("chr_aa"))


def test_bad_genes(tiny_cohort):
    _raises(tiny_cohort, r"genes not found: \['NotAGene'\]", target=GenesTarget(genes=["NotAGene"]))


def test_bad_counts(bad):
    def nan(a):
        a.X = a.X.astype(np.float32)
        a.X.data[0] = np.nan

    def neg(a):
        a.X = a.X.astype(np.float32)
        a.X.data[0] = -3

    _raises(bad("adata", nan), r"\.h5ad: counts contain NaN")
    _raises(bad("adata", neg), r"\.h5ad: counts contain negative values")


def test_bad_spot_ids(tiny_cohort, tmp_path):
    a = ad.read_h5ad(tiny_cohort.parent / "sections" / f"{SECTION}.h5ad")
    import pandas as pd

    df = pd.DataFrame(np.asarray(a.obsm["programs_true"]), index=a.obs_names)
    df.index = [f"X{b}" for b in df.index]
    df.to_csv(tmp_path / f"{SECTION}.csv")
    _raises(tiny_cohort, "spot ids do not match", target=ObsmTarget(table=str(tmp_path / "{section}.csv")))


def test_bad_plane_outside_volume_at_manifest_load(bad):
    from xpression.data import ManifestError

    with pytest.raises(ManifestError, match=r"section 'mock_0_s0'.z_um: 5000 um lies outside volume 'mock_0' \(z -3.2..252.8 um"):
        make_dm(bad("adata", None, z_um=5000.0), sections=[SECTION]).target_spec


def test_bad_landmarks(bad):
    _raises(bad("landmarks", lambda lines: lines[:2]), "too few active landmarks: 2")
    _raises(bad("landmarks", lambda lines: [l.replace('"true"', '"false"') for l in lines[2:]] + lines[:2]), "too few")

    def collinear(lines):
        out = []
        for i, l in enumerate(lines[:4]):
            name = l.split(",")[0]
            out.append(f'{name},"true","{10.0 * i}","{20.0 * i}","{5.0 * i}","{7.0 * i}"')
        return out

    _raises(bad("landmarks", collinear), "collinear")

    def shift(lines):  # the first landmark's ST x (moving, first pair) clicked 200 px off
        f = lines[0].split(",")
        f[2] = f'"{float(f[2].strip(chr(34))) + 200.0}"'
        return [",".join(f)] + lines[1:]

    _raises(bad("landmarks", shift), r"landmarks\.csv: section mock_0_s0: landmark residual too large: 'Pt-0'")


def test_bad_voxel_size_and_empty_mask(tiny_cohort, tmp_path):
    arr = np.zeros((40, 156, 156), np.uint8)
    np.save(tmp_path / "empty.npy", arr)
    no_vs = write_manifest(tiny_cohort, tmp_path / "a", volume={"image": str(tmp_path / "empty.npy"), "voxel_size_um": None})
    with pytest.raises(ValueError, match="voxel_size_um is required"):  # the manifest loader catches it
        make_dm(no_vs, sections=[SECTION]).target_spec
    empty = write_manifest(tiny_cohort, tmp_path / "b", volume={"image": str(tmp_path / "empty.npy")})
    _raises(empty, "tissue mask")


def test_a_nan_volume_is_named_once_in_the_error(tiny_cohort, tmp_path):
    """The volume's own error (file: problem) was wrapped with the file again: 'f: tissue mask: f: ...'."""
    arr = np.full((40, 156, 156), 100.0, np.float32)
    arr[:, :8] = np.nan
    np.save(tmp_path / "nan.npy", arr)
    manifest = write_manifest(tiny_cohort, tmp_path / "a", volume={"image": str(tmp_path / "nan.npy"),
                                                                   "voxel_size_um": [6.4, 6.4, 6.4]})
    dm = make_dm(manifest, sections=[SECTION])
    with pytest.raises(DataError, match="NaN voxel") as err:
        dm.target_spec
    assert str(err.value).count("nan.npy") == 1, str(err.value)


def test_tilted_section_plane(tiny_cohort, tmp_path):
    z = 21 * 6.4  # on a voxel centre, so the axial fast path and interpolation sample the same points
    axial = write_manifest(tiny_cohort, tmp_path / "axial", section={"z_um": z})
    flat = write_manifest(tiny_cohort, tmp_path / "flat", section={"z_um": None, "plane": [[z, 0.0, 0.0], [z, 900.0, 0.0], [z, 0.0, 900.0]]})
    tilt = float(np.tan(np.radians(3.0)) * 900.0)
    tilted = write_manifest(tiny_cohort, tmp_path / "tilted", section={"z_um": None, "plane": [[z, 0.0, 0.0], [z, 900.0, 0.0], [z + tilt, 0.0, 900.0]]})
    out = {}
    for name, m in [("axial", axial), ("flat", flat), ("tilted", tilted)]:
        dm = make_dm(m, sections=[SECTION], check_tissue_mask=False, normalizers=out.get("norm"))
        out[name] = next(iter(dm.predict_dataloader()))
        out["norm"] = {"mock_0": dm.normalizers["mock_0"]}
        if name == "tilted":
            spots = dm.spots
    assert (image_to_float(out["axial"]["image"]) - image_to_float(out["flat"]["image"])).abs().max() <= 1.5 / 255
    assert out["tilted"]["image"].shape == out["axial"]["image"].shape
    zs = spots["z_um"].to_numpy()
    np.testing.assert_allclose(zs, z + np.tan(np.radians(3.0)) * spots["x_um"].to_numpy(), atol=1.0)
    assert zs.max() - zs.min() > 20.0


def test_histogram_matching_to_a_reference_volume(tiny_cohort):
    """With intensity_reference, every volume's grey levels are matched to the reference scan
    before normalisation: the cached slabs' quantiles come together."""
    from xpression.data.input_spec import IntensitySpec, resolve_reference
    from xpression.data.manifest import load_manifest
    from xpression.data.volume import open_volume

    cohort = load_manifest(tiny_cohort)
    volumes = {v.id: open_volume(v.image) for v in cohort.volumes}
    qs = [5, 25, 50, 75, 95]

    def quantile_gap(reference):
        spec = IntensitySpec.fit("robust", *(resolve_reference(reference, cohort) or (None, None)))
        ref = np.percentile(spec.transform_for(volumes["infected_0"])(volumes["infected_0"][:, :, :]), qs)
        out = np.percentile(spec.transform_for(volumes["mock_0"])(volumes["mock_0"][:, :, :]), qs)
        return np.abs(out - ref).max()

    own, matched = quantile_gap(None), quantile_gap("infected_0")
    assert matched < 0.02 < own
    dm = make_dm(tiny_cohort, sections=[SECTION], intensity_reference="infected_0", check_tissue_mask=False)
    dm.setup()
    assert type(dm.normalizers["mock_0"]).__name__ == "MatchedNormalizer"
    with pytest.raises(DataError, match="intensity_reference"):
        make_dm(tiny_cohort, sections=[SECTION], intensity_reference="nope", check_tissue_mask=False).setup()


def test_bad_intensity_and_turning_copies_fail_before_reading(tiny_cohort):
    with pytest.raises(DataError, match="data.intensity must be one of robust, divide255, got 'per_slice'"):
        make_dm(tiny_cohort, sections=[SECTION], intensity="per_slice")
    from xpression.data.sampling import StratifiedSampler

    sampler = StratifiedSampler(patch_size_um=[6.4, 100.0, 205.0], copy_transforms=["rot90", "rot180", "flip", "zflip"])
    _raises(tiny_cohort, r"copy_transforms \['rot90'\] would turn the 15 x 33 voxel patch", sampler=sampler)


def test_worker_batches_travel_as_uint8_from_shared_slabs(tiny_cohort):
    """The slab cache pickles as shared-memory handles (spawn/forkserver workers get no copy of
    it); workers send the same uint8 batches as the main process; the device side turns them
    into the float32 intensities of a [0, 1] patch."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the shared-memory reducers)

    dm = make_dm(tiny_cohort, sections=[SECTION], check_tissue_mask=False, augment=False)
    dm.setup()
    ds = dm._datasets["all"]
    slab_bytes = sum(data.nbytes for data, _ in ds.slabs.values())
    payload = ForkingPickler.dumps(ds)
    assert slab_bytes > 100_000 and len(payload) < slab_bytes / 10
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(clone.patch(3)[0], ds.patch(3)[0])

    inline = list(dm.val_dataloader())
    dm.num_workers = 2
    workers = list(dm.val_dataloader())
    assert len(inline) > 0 and dm.predict_dataloader().num_workers == 0  # one pass over every spot: no workers
    assert len(inline) == len(workers)
    for a, b in zip(inline, workers):
        assert a["image"].dtype == b["image"].dtype == torch.uint8
        for k in a:
            assert torch.equal(a[k], b[k]), k
    x = dm.on_after_batch_transfer(inline[0], 0)["image"]
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    torch.testing.assert_close(x * 255.0, inline[0]["image"].float(), rtol=0, atol=1e-4)


def test_data_seed_fixes_the_split_across_model_seeds(tiny_cohort):
    """``data.seed`` follows ``seed`` unless set: ensemble members can share one split."""
    from omegaconf import open_dict

    from xpression.config import compose
    from xpression.training import build_datamodule

    def config(*overrides):
        return compose("train", [f"data.manifest={tiny_cohort}", "model=cnn3d", *overrides])

    def split(*overrides):
        dm = build_datamodule(config(*overrides))
        dm.setup("fit")
        return dm.spots["split"].to_numpy()

    base = split("seed=0")
    assert (split("seed=1") != base).any()  # a model seed alone also draws another split
    np.testing.assert_array_equal(split("seed=1", "data.seed=0"), base)
    cfg = config("seed=3")
    with open_dict(cfg):
        del cfg.data["seed"]  # a data config without the key takes the run's seed
    assert build_datamodule(cfg).seed == 3


def test_train_fraction_keeps_a_seeded_share_of_training_spots(tiny_cohort):
    full = make_dm(tiny_cohort).spots["split"].to_numpy()
    half = make_dm(tiny_cohort, train_fraction=0.5).spots["split"].to_numpy()
    again = make_dm(tiny_cohort, train_fraction=0.5).spots["split"].to_numpy()
    other = make_dm(tiny_cohort, train_fraction=0.5, seed=1).spots["split"].to_numpy()
    n_train = int((full == "train").sum())
    assert (half == "train").sum() == round(0.5 * n_train)
    held = np.isin(full, ["val", "test"])
    np.testing.assert_array_equal(half[held], full[held])  # held-out spots untouched
    assert set(np.flatnonzero(half == "train")) <= set(np.flatnonzero(full == "train"))
    assert ((full == "train") & (half == "excluded")).sum() == n_train - (half == "train").sum()
    np.testing.assert_array_equal(half, again)
    assert (other != half).any()  # another seed draws another subset (and split)
    with pytest.raises(DataError, match=r"data.train_fraction must lie in \(0, 1\], got 0"):
        make_dm(tiny_cohort, train_fraction=0)


def test_pooled_worker_batches_equal_inline_ones_and_free_their_slots(tiny_cohort):
    """Workers with a BatchPool leave each batch in one of their shared slots and send a
    PooledBatch (a few integers, no file descriptor); copying it out (the pin-memory thread's
    job) gives the batch the main process builds and frees the slot. A worker with no free slot
    falls back to fresh shared memory; the batches are the same either way."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from torch.utils.data import DataLoader

    from xpression.data.datamodule import PooledBatch, _collate

    dm = make_dm(tiny_cohort, sections=[SECTION], check_tissue_mask=False, augment=False, batch_size=2)
    dm.setup()
    sampler = dm.train_sampler()
    inline = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        inline += list(dm._loader(sampler))
    assert len(inline) > 4  # more batches than the pool has slots: slots are reused

    ds = dm._datasets["all"].pooled(workers=2, per_worker=2, batch_size=2)
    pool = ds.batch_pool
    assert pool is not None and ds.slabs is not dm._datasets["all"].slabs and pool.image.shape[:2] == (4, 2)
    assert len(ForkingPickler.dumps(PooledBatch(pool.key, 3, 2))) < 200
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, persistent_workers=True, collate_fn=_collate,
                        prefetch_factor=2)
    got, pooled = [], 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in loader:
            pooled += isinstance(batch, PooledBatch)
            got.append(batch.pin_memory() if isinstance(batch, PooledBatch) else batch)
    assert pooled > len(got) // 2
    assert int(pool.busy.sum()) == 0  # every slot freed once copied out
    assert len(got) == len(inline)
    for a, b in zip(inline, got):
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    # a worker whose slots are all taken builds the batch in fresh shared memory
    clone = pickle.loads(ForkingPickler.dumps(ds))
    pool.busy.fill_(1)
    from unittest import mock

    with mock.patch("torch.utils.data.get_worker_info", return_value=mock.Mock(id=1)):
        batch = clone.__getitems__([0, 1])
        assert isinstance(batch, dict) and batch["image"].is_shared()
        pool.busy[2] = 0
        slot_batch = clone.__getitems__([0, 1])
    assert isinstance(slot_batch, PooledBatch) and slot_batch.slot == 2 and int(pool.busy[2]) == 1
    out = slot_batch.pin_memory()
    assert int(pool.busy[2]) == 0
    for k in batch:
        assert torch.equal(out[k], batch[k]), k


def test_no_batch_pool_where_dev_shm_cannot_hold_it(tiny_cohort, monkeypatch, caplog):
    """Too little /dev/shm (a container's 64 MB default, say): the loader keeps the plain path
    instead of risking a bus error when the pool's pages are touched."""
    import xpression.data.datamodule as dmod

    dm = make_dm(tiny_cohort, sections=[SECTION], check_tissue_mask=False, augment=False, batch_size=2)
    dm.setup()
    ds = dm._datasets["all"]
    monkeypatch.setattr(dmod, "shm_free_bytes", lambda path="/dev/shm": 1000)
    with caplog.at_level("WARNING", logger=dmod.__name__):
        assert ds.pooled(workers=2, per_worker=2, batch_size=2) is ds
    assert "need" in caplog.text and "/dev/shm" in caplog.text
    slab = dmod._shared(np.ones((4, 100, 100), np.uint8))  # 40 kB: a slab cache stays private too
    assert not slab.is_shared() and int(slab.sum()) == 40_000
    monkeypatch.setattr(dmod, "shm_free_bytes", lambda path="/dev/shm": None)
    assert ds.pooled(workers=2, per_worker=2, batch_size=2).batch_pool is not None
    assert dmod._shared(np.ones((4, 100, 100), np.uint8)).is_shared()
