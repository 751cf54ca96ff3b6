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
