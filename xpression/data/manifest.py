"""The cohort manifest (`cohort.yaml`): the data contract between files on disk and the framework.

A manifest describes one study, synthetic or real: its micro-CT volumes, the spatial
transcriptomics sections cut from each, and (for synthetic cohorts) where the 3D truth lives.
`load_manifest` checks the whole file and reports every problem at once, before any heavy work.
See `docs/design.md` for the format and the coordinate conventions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from xpression.data.bigwarp import read_landmarks
from xpression.data.geometry import DataError, Plane
from xpression.data.spaceranger import find_spaceranger_files
from xpression.data.volume import TIFF_SUFFIXES, VolumeError, ZARR_SUFFIXES, open_volume, volume_kind

__all__ = ["Cohort", "ManifestError", "SectionEntry", "TruthEntry", "VolumeEntry", "load_manifest"]

_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
_VOLUME_SUFFIXES = (*ZARR_SUFFIXES, *TIFF_SUFFIXES, ".npy")  # what the volume reader opens
_TOP_KEYS = {"name", "volumes", "truth", "description"}
_VOLUME_KEYS = {"id", "image", "voxel_size_um", "condition", "sections"}
_SECTION_KEYS = {"id", "adata", "landmarks", "z_um", "plane", "landmarks_moving", "landmarks_st_space",
                 "landmarks_ct_units", "spot_pitch_um"}
# How a BigWarp landmark table was made (defaults first): see xpression.data.registration.
LANDMARKS_MOVING = ("st", "ct")
LANDMARKS_ST_SPACE = ("fullres", "hires", "lowres")
LANDMARKS_CT_UNITS = ("um", "px")
VISIUM_PITCH_UM = 100.0
_TRUTH_KEYS = {"spec", "programs", "fields"}


class ManifestError(ValueError):
    """A cohort manifest is invalid; the message lists every problem found."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = Path(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid cohort manifest {self.path} ({len(self.problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class SectionEntry:
    """One ST section cut from a volume.

    At most one of `z_um` (an axial plane, um from the centre of slice 0) and `plane`
    (three or more (z, y, x) points in um on a tilted plane) is set; neither when the
    landmark table is 3D (the plane is then fitted to its CT points). `landmarks_*` declare how
    the BigWarp table was made; `spot_pitch_um` is the platform's spot pitch (None: no check).
    """

    id: str
    volume_id: str
    adata: Path
    landmarks: Path
    z_um: float | None = None
    plane: tuple[tuple[float, float, float], ...] | None = None
    landmarks_moving: str = "st"
    landmarks_st_space: str = "fullres"
    landmarks_ct_units: str = "um"
    spot_pitch_um: float | None = VISIUM_PITCH_UM

    @property
    def is_axial(self) -> bool:
        return self.z_um is not None


@dataclass(frozen=True)
class VolumeEntry:
    """One micro-CT volume; `voxel_size_um` is (z, y, x) or None to read it from OME-Zarr."""

    id: str
    image: Path
    voxel_size_um: tuple[float, float, float] | None
    condition: str | None = None
    sections: tuple[SectionEntry, ...] = ()


@dataclass(frozen=True)
class TruthEntry:
    """Where a synthetic cohort keeps its 3D truth."""

    spec: Path | None
    programs: tuple[str, ...]
    fields: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Cohort:
    """A validated cohort manifest with absolute paths."""

    path: Path
    name: str
    volumes: tuple[VolumeEntry, ...]
    truth: TruthEntry | None = None

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def sections(self) -> tuple[SectionEntry, ...]:
        return tuple(s for v in self.volumes for s in v.sections)

    def volume(self, volume_id: str) -> VolumeEntry:
        for v in self.volumes:
            if v.id == volume_id:
                return v
        raise KeyError(f"no volume {volume_id!r} in {self.path}; volumes: {[v.id for v in self.volumes]}")

    def section(self, section_id: str) -> SectionEntry:
        for s in self.sections:
            if s.id == section_id:
                return s
        raise KeyError(f"no section {section_id!r} in {self.path}; sections: {[s.id for s in self.sections]}")


class _Checker:
    """Collects problems instead of stopping at the first one."""

    def __init__(self, root: Path):
        self.root = root
        self.problems: list[str] = []

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def mapping(self, value: Any, where: str, allowed: set[str], required: set[str]) -> dict | None:
        if not isinstance(value, dict):
            self.fail(where, f"expected a mapping, got {type(value).__name__}")
            return None
        for key in sorted(set(value) - allowed):
            self.fail(where, f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
        for key in sorted(required - set(value)):
            self.fail(where, f"missing required key {key!r}")
        return value

    def ident(self, value: Any, where: str, kind: str, seen: set[str]) -> str | None:
        """A valid id of a ``kind`` ("volume", "section") not already in ``seen`` (added to it)."""
        if not isinstance(value, str) or not _ID_PATTERN.match(value):
            self.fail(where, f"id must be a non-empty string of letters, digits, '_', '.', '-'; got {value!r}")
            return None
        if value in seen:
            self.fail(f"{kind} {value!r}", f"duplicate {kind} id")
        seen.add(value)
        return value

    def path(self, value: Any, where: str, *, suffixes: tuple[str, ...] = (),
             accept: Callable[[Path], bool] | None = None) -> Path | None:
        """``value`` as a path (relative to the manifest's folder) that exists, named with one of
        ``suffixes`` unless ``accept`` takes it (e.g. a zarr group without the suffix)."""
        if not isinstance(value, str) or not value:
            self.fail(where, f"expected a path string, got {value!r}")
            return None
        path = Path(value)
        path = path if path.is_absolute() else self.root / path
        if suffixes and not path.name.lower().endswith(suffixes) and not (accept is not None and accept(path)):
            self.fail(where, f"{value!r} has an unsupported extension (expected one of {', '.join(suffixes)})")
        if not path.exists():
            self.fail(where, f"file not found: {path}")
            return None
        return path

    def number(self, value: Any, where: str, *, positive: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, f"expected a number, got {value!r}")
            return None
        if positive and not value > 0:
            self.fail(where, f"must be positive, got {value!r}")
            return None
        return float(value)

    def choice(self, value: Any, where: str, options: tuple[str, ...]) -> str | None:
        if value not in options:
            self.fail(where, f"expected one of {', '.join(options)}, got {value!r}")
            return None
        return value

    def triple(self, value: Any, where: str, *, positive: bool = False) -> tuple[float, float, float] | None:
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            self.fail(where, f"expected a list of 3 numbers [z, y, x], got {value!r}")
            return None
        numbers = [self.number(v, f"{where}[{i}]", positive=positive) for i, v in enumerate(value)]
        return None if any(n is None for n in numbers) else tuple(numbers)  # type: ignore[return-value]


def load_manifest(path: str | Path) -> Cohort:
    """Read and validate a cohort manifest.

    Args:
        path: the `cohort.yaml` file; relative paths inside it are relative to its folder.

    Returns:
        The validated `Cohort`, every path absolute.

    Raises:
        ManifestError: listing every problem (missing file, wrong type, unknown key, ...).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ManifestError(path, ["manifest file not found" if not path.exists() else "not a file"])
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ManifestError(path, [f"not valid YAML: {err}"]) from None

    check = _Checker(path.parent)
    top = check.mapping(raw, "manifest", _TOP_KEYS, {"volumes"})
    if top is None:
        raise ManifestError(path, check.problems)
    name = top.get("name", path.parent.name)
    if not isinstance(name, str):
        check.fail("name", f"expected a string, got {name!r}")

    volumes = _volumes(check, top.get("volumes"))
    declared_ids = {v.get("id") for v in top.get("volumes") or [] if isinstance(v, dict)}
    truth = _truth(check, top["truth"], declared_ids) if "truth" in top else None
    if check.problems:
        raise ManifestError(path, check.problems)
    return Cohort(path=path, name=str(name), volumes=tuple(volumes), truth=truth)


def _volumes(check: _Checker, raw: Any) -> list[VolumeEntry]:
    if not isinstance(raw, list) or not raw:
        check.fail("volumes", "expected a non-empty list of volumes")
        return []
    volumes: list[VolumeEntry] = []
    volume_ids: set[str] = set()
    section_ids: set[str] = set()
    for i, item in enumerate(raw):
        where = f"volumes[{i}]"
        entry = check.mapping(item, where, _VOLUME_KEYS, {"id", "image"})
        if entry is None:
            continue
        vid = check.ident(entry.get("id"), f"{where}.id", "volume", volume_ids)
        if vid is not None:
            where = f"volume {vid!r}"
        image = check.path(entry.get("image"), f"{where}.image", suffixes=_VOLUME_SUFFIXES,
                           accept=lambda p: volume_kind(p) is not None) if "image" in entry else None
        voxel, opened = None, None
        if "voxel_size_um" in entry:
            voxel = check.triple(entry["voxel_size_um"], f"{where}.voxel_size_um", positive=True)
        elif image is not None and volume_kind(image) != "zarr":
            try:  # an OME-TIFF or a calibrated ImageJ stack records it (only the metadata is read)
                opened = open_volume(image)
            except VolumeError as err:
                check.fail(where, f"voxel_size_um is required: {err.problem}")
        condition = entry.get("condition")
        if condition is not None and not isinstance(condition, str):
            check.fail(f"{where}.condition", f"expected a string, got {condition!r}")
        sections = _sections(check, entry.get("sections", []), where, vid or "?", section_ids)
        if image is not None:
            _planes_in_volume(check, image, voxel, sections, opened)
        if image is not None and vid is not None:
            volumes.append(VolumeEntry(vid, image, voxel, condition, tuple(sections)))
    return volumes


def _sections(check: _Checker, raw: Any, where: str, volume_id: str, seen: set[str]) -> list[SectionEntry]:
    if not isinstance(raw, list):
        check.fail(f"{where}.sections", f"expected a list, got {type(raw).__name__}")
        return []
    sections: list[SectionEntry] = []
    for j, item in enumerate(raw):
        swhere = f"{where}.sections[{j}]"
        entry = check.mapping(item, swhere, _SECTION_KEYS, {"id", "adata", "landmarks"})
        if entry is None:
            continue
        sid = check.ident(entry.get("id"), f"{swhere}.id", "section", seen)
        if sid is not None:
            swhere = f"section {sid!r}"
        adata = _adata_path(check, entry.get("adata"), f"{swhere}.adata") if "adata" in entry else None
        landmarks = check.path(entry.get("landmarks"), f"{swhere}.landmarks", suffixes=(".csv", ".json")) if "landmarks" in entry else None
        z_um, plane, placed = None, None, True
        if "z_um" in entry and "plane" in entry:
            check.fail(swhere, "give one of 'z_um' (axial plane) and 'plane' (3+ points [z, y, x] in um), not both")
            placed = False
        elif "z_um" in entry:
            z_um = check.number(entry["z_um"], f"{swhere}.z_um")
            placed = z_um is not None
        elif "plane" in entry:
            plane = _plane(check, entry["plane"], f"{swhere}.plane")
            placed = plane is not None
        elif landmarks is not None:
            placed = _landmarks_are_3d(check, landmarks, swhere)
        declared = {key: check.choice(entry.get(f"landmarks_{key}", options[0]), f"{swhere}.landmarks_{key}", options)
                    for key, options in (("moving", LANDMARKS_MOVING), ("st_space", LANDMARKS_ST_SPACE), ("ct_units", LANDMARKS_CT_UNITS))}
        pitch, pitch_ok = entry.get("spot_pitch_um", VISIUM_PITCH_UM), True
        if pitch is not None:  # null: the platform has no regular spot grid, no pitch check
            pitch = check.number(pitch, f"{swhere}.spot_pitch_um", positive=True)
            pitch_ok = pitch is not None
        if sid and adata and landmarks and placed and pitch_ok and None not in declared.values():
            sections.append(SectionEntry(sid, volume_id, adata, landmarks, z_um, plane,
                                         *(declared[k] for k in ("moving", "st_space", "ct_units")), pitch))
    return sections


def _adata_path(check: _Checker, value: Any, where: str) -> Path | None:
    """An ``.h5ad`` file or a Space Ranger output folder (its required files checked here)."""
    if not isinstance(value, str) or not value:
        return check.path(value, where)
    full = Path(value) if Path(value).is_absolute() else check.root / value
    if full.is_dir():
        try:
            find_spaceranger_files(full)
        except DataError as err:
            check.fail(where, str(err))
            return None
        return full
    if not full.name.lower().endswith(".h5ad"):
        missing = "" if full.exists() else f"; not found: {full}"
        check.fail(where, f"{value!r} is neither an .h5ad file nor a Space Ranger output folder{missing}")
        return None
    return check.path(value, where)


def _landmarks_are_3d(check: _Checker, path: Path, where: str) -> bool:
    """Whether a section without z_um/plane may take its plane from its landmarks (a 3D table)."""
    try:
        ndim = read_landmarks(path).ndim
    except DataError as err:
        check.fail(f"{where}.landmarks", err.problem)
        return False
    if ndim != 3:
        check.fail(where, "give 'z_um' or 'plane': the 2D landmark table carries no CT z "
                          "(only a 3D table lets the plane be fitted to the landmarks)")
        return False
    return True


def _planes_in_volume(check: _Checker, image: Path, voxel: tuple[float, float, float] | None,
                      sections: list[SectionEntry], volume: Any = None) -> None:
    """Each section's z_um / plane must cross the volume (only the volume's metadata is read;
    ``volume``: the image already opened, else it is opened here)."""
    if not any(s.z_um is not None or s.plane is not None for s in sections):
        return
    import numpy as np

    try:
        volume = volume or open_volume(image, voxel)
    except (VolumeError, OSError, ValueError):
        return  # an unreadable volume is reported where it is read
    vs = np.asarray(volume.voxel_size_um)
    lo = np.asarray(volume.origin_um) - vs / 2  # the voxels' footprint, (z, y, x) um
    hi = lo + np.asarray(volume.shape) * vs
    box = ", ".join(f"{a} {l:g}..{h:g}" for a, l, h in zip("zyx", lo, hi))
    for s in sections:
        if s.z_um is not None and not lo[0] <= s.z_um <= hi[0]:
            check.fail(f"section {s.id!r}.z_um", f"{s.z_um:g} um lies outside volume {s.volume_id!r} "
                                                 f"(z {lo[0]:g}..{hi[0]:g} um: {volume.shape[0]} slices of {vs[0]:g} um)")
        elif s.plane is not None:
            try:
                plane = Plane.from_points(s.plane)
            except DataError as err:
                check.fail(f"section {s.id!r}.plane", err.problem)
                continue
            corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
            side = (corners - plane.origin) @ plane.n
            if side.min() > 0 or side.max() < 0:
                check.fail(f"section {s.id!r}.plane", f"the plane does not cross volume {s.volume_id!r} ({box} um)")


def _plane(check: _Checker, raw: Any, where: str) -> tuple[tuple[float, float, float], ...] | None:
    if not isinstance(raw, list) or len(raw) < 3:
        check.fail(where, "expected a list of at least 3 points [z, y, x] in um")
        return None
    points = [check.triple(p, f"{where}[{k}]") for k, p in enumerate(raw)]
    if any(p is None for p in points):
        return None
    import numpy as np

    centred = np.asarray(points) - np.mean(points, axis=0)
    if np.linalg.matrix_rank(centred, tol=1e-6 * max(1.0, float(np.abs(centred).max()))) < 2:
        check.fail(where, "the points are collinear or coincide: they do not define a plane")
        return None
    return tuple(points)  # type: ignore[arg-type]


def _truth(check: _Checker, raw: Any, volume_ids: set[str]) -> TruthEntry | None:
    entry = check.mapping(raw, "truth", _TRUTH_KEYS, {"programs"})
    if entry is None:
        return None
    spec = check.path(entry["spec"], "truth.spec") if "spec" in entry else None
    programs = entry.get("programs")
    if not isinstance(programs, list) or not programs or not all(isinstance(p, str) for p in programs):
        check.fail("truth.programs", f"expected a non-empty list of program names, got {programs!r}")
        programs = []
    fields: dict[str, Path] = {}
    raw_fields = entry.get("fields", {})
    if not isinstance(raw_fields, dict):
        check.fail("truth.fields", "expected a mapping of volume id -> path")
    else:
        for vid, value in raw_fields.items():
            if vid not in volume_ids:
                check.fail(f"truth.fields.{vid}", "names a volume that the manifest does not list")
            p = check.path(value, f"truth.fields.{vid}")
            if p is not None:
                fields[vid] = p
    return TruthEntry(spec, tuple(programs), fields)
