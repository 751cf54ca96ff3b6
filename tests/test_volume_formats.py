"""Volume reader on files as other tools write them: pyramidal OME-TIFF (SubIFDs), ImageJ stacks
without ``spacing``, OME-Zarr axis units, the bioformats2raw layout.

Every fixture is built with tifffile or zarr directly (metadata written by hand as the format's
documentation shows), never with this project's writer.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
import zarr

from xpression.data.volume import VolumeError, open_volume

SHAPE = (6, 64, 48)


def ramp(shape=SHAPE, dtype=np.uint16) -> np.ndarray:
    """Voxel (z, y, x) holds z * 10000 + y * 100 + x: every value says where it came from."""
    z, y, x = np.indices(shape)
    return (z * 10000 + y * 100 + x).astype(dtype)


# ----------------------------------------------------------------------------- pyramidal OME-TIFF


def write_pyramid_ome_tiff(path, data, levels=3, ome=True):
    """Level 0 in the main IFDs, levels 1.. in SubIFDs (NewSubfileType 1), as bfconvert / QuPath
    write pyramids and as tifffile documents ``TiffWriter.write(..., subifds=n)``."""
    meta = ({"axes": "ZYX", "PhysicalSizeZ": 3.0, "PhysicalSizeZUnit": "µm", "PhysicalSizeY": 0.0005,
             "PhysicalSizeYUnit": "mm", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"} if ome else None)
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tif:
        tif.write(data, subifds=levels - 1, tile=(16, 16), compression="zlib", photometric="minisblack",
                  metadata=meta)
        for i in range(1, levels):
            f = 2**i
            tif.write(data[:, ::f, ::f], subfiletype=1, tile=(16, 16), compression="zlib", photometric="minisblack")


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    path = tmp_path_factory.mktemp("pyr") / "scan.ome.tif"
    write_pyramid_ome_tiff(path, ramp())
    return path


def test_pyramidal_ome_tiff_level0(pyramid):
    data = ramp()
    vol = open_volume(pyramid)
    assert vol.kind == "tiff" and vol.shape == SHAPE and vol.dtype == np.uint16
    assert vol.voxel_size_um == pytest.approx((3.0, 0.5, 0.5))  # PhysicalSizeY 0.0005 mm
    assert vol.origin_um == (0.0, 0.0, 0.0) and vol.chunks == (1, 16, 16)
    assert vol.levels == ("0", "1", "2")
    np.testing.assert_array_equal(vol[:], tifffile.imread(pyramid))  # what tifffile reads for level 0
    np.testing.assert_array_equal(vol[:], data)
    assert int(vol[5, 63, 47]) == 56347 and int(vol[2, 10, 3]) == 21003
    np.testing.assert_array_equal(vol[1:4, 20:37, 5], data[1:4, 20:37, 5])
    block = vol.read_block((-1, 60, 40), (2, 66, 50), fill=7)
    expect = np.full((3, 6, 10), 7, np.uint16)
    expect[1:, :4, :8] = data[0:2, 60:64, 40:48]
    np.testing.assert_array_equal(block, expect)


def test_pyramidal_ome_tiff_reduced_levels(pyramid):
    data = ramp()
    vol = open_volume(pyramid)
    l1, l2 = vol.level(1), open_volume(pyramid, level=2)
    assert l1.shape == (6, 32, 24) and l2.shape == (6, 16, 12)
    np.testing.assert_array_equal(l1[:], tifffile.imread(pyramid, level=1))
    np.testing.assert_array_equal(l2[:], data[:, ::4, ::4])
    assert int(l2[3, 15, 11]) == 30000 + 60 * 100 + 44
    # same box: voxels scale with the shape ratio (z is not reduced), voxel 0 centred on the block it spans
    assert l1.voxel_size_um == pytest.approx((3.0, 1.0, 1.0))
    assert l2.voxel_size_um == pytest.approx((3.0, 2.0, 2.0))
    assert l1.origin_um == pytest.approx((0.0, 0.25, 0.25)) and l2.origin_um == pytest.approx((0.0, 0.75, 0.75))
    assert l2.extent_um == pytest.approx(vol.extent_um)
    np.testing.assert_array_equal(l1.read_block((4, 30, 20), (6, 32, 24)), data[4:6, 60:64:2, 40:48:2])
    with pytest.raises(VolumeError, match=r"level 3 out of range; the TIFF has 3 level\(s\)") as e:
        vol.level(3)
    assert str(pyramid) in str(e.value)
    with pytest.raises(VolumeError, match="metadata says"):
        open_volume(pyramid, voxel_size_um=1.0, level=1)
    assert open_volume(pyramid, voxel_size_um=[3.0, 0.5, 0.5], level=1).voxel_size_um == pytest.approx((3.0, 1.0, 1.0))


def test_pyramidal_ome_tiff_pickles(pyramid):
    data = ramp()
    for level in (0, 1):
        vol = open_volume(pyramid, level=level)
        clone = pickle.loads(pickle.dumps(vol))
        assert (clone.shape, clone.voxel_size_um, clone.level_index) == (vol.shape, vol.voxel_size_um, level)
        f = 2**level
        np.testing.assert_array_equal(clone[2:4, 3:9, 1:7], data[2:4, 3 * f:9 * f:f, f:7 * f:f])
        clone.close()
        np.testing.assert_array_equal(clone[5, 0, :4], data[5, 0, : 4 * f : f])  # reopened on demand


def test_plain_tiff_pyramid_without_metadata(tmp_path):
    """A SubIFD pyramid without OME-XML: the voxel size given is level 0's, scaled per level."""
    data = ramp()
    path = tmp_path / "pyr.tif"
    write_pyramid_ome_tiff(path, data, levels=2, ome=False)
    with pytest.raises(VolumeError, match="missing voxel size"):
        open_volume(path)
    vol = open_volume(path, voxel_size_um=[4.0, 1.0, 1.0])
    assert vol.levels == ("0", "1") and vol.voxel_size_um == (4.0, 1.0, 1.0)
    l1 = vol.level(1)
    assert l1.voxel_size_um == (4.0, 2.0, 2.0) and l1.origin_um == (0.0, 0.5, 0.5)
    np.testing.assert_array_equal(l1[:], data[:, ::2, ::2])


def test_truncated_pyramid_level(tmp_path):
    path = tmp_path / "cut.ome.tif"
    write_pyramid_ome_tiff(path, ramp())
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(VolumeError, match="corrupt|truncated") as e:
        open_volume(path)
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------- ImageJ calibration


def test_imagej_unit_without_spacing_is_one_unit(tmp_path):
    """tifffile writes the ImageJ description as Fiji does: no ``spacing=`` given, none written."""
    data = ramp((4, 6, 8))
    path = tmp_path / "fiji.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.8, 1 / 0.6), metadata={"unit": "micron", "axes": "ZYX"})
    with tifffile.TiffFile(path) as tif:
        assert "unit=micron" in tif.pages.first.description and "spacing" not in tif.pages.first.description
    vol = open_volume(path)
    assert vol.voxel_size_um == pytest.approx((1.0, 0.6, 0.8))
    np.testing.assert_array_equal(vol[:], data)

    mm = tmp_path / "mm.tif"
    tifffile.imwrite(mm, data, imagej=True, resolution=(1 / 0.002, 1 / 0.004), metadata={"unit": "mm", "axes": "ZYX"})
    assert open_volume(mm).voxel_size_um == pytest.approx((1000.0, 4.0, 2.0))


def test_imagej_description_as_fiji_writes_it(tmp_path):
    """The description text ij/io/FileSaver.getDescriptionString() produces for a calibrated
    16-bit stack with z spacing 1 (no ``spacing`` line), and with ``zunit`` differing from ``unit``."""
    data = ramp((5, 6, 8))
    fiji = "ImageJ=1.54f\nimages=5\nslices=5\nunit=micron\nloop=false\nmin=0.0\nmax=40507.0\n"
    path = tmp_path / "fiji_desc.tif"
    tifffile.imwrite(path, data, description=fiji, metadata=None, resolution=(2.0, 4.0), resolutionunit=1)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "micron"
    vol = open_volume(path)
    assert vol.voxel_size_um == pytest.approx((1.0, 0.25, 0.5))
    assert int(vol[4, 5, 7]) == 40507

    zunit = tmp_path / "zunit.tif"
    desc = "ImageJ=1.54f\nimages=5\nslices=5\nunit=micron\nzunit=mm\nspacing=0.005\nloop=false\n"
    tifffile.imwrite(zunit, data, description=desc, metadata=None, resolution=(2.0, 4.0), resolutionunit=1)
    assert open_volume(zunit).voxel_size_um == pytest.approx((5.0, 0.25, 0.5))


def test_imagej_uncalibrated_needs_voxel_size(tmp_path):
    data = ramp((3, 4, 5))
    path = tmp_path / "pixel.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"unit": "pixel", "axes": "ZYX"})
    with pytest.raises(VolumeError) as e:
        open_volume(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: missing voxel size") and "\n" not in msg
    assert "OME" in msg and "ImageJ calibration" in msg and "voxel_size_um" in msg
    assert open_volume(path, voxel_size_um=[2, 1, 1]).voxel_size_um == (2.0, 1.0, 1.0)


def test_imagej_unknown_unit(tmp_path):
    path = tmp_path / "furlong.tif"
    tifffile.imwrite(path, ramp((3, 4, 5)), imagej=True, resolution=(1.0, 1.0), metadata={"unit": "furlong"})
    with pytest.raises(VolumeError, match="unknown length unit 'furlong'"):
        open_volume(path)


# ----------------------------------------------------------------------------- OME-Zarr units


def write_ngff(root, data, unit, scale0, version="0.4", time_unit=None, zarr_format=None):
    """An OME-Zarr image group with two levels, metadata written as the NGFF spec's example shows:
    0.4 (zarr v2, ``multiscales`` at top level) or 0.5 (zarr v3, under ``"ome"``)."""
    zarr_format = zarr_format or (2 if version == "0.4" else 3)
    g = zarr.open_group(str(root), mode="w", zarr_format=zarr_format)
    axes = [{"name": "t", "type": "time", **({"unit": time_unit} if time_unit else {})}] + [
        {"name": n, "type": "space", "unit": unit} for n in "zyx"]
    s0 = [1.0] + list(scale0)
    s1 = [1.0, scale0[0], scale0[1] * 2, scale0[2] * 2]
    t1 = [0.0, 0.0, scale0[1] / 2, scale0[2] / 2]
    ms = {"version": version, "name": "ct", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": s0}]},
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": s1}, {"type": "translation", "translation": t1}]},
    ]}
    if version == "0.4":
        g.attrs["multiscales"] = [ms]
    else:
        ms.pop("version")
        g.attrs["ome"] = {"version": version, "multiscales": [ms]}
    kw = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if zarr_format == 2 else {}
    g.create_array("0", data=data[None], chunks=(1, 2, 16, 16), **kw)
    g.create_array("1", data=data[None, :, ::2, ::2], chunks=(1, 2, 16, 16), **kw)
    return g


@pytest.mark.parametrize("unit, um_per_unit", [
    ("micrometer", 1.0), ("millimeter", 1e3), ("nanometer", 1e-3), ("centimeter", 1e4),
    ("meter", 1e6), ("angstrom", 1e-4), ("inch", 25400.0), ("Micrometer", 1.0)])
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_omezarr_axis_units_to_um(tmp_path, unit, um_per_unit, version):
    data = ramp()
    voxel_um = np.array([4.0, 2.0, 1.0])
    root = tmp_path / "img.zarr"
    write_ngff(root, data, unit, list(voxel_um / um_per_unit), version=version, time_unit="second")
    vol = open_volume(root)
    assert vol.voxel_size_um == pytest.approx(tuple(voxel_um), rel=1e-12)
    assert vol.shape == SHAPE and int(vol[3, 2, 1]) == 30201
    l1 = vol.level(1)
    assert l1.voxel_size_um == pytest.approx((4.0, 4.0, 2.0), rel=1e-12)
    assert l1.origin_um == pytest.approx((0.0, 1.0, 0.5), rel=1e-12)
    np.testing.assert_array_equal(l1.read_block((0, 0, 0), (6, 32, 24)), data[:, ::2, ::2])


@pytest.mark.parametrize("unit", ["second", "furlong", "pixel", "reference frame"])
def test_omezarr_non_length_unit_refused(tmp_path, unit):
    root = tmp_path / "bad.zarr"
    write_ngff(root, ramp(), unit, [4.0, 2.0, 1.0])
    with pytest.raises(VolumeError) as e:
        open_volume(root)
    msg = str(e.value)
    assert msg == (f"{root}: spatial axis 'z' has unit {unit!r}, not a known length unit (expected a UDUNITS-2 "
                   "length such as 'micrometer', 'millimeter' or 'nanometer')")


# ----------------------------------------------------------------------------- bioformats2raw


def write_bf2raw(root, images, version="0.4", series_attr=True, xml=True):
    """The layout of NGFF 0.4 section "bioformats2raw.layout": a root group with
    ``"bioformats2raw.layout": 3``, one image group per series ("0/", "1/", ...) each with its own
    multiscales, and an ``OME`` group with ``series`` and METADATA.ome.xml."""
    zarr_format = 2 if version == "0.4" else 3
    g = zarr.open_group(str(root), mode="w", zarr_format=zarr_format)
    names = [str(i) for i in range(len(images))]
    for name, (data, unit, scale) in zip(names, images):
        write_ngff(root / name, data, unit, scale, version=version)
    ome = g.create_group("OME")
    if version == "0.4":
        g.attrs["bioformats2raw.layout"] = 3
        if series_attr:
            ome.attrs["series"] = names
    else:
        g.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
        if series_attr:
            ome.attrs["ome"] = {"version": "0.5", "series": names}
    if xml:
        (root / "OME" / "METADATA.ome.xml").write_text(
            '<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
            + "".join(f'<Image ID="Image:{n}"><Pixels ID="Pixels:{n}" DimensionOrder="XYZCT" Type="uint16" SizeX="48" '
                      f'SizeY="64" SizeZ="6" SizeC="1" SizeT="1"><MetadataOnly/></Pixels></Image>' for n in names)
            + "</OME>")


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("series_attr", [True, False])
def test_bioformats2raw_single_series(tmp_path, version, series_attr):
    data = ramp()
    root = tmp_path / "scan.ome.zarr"
    write_bf2raw(root, [(data, "micrometer", [3.0, 0.75, 0.75])], version=version, series_attr=series_attr)
    for path in (root, root / "0"):  # the collection, or its image group directly
        vol = open_volume(path)
        assert vol.kind == "zarr" and vol.shape == SHAPE and vol.dtype == np.uint16
        assert vol.voxel_size_um == pytest.approx((3.0, 0.75, 0.75)) and vol.levels == ("0", "1")
        np.testing.assert_array_equal(vol[:], data)
        np.testing.assert_array_equal(vol.read_block((4, 60, 44), (7, 65, 49), fill=1)[:2, :4, :4], data[4:, 60:, 44:])
        assert int(vol[5, 63, 47]) == 56347
        l1 = pickle.loads(pickle.dumps(vol.level(1)))
        assert l1.voxel_size_um == pytest.approx((3.0, 1.5, 1.5)) and int(l1[1, 2, 3]) == 10406


def test_bioformats2raw_several_series_refused(tmp_path):
    data = ramp()
    for series_attr in (True, False):
        root = tmp_path / f"multi{series_attr}.zarr"
        write_bf2raw(root, [(data, "micrometer", [1.0, 1.0, 1.0]), (data[:3], "millimeter", [0.002, 0.001, 0.001])],
                     series_attr=series_attr)
        with pytest.raises(VolumeError) as e:
            open_volume(root)
        assert str(e.value) == (f"{root}: bioformats2raw collection holds 2 images (0, 1); "
                                f"open one of them as {root}/<name>, e.g. {root}/0")
        second = open_volume(root / "1")
        assert second.shape == (3, 64, 48) and second.voxel_size_um == pytest.approx((2.0, 1.0, 1.0))
        np.testing.assert_array_equal(second[2], data[2])


def test_bioformats2raw_without_images(tmp_path):
    root = tmp_path / "empty.zarr"
    write_bf2raw(root, [], series_attr=False)
    with pytest.raises(VolumeError, match="bioformats2raw layout holds no image group"):
        open_volume(root)
    g = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    g.attrs["bioformats2raw.layout"] = 2
    with pytest.raises(VolumeError, match="bioformats2raw.layout 2 is not supported"):
        open_volume(tmp_path / "v2.zarr")


def test_zarr_v2_array_directory_without_suffix(tmp_path):
    data = ramp()
    zarr.create_array(str(tmp_path / "volume"), data=data, chunks=(2, 32, 32), zarr_format=2)
    vol = open_volume(tmp_path / "volume", voxel_size_um=2)
    np.testing.assert_array_equal(vol[1:3, 5:9, 40:], data[1:3, 5:9, 40:])
    (tmp_path / "not_zarr").mkdir()
    with pytest.raises(VolumeError, match="unsupported volume format"):
        open_volume(tmp_path / "not_zarr", voxel_size_um=2)
