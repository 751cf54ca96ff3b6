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
from typing import Any

import yaml

from xpression.data.volume import TIFF_SUFFIXES, ZARR_SUFFIXES

__all__ = ["Cohort", "ManifestError", "SectionEntry", "TruthEntry", "VolumeEntry", "load_manifest"]

_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
_VOLUME_SUFFIXES = (*ZARR_SUFFIXES, *TIFF_SUFFIXES, ".npy")  # what the volume reader opens
_TOP_KEYS = {"name", "volumes", "truth", "description"}
_VOLUME_KEYS = {"id", "image", "voxel_size_um", "condition", "sections"}
_SECTION_KEYS = {"id", "adata", "landmarks", "z_um", "plane"}
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

    Exactly one of `z_um` (an axial plane, um from the centre of slice 0) and `plane`
    (three or more (z, y, x) points in um on a tilted plane) is set.
    """

    id: str
    volume_id: str
    adata: Path
    landmarks: Path
    z_um: float | None = None
    plane: tuple[tuple[float, float, float], ...] | None = None

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

    def path(self, value: Any, where: str, *, suffixes: tuple[str, ...] = ()) -> Path | None:
        if not isinstance(value, str) or not value:
            self.fail(where, f"expected a path string, got {value!r}")
            return None
        path = Path(value)
        path = path if path.is_absolute() else self.root / path
        if suffixes and not path.name.lower().endswith(suffixes):
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
        image = check.path(entry.get("image"), f"{where}.image", suffixes=_VOLUME_SUFFIXES) if "image" in entry else None
        voxel = None
        if "voxel_size_um" in entry:
            voxel = check.triple(entry["voxel_size_um"], f"{where}.voxel_size_um", positive=True)
        elif image is not None and not image.name.lower().endswith(".zarr"):
            check.fail(where, "voxel_size_um is required for TIFF and .npy volumes (only OME-Zarr carries it)")
        condition = entry.get("condition")
        if condition is not None and not isinstance(condition, str):
            check.fail(f"{where}.condition", f"expected a string, got {condition!r}")
        sections = _sections(check, entry.get("sections", []), where, vid or "?", section_ids)
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
        adata = check.path(entry.get("adata"), f"{swhere}.adata", suffixes=(".h5ad",)) if "adata" in entry else None
        landmarks = check.path(entry.get("landmarks"), f"{swhere}.landmarks", suffixes=(".csv",)) if "landmarks" in entry else None
        z_um, plane = None, None
        if ("z_um" in entry) == ("plane" in entry):
            check.fail(swhere, "give exactly one of 'z_um' (axial plane) and 'plane' (3+ points [z, y, x] in um)")
        elif "z_um" in entry:
            z_um = check.number(entry["z_um"], f"{swhere}.z_um")
        else:
            plane = _plane(check, entry["plane"], f"{swhere}.plane")
        if sid and adata and landmarks and (z_um is not None or plane is not None):
            sections.append(SectionEntry(sid, volume_id, adata, landmarks, z_um, plane))
    return sections


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
