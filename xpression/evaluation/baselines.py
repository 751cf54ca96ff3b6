"""Baselines that use no CT: what a model must beat before its CT input counts for anything.

Every baseline is a function of a run's *training spots* (3D position, section, volume and the
label the model was trained on) and of query points (um); none reads an image and none knows
how the truth was made.

- **2D extrusion** (``extrusion``): a point takes the label of the nearest training spot of its
  volume, measured in the section plane after projecting the point along the section normal:
  the section's label map copied up and down through the volume. On a held-out spot of the
  section itself this is the label of the nearest training spot. With several trained sections
  in one volume, the point uses the section plane nearest to it.
- **spatial kNN** (``knn``): the mean label of the ``k`` nearest training spots, in-plane as
  above; ``k = KNN_K = 6``, the ring of neighbours around a Visium spot on its hexagonal grid.
- **per-animal mean** (``animal_mean``): the mean label of the training spots of the point's
  volume (constant within a volume, so its correlations are n/a; its R^2, MSE and JSD say how
  far the volume's average composition alone gets). For a volume with no training section it
  is the mean over all training spots, the same as ``train_mean``.
- **training mean** (``train_mean``): the mean label of all training spots, everywhere.
- **section extrusion** (``section_extrusion``, away from the section only): 2D extrusion from
  *every* spot of the section, held-out ones included: what copying the whole measured section
  gives, with labels the model never trained on. It is a reference, not a paired baseline (on
  the section's own spots it would copy their labels).

Extrusion and kNN need a training section in the point's volume; elsewhere they are absent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from xpression.data.geometry import DataError, Plane

log = logging.getLogger(__name__)

__all__ = ["KNN_K", "BASELINES", "TrainingSpots", "baseline_predictions"]

KNN_K = 6
BASELINES = ("extrusion", "knn", "animal_mean", "train_mean", "section_extrusion")


@dataclass
class TrainingSpots:
    """The training spots of a run: ``points_um`` ``(N, 3)`` (z, y, x) um, ``labels`` ``(N, T)``,
    ``section_ids`` and ``volume_ids`` ``(N,)``."""

    points_um: np.ndarray
    labels: np.ndarray
    section_ids: np.ndarray
    volume_ids: np.ndarray
    _sections: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_table(cls, table: pd.DataFrame, label_columns: Sequence[str], split: str | None = "train") -> "TrainingSpots":
        """The rows of a spot table (columns ``split``, ``section_id``, ``volume_id``, ``z_um``,
        ``y_um``, ``x_um`` and ``label_columns``) whose split is ``split`` (None: every row)."""
        rows = table if split is None else table[table["split"] == split]
        if rows.empty:
            raise ValueError(f"no {split!r} spots in the spot table: the baselines need training spots")
        return cls(rows[["z_um", "y_um", "x_um"]].to_numpy(float), rows[list(label_columns)].to_numpy(float),
                   rows["section_id"].astype(str).to_numpy(), rows["volume_id"].astype(str).to_numpy())

    def sections_of(self, volume_id: str) -> list[tuple[Plane, cKDTree, np.ndarray]]:
        """Per trained section of the volume: its plane (fitted through its spots), a KD-tree of
        its training spots' in-plane (u, v) um, and their labels."""
        if volume_id not in self._sections:
            out = []
            for sid in dict.fromkeys(self.section_ids[self.volume_ids == volume_id]):
                rows = self.section_ids == sid
                try:
                    plane = Plane.from_points(self.points_um[rows], where=f"training spots of section {sid}")
                except DataError as err:  # fewer than 3 or collinear training spots: no plane to extrude
                    log.warning("no extrusion or kNN baseline from section %s: %s", sid, err)
                    continue
                uv = plane.to_uvw(self.points_um[rows])[:, :2]
                out.append((plane, cKDTree(uv), self.labels[rows]))
            self._sections[volume_id] = out
        return self._sections[volume_id]

    def in_plane_mean(self, volume_id: str, points_um: np.ndarray, k: int) -> np.ndarray | None:
        """Mean label of the ``k`` nearest training spots in the plane of the nearest trained
        section of ``volume_id``, ``(M, T)``; None when the volume has no training section."""
        sections = self.sections_of(volume_id)
        if not sections:
            return None
        pts = np.asarray(points_um, float).reshape(-1, 3)
        uvw = [plane.to_uvw(pts) for plane, _, _ in sections]
        nearest = np.argmin(np.stack([np.abs(c[:, 2]) for c in uvw]), axis=0)
        out = np.empty((len(pts), self.labels.shape[1]))
        for s, (_, tree, labels) in enumerate(sections):
            rows = nearest == s
            if rows.any():
                kk = min(int(k), len(labels))
                _, idx = tree.query(uvw[s][rows, :2], k=kk)
                out[rows] = labels[np.asarray(idx).reshape(int(rows.sum()), kk)].mean(axis=1)
        return out

    def animal_mean(self, volume_id: str) -> tuple[np.ndarray, bool]:
        """Mean label ``(T,)`` of the volume's training spots, and True; for a volume without
        training spots the mean over all training spots, and False."""
        rows = self.volume_ids == volume_id
        return (self.labels[rows].mean(0), True) if rows.any() else (self.labels.mean(0), False)


def baseline_predictions(train: TrainingSpots, volume_id: str, points_um: np.ndarray,
                         k: int = KNN_K, section: TrainingSpots | None = None) -> dict[str, np.ndarray]:
    """Every baseline's prediction ``(M, T)`` at points of one volume (``BASELINES`` order;
    ``extrusion`` and ``knn`` only where the volume has a training section;
    ``section_extrusion`` only with ``section``, every spot of the sections)."""
    pts = np.asarray(points_um, float).reshape(-1, 3)
    out: dict[str, np.ndarray] = {}
    ext = train.in_plane_mean(volume_id, pts, 1)
    if ext is not None:
        out["extrusion"] = ext
        out["knn"] = train.in_plane_mean(volume_id, pts, k)
    out["animal_mean"] = np.broadcast_to(train.animal_mean(volume_id)[0], (len(pts), train.labels.shape[1]))
    out["train_mean"] = np.broadcast_to(train.labels.mean(0), (len(pts), train.labels.shape[1]))
    whole = None if section is None else section.in_plane_mean(volume_id, pts, 1)
    if whole is not None:
        out["section_extrusion"] = whole
    return out
