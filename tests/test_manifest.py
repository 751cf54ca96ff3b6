"""The cohort manifest: valid files load, every kind of problem is reported at once."""

from pathlib import Path

import pytest
import yaml

from xpression.data import ManifestError, load_manifest


def _cohort(tmp_path: Path, **overrides) -> Path:
    (tmp_path / "volumes").mkdir()
    (tmp_path / "sections").mkdir()
    (tmp_path / "volumes" / "v0.ome.zarr").mkdir()
    (tmp_path / "volumes" / "v1.npy").write_bytes(b"")
    for name in ("s0.h5ad", "s0.csv", "s1.h5ad", "s1.csv"):
        (tmp_path / "sections" / name).write_bytes(b"")
    manifest = {
        "name": "test",
        "volumes": [
            {
                "id": "v0",
                "image": "volumes/v0.ome.zarr",
                "condition": "mock",
                "sections": [{"id": "s0", "adata": "sections/s0.h5ad", "landmarks": "sections/s0.csv", "z_um": 96.0}],
            },
            {
                "id": "v1",
                "image": "volumes/v1.npy",
                "voxel_size_um": [6.4, 6.4, 6.4],
                "sections": [
                    {
                        "id": "s1",
                        "adata": "sections/s1.h5ad",
                        "landmarks": "sections/s1.csv",
                        "plane": [[50, 0, 0], [60, 0, 100], [50, 100, 0]],
                    }
                ],
            },
        ],
        "truth": {"programs": ["a", "b"], "fields": {"v0": "volumes/v0.ome.zarr"}},
    }
    manifest.update(overrides)
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def test_valid_manifest_loads_with_absolute_paths(tmp_path):
    cohort = load_manifest(_cohort(tmp_path))
    assert [v.id for v in cohort.volumes] == ["v0", "v1"]
    assert cohort.volumes[0].voxel_size_um is None  # read later from OME-Zarr metadata
    assert cohort.volumes[1].voxel_size_um == (6.4, 6.4, 6.4)
    s0, s1 = cohort.sections
    assert s0.is_axial and s0.z_um == 96.0 and s0.volume_id == "v0"
    assert not s1.is_axial and len(s1.plane) == 3
    assert s0.adata.is_absolute() and s0.adata.parent == tmp_path / "sections"
    assert cohort.truth.programs == ("a", "b")
    assert cohort.section("s1").volume_id == "v1"
    with pytest.raises(KeyError, match="volumes: \\['v0', 'v1'\\]"):
        cohort.volume("nope")


def test_every_problem_is_listed_at_once(tmp_path):
    path = _cohort(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["colour"] = "blue"  # unknown top-level key
    raw["volumes"][0]["image"] = "volumes/missing.ome.zarr"  # missing file
    raw["volumes"][1]["voxel_size_um"] = [6.4, -1, "x"]  # wrong values
    raw["volumes"][1]["sections"][0]["z_um"] = 10.0  # both z_um and plane
    raw["volumes"][0]["sections"][0]["thickness"] = 10  # unknown section key
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    problems = err.value.problems
    text = str(err.value)
    assert "unknown key 'colour'" in text
    assert "file not found" in text and "missing.ome.zarr" in text
    assert "voxel_size_um[1]: must be positive" in text
    assert "voxel_size_um[2]: expected a number" in text
    assert "'plane' (3+ points [z, y, x] in um), not both" in text
    assert "unknown key 'thickness'" in text
    assert len(problems) == 6


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m["volumes"][1].pop("voxel_size_um"), "voxel_size_um is required"),
        (lambda m: m["volumes"].append(dict(m["volumes"][0])), "duplicate volume id"),
        (lambda m: m["volumes"][0].update(id="bad id!"), "id must be"),
        (lambda m: m["volumes"][1]["sections"][0].update(plane=[[0, 0, 0], [1, 1, 1], [2, 2, 2]]), "collinear"),
        (lambda m: m["volumes"][0]["sections"][0].update(z_um="deep"), "expected a number"),
        (lambda m: m["volumes"][0].pop("image"), "missing required key 'image'"),
        (lambda m: m.update(volumes=[]), "non-empty list"),
        (lambda m: m["truth"].update(fields={"v9": "volumes/v0.ome.zarr"}), "names a volume"),
        (lambda m: m["volumes"][0].update(image="sections/s0.csv"), "unsupported extension"),
    ],
)
def test_single_problems(tmp_path, mutate, message):
    path = _cohort(tmp_path)
    raw = yaml.safe_load(path.read_text())
    mutate(raw)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("volumes: [unclosed")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ManifestError, match="expected a mapping"):
        load_manifest(bad)


def _one_volume(tmp_path: Path, image: str, **volume) -> Path:
    (tmp_path / "sections").mkdir(exist_ok=True)
    for name in ("s0.h5ad", "s0.csv"):
        (tmp_path / "sections" / name).write_bytes(b"")
    manifest = {"name": "test", "volumes": [{"id": "v0", "image": image, **volume, "sections": [
        {"id": "s0", "adata": "sections/s0.h5ad", "landmarks": "sections/s0.csv", "z_um": 2.0}]}]}
    path = tmp_path / "cohort.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def test_a_tiff_that_records_its_voxel_size_needs_none_in_the_manifest(tmp_path):
    """An OME-TIFF (PhysicalSize*, as tifffile writes it from the OME-XML it is given) and an ImageJ
    stack calibrated in microns carry the voxel size; a plain TIFF does not, and is named."""
    import numpy as np
    import tifffile

    from xpression.data import open_volume

    stack = np.zeros((4, 8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "ome.ome.tif", stack, metadata={"axes": "ZYX", "PhysicalSizeZ": 5.0,
                                                                "PhysicalSizeY": 2.5, "PhysicalSizeX": 2.5})
    cohort = load_manifest(_one_volume(tmp_path, "ome.ome.tif"))
    assert cohort.volumes[0].voxel_size_um is None  # read from the file when it is opened
    assert open_volume(cohort.volumes[0].image, cohort.volumes[0].voxel_size_um).voxel_size_um == (5.0, 2.5, 2.5)
    tifffile.imwrite(tmp_path / "fiji.tif", stack, imagej=True, resolution=(1 / 2.5, 1 / 2.5),
                     metadata={"spacing": 5.0, "unit": "micron", "axes": "ZYX"})
    assert load_manifest(_one_volume(tmp_path, "fiji.tif")).volumes[0].voxel_size_um is None
    tifffile.imwrite(tmp_path / "plain.tif", stack)
    with pytest.raises(ManifestError, match=r"volume 'v0': voxel_size_um is required: missing voxel size: the file "
                                            r"records neither OME metadata"):
        load_manifest(_one_volume(tmp_path, "plain.tif"))
    assert load_manifest(_one_volume(tmp_path, "plain.tif", voxel_size_um=[5, 2.5, 2.5])).volumes[0].voxel_size_um == (5, 2.5, 2.5)


def test_a_zarr_group_without_the_suffix_is_an_image(tmp_path):
    """bioformats2raw writes its image as the group '<root>/0': no .zarr suffix, still a zarr group."""
    import zarr

    group = zarr.open_group(str(tmp_path / "scan.ome.zarr" / "0"), mode="w", zarr_format=2)
    group.create_array("0", shape=(4, 8, 8), dtype="uint8")
    assert load_manifest(_one_volume(tmp_path, "scan.ome.zarr/0", voxel_size_um=[1, 1, 1])).volumes[0].image.name == "0"
    (tmp_path / "notes").mkdir()
    with pytest.raises(ManifestError, match="unsupported extension"):
        load_manifest(_one_volume(tmp_path, "notes", voxel_size_um=[1, 1, 1]))
