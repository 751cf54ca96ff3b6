"""The spot table of an ensemble: its members' ``predictions.csv`` as one.

An ensemble's map is the mean of its members, and each member may have drawn its own split
(``seed=0,1,2`` without ``data.seed``), so no single member's held-out spots or training spots
describe what the ensemble saw. Per spot (matched by section and barcode):

- ``pred/<target>`` (and ``ridge/<target>`` where every member has it): the members' mean;
- ``split``: ``train`` if any member trained on it (the ensemble has seen its label), ``test`` if
  every member held it out for testing, ``val`` if every member held it out (some selected their
  weights on it), else ``excluded`` (a split buffer of some member: not scored).

Held-out scores of the ensemble are then honest (no member saw those labels), and the baselines
without CT are built from the union of the members' training spots, the labels the ensemble
learnt from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["ensemble_spot_table"]

_KEY = ["section_id", "barcode"]


def ensemble_spot_table(run_dirs: Sequence[str | Path], targets: Sequence[str]) -> pd.DataFrame | None:
    """One spot table for the members in ``run_dirs`` (see the module doc); the spots every
    member scored, in member 0's order. None when a member has no ``predictions.csv`` or lacks
    the ``true/`` and ``pred/`` columns of ``targets``."""
    tables = []
    for run in run_dirs:
        path = Path(run) / "predictions.csv"
        if not path.is_file():
            return None
        table = pd.read_csv(path)
        needed = _KEY + ["split"] + [f"{p}/{t}" for p in ("true", "pred") for t in targets]
        if not set(needed) <= set(table.columns):
            return None
        tables.append(table.set_index(_KEY))
    common = tables[0].index
    for t in tables[1:]:
        common = common.intersection(t.index, sort=False)
    tables = [t.loc[common] for t in tables]
    out = tables[0].copy()
    for prefix in ("pred", "ridge"):
        cols = [f"{prefix}/{t}" for t in targets]
        if all(set(cols) <= set(t.columns) for t in tables):
            out[cols] = np.mean([t[cols].to_numpy(float) for t in tables], axis=0)
        else:
            out = out.drop(columns=[c for c in cols if c in out.columns])
    splits = np.stack([t["split"].astype(str).to_numpy() for t in tables])
    held = np.isin(splits, ("val", "test")).all(axis=0)
    out["split"] = np.select([(splits == "train").any(axis=0), (splits == "test").all(axis=0), held],
                             ["train", "test", "val"], "excluded")
    return out.reset_index()
