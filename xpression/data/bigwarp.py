"""BigWarp landmark files, read as BigWarp writes them.

BigWarp (Fiji) saves its landmark table (``LandmarkTableModel.save``) as a CSV through opencsv's
``CSVWriter``: every field quoted, no header, one row per landmark::

    name, active, moving x, moving y[, moving z], fixed x, fixed y[, fixed z]

6 columns for 2D, 8 for 3D; numbers in Java's ``Double.toString`` form (``812.8``,
``1.0E-4``, ``Infinity``). A point not yet placed on one side is ``Infinity`` and its row is
inactive. Newer BigWarp versions read an integer ``Id`` column after ``active`` (7 / 9
columns) and also keep the table as JSON (``{"type": "BigWarpLandmarks", "numDimensions",
"movingPoints", "fixedPoints", "active", "names"}``, on its own, under ``"landmarks"`` of a
transform file, or under ``"Transform"`` of a settings file). All of these are read here, quoted or not, with or without a header row.
Which side is the ST image and in which units is the manifest's business (see
:mod:`xpression.data.registration`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpression.data.geometry import DataError

__all__ = ["BigWarpLandmarks", "read_landmarks"]

# columns -> (dimensions, has an Id column)
_LAYOUTS = {6: (2, False), 7: (2, True), 8: (3, False), 9: (3, True)}


@dataclass(frozen=True)
class BigWarpLandmarks:
    """One BigWarp landmark table. ``moving`` and ``fixed`` are (N, ndim) in BigWarp's
    ``(x, y[, z])`` order and units; unplaced points are ``inf``."""

    path: Path
    ndim: int
    names: tuple[str, ...]
    active: np.ndarray
    moving: np.ndarray
    fixed: np.ndarray

    def used(self) -> "BigWarpLandmarks":
        """The active rows; raises :class:`DataError` naming an active landmark with an unplaced
        (``Infinity``) or NaN coordinate."""
        for i in np.flatnonzero(self.active):
            for side, pts in (("moving", self.moving), ("fixed", self.fixed)):
                if not np.all(np.isfinite(pts[i])):
                    raise DataError(
                        self.path,
                        f"landmark {self.names[i]!r} is active but its {side} point is not set "
                        f"({', '.join(map(str, pts[i]))}); place it in BigWarp or deactivate the row",
                    )
        keep = self.active
        return BigWarpLandmarks(
            self.path, self.ndim, tuple(n for n, k in zip(self.names, keep) if k),
            np.ones(int(keep.sum()), dtype=bool), self.moving[keep], self.fixed[keep],
        )


def _as_bool(text: str) -> bool | None:
    t = text.strip().lower()
    return True if t in ("true", "1", "yes") else False if t in ("false", "0", "no") else None


def _numbers(cells: list[str]) -> list[float] | None:
    try:
        return [float(c) for c in cells]  # float() reads Java's "1.0E-4", "Infinity", "NaN"
    except ValueError:
        return None


def _is_header(row: list[str], first: int) -> bool:
    """BigWarp writes no header, but a table copied elsewhere may carry one ("Name", "Active",
    "mvg-x", ...): a first row whose flag and coordinates are all words."""
    return _as_bool(row[1]) is None and all(_numbers([c]) is None for c in row[first:])


def _read_csv(path: Path) -> BigWarpLandmarks:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [(i, [c.strip() for c in row]) for i, row in enumerate(csv.reader(fh), start=1)
                if row and any(c.strip() for c in row)]
    if not rows:
        raise DataError(path, "the landmark file is empty")
    width = len(rows[0][1])
    if width not in _LAYOUTS:
        raise DataError(
            path,
            f"line {rows[0][0]}: {width} columns; a BigWarp landmark CSV has 6 (2D: name, active, moving x, y, "
            "fixed x, y) or 8 (3D: name, active, moving x, y, z, fixed x, y, z)",
        )
    ndim, has_id = _LAYOUTS[width]
    first = 3 if has_id else 2
    if _is_header(rows[0][1], first):
        rows = rows[1:]
    names, active, coords = [], [], []
    for line, row in rows:
        if len(row) != width:
            raise DataError(path, f"line {line}: {len(row)} columns, the file's first row has {width}")
        flag = _as_bool(row[1])
        if flag is None:
            raise DataError(path, f"line {line}: 'active' must be true or false, got {row[1]!r}")
        values = _numbers(row[first:])
        if values is None:
            raise DataError(path, f"line {line}: coordinates are not numbers: {row[first:]}")
        names.append(row[0])
        active.append(flag)
        coords.append(values)
    arr = np.asarray(coords, dtype=float).reshape(-1, 2 * ndim)
    return BigWarpLandmarks(path, ndim, tuple(names), np.asarray(active, dtype=bool), arr[:, :ndim], arr[:, ndim:])


def _read_json(path: Path) -> BigWarpLandmarks:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))  # Python's json reads Gson's Infinity/NaN
    except ValueError as err:
        raise DataError(path, f"not valid JSON ({err})") from None
    table = doc
    for key in ("Transform", "landmarks"):  # a settings file > its transform > the landmark table
        if isinstance(table, dict) and isinstance(table.get(key), dict):
            table = table[key]
    keys = ("numDimensions", "movingPoints", "fixedPoints", "active", "names")
    if not isinstance(table, dict) or any(k not in table for k in keys):
        raise DataError(path, f"not a BigWarp landmark JSON: expected the keys {', '.join(keys)} "
                              "(on their own, under 'landmarks' or under 'Transform' > 'landmarks')")
    ndim = table["numDimensions"]
    n = len(table["names"])
    try:
        moving = np.asarray(table["movingPoints"], dtype=float).reshape(n, -1)
        fixed = np.asarray(table["fixedPoints"], dtype=float).reshape(n, -1)
        active = [bool(a) for a in table["active"]]
    except (TypeError, ValueError) as err:
        raise DataError(path, f"malformed BigWarp landmark JSON ({err})") from None
    if ndim not in (2, 3) or moving.shape[1] != ndim or fixed.shape[1] != ndim or len(active) != n:
        raise DataError(path, f"malformed BigWarp landmark JSON: numDimensions {ndim!r}, {n} names, "
                              f"points {moving.shape} / {fixed.shape}, {len(active)} active flags")
    return BigWarpLandmarks(path, int(ndim), tuple(str(s) for s in table["names"]), np.asarray(active, dtype=bool), moving, fixed)


def read_landmarks(path: str | Path) -> BigWarpLandmarks:
    """Read a BigWarp landmark table (``.csv`` or ``.json``); raises :class:`DataError` naming
    the file (and line) of any problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "landmark file not found")
    try:
        return _read_json(path) if path.suffix.lower() == ".json" else _read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"cannot read landmark file ({err})") from err
