"""Offline lever test: morphological structure features, computed densely at full resolution.

    python benchmarks/structure_features.py FOREST_MULTIRUN OUT [COHORT_DIR]
    python benchmarks/mixed_ensemble.py FOREST_MULTIRUN OUT --weight-b 1.0   # paired by seed with the forest

The forest (``model=forest``) reads a filter bank at the patch's centre; its wide scales come from
the context view, a low-pass filtered, subsampled copy of the volume, so its "air" and "bright"
shares are thresholds of local means, and nothing in it tells an airway's lumen from alveolar air
by size. The cohort's programs follow airway walls, vessels and lesions (docs/phantom.md). This
script tests, outside the model code, whether features that name those structures do better:
per volume, on the full-resolution voxels (6.4 um here), with intensities scaled to each
volume's 0.5-99.5 % range and smoothed by one voxel,

- masks: air (< 0.2), solid (> 0.45 with no air within about 13 um: lesion infiltrate, vessel
  lumen, walls), bright (> 0.8: walls);
- each mask opened by balls of several radii (air 0-9 voxels: alveoli vanish before airway lumen
  does; solid 0-8; bright 0-1), and for each opened mask its signed distance (um, capped at 300)
  and its Gaussian-weighted share at 25.6, 51.2 and 102.4 um;
- the intensity's Gaussian mean and sd at 12.8-204.8 um;

52 features, each averaged over a spot's disk (19 points, as the cohort's spot labels are). The
thresholds were set once from the cohort's attenuation table (air 0.03, paraffin 0.30, tissue
0.72, walls 0.85) before any score was seen, and not tuned; a real scan would need its own.

It reads the forest runs of ``FOREST_MULTIRUN`` for their training spots, split and labels
(``predictions.csv``: the spots' registered positions) and their probe points
(``probe_points.csv``), fits the same extremely randomised trees (300 trees, leaves of 3 spots,
half the features per split, the run's seed) on the training spots, prints the held-out spots'
r beside the forest's and writes ``OUT/<run>/probe_points.csv`` with the new answers in the
``model/`` columns (config.yaml and metrics.json copied), for ``mixed_ensemble.py``.
"""
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import ndimage as ndi
from sklearn.ensemble import ExtraTreesRegressor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xpression.data.manifest import load_manifest  # noqa: E402
from xpression.data.volume import open_volume  # noqa: E402

if len(sys.argv) not in (3, 4):
    raise SystemExit(__doc__.split("\n\n")[1])
SRC = Path(sys.argv[1])  # forest multirun
OUT = Path(sys.argv[2])
COHORT = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).resolve().parents[1] / "data/phantom_benchmark"
VOX = 6.4  # um; checked against the cohort's manifest below
PROGS = ["alveolar", "airway", "vascular", "infected", "immune", "remodelling"]
CAP = 300.0


def opened(mask, r):
    if r == 0:
        return mask
    inner = ndi.distance_transform_edt(mask) > r
    return ndi.distance_transform_edt(~inner) <= r


def dense_features(vid):
    entry = next(v for v in load_manifest(COHORT / "cohort.yaml").volumes if v.id == vid)
    v = np.asarray(open_volume(entry.image, entry.voxel_size_um)[:, :, :], np.float32)
    lo, hi = np.percentile(v[::2, ::4, ::4], [0.5, 99.5])
    x = (v - lo) / (hi - lo)
    g = ndi.gaussian_filter(x, 1.0)
    feats, names = [], []
    air = g < 0.2
    solid = ndi.gaussian_filter(air.astype(np.float32), 2.0) < 0.03
    solid &= g > 0.45
    bright = g > 0.8
    for label, base, radii in (("air", air, (0, 2, 4, 6, 9)), ("solid", solid, (0, 2, 4, 8)), ("bright", bright, (0, 1))):
        for r in radii:
            m = opened(base, r)
            d_out = np.minimum(ndi.distance_transform_edt(~m) * VOX, CAP)
            d_in = np.minimum(ndi.distance_transform_edt(m) * VOX, CAP)
            feats.append((d_out - d_in).astype(np.float32)); names.append(f"{label}{r}_sdist")
            mf = m.astype(np.float32)
            for s_um in (25.6, 51.2, 102.4):
                feats.append(ndi.gaussian_filter(mf, s_um / VOX)); names.append(f"{label}{r}_frac{s_um:g}")
    for s_um in (12.8, 51.2, 102.4, 204.8):
        mu = ndi.gaussian_filter(x, s_um / VOX)
        feats.append(mu); names.append(f"mean{s_um:g}")
        feats.append(np.sqrt(np.clip(ndi.gaussian_filter(x * x, s_um / VOX) - mu * mu, 0, None))); names.append(f"sd{s_um:g}")
    return feats, names


def sample(feats, pts_um):
    """Mean over a 55 um disk (centre + 6 at 0.45 r + 12 at 0.85 r) of trilinear samples."""
    r = 27.5
    offs = [(0.0, 0.0)] + [(0.45 * r * np.cos(a), 0.45 * r * np.sin(a)) for a in np.arange(6) * np.pi / 3] \
        + [(0.85 * r * np.cos(a), 0.85 * r * np.sin(a)) for a in np.arange(12) * np.pi / 6]
    out = np.zeros((len(pts_um), len(feats)), np.float64)
    for dy, dx in offs:
        c = (pts_um + np.array([0.0, dy, dx])) / VOX
        for j, f in enumerate(feats):
            out[:, j] += ndi.map_coordinates(f, c.T, order=1, mode="nearest")
    return out / len(offs)


def main():
    for v in load_manifest(COHORT / "cohort.yaml").volumes:
        if [float(x) for x in open_volume(v.image, v.voxel_size_um).voxel_size_um] != [VOX] * 3:
            raise SystemExit(f"error: {v.id} does not have {VOX} um voxels, which this script assumes")
    runs = sorted(p.parent for p in SRC.rglob("probe_points.csv"))
    spots = {r: pd.read_csv(r / "predictions.csv") for r in runs}
    probes = {r: pd.read_csv(r / "probe_points.csv") for r in runs}
    vids = sorted(set(pd.concat([probes[r].volume_id for r in runs]).unique()) | set(pd.concat([spots[r].volume_id for r in runs]).unique()))
    fs, fp = {r: None for r in runs}, {r: None for r in runs}
    for vid in vids:
        t0 = time.time()
        feats, names = dense_features(vid)
        for r in runs:
            s, p = spots[r], probes[r]
            for tab, store in ((s, fs), (p, fp)):
                idx = np.flatnonzero(tab.volume_id.values == vid)
                if not len(idx):
                    continue
                if store[r] is None:
                    store[r] = np.full((len(tab), len(feats)), np.nan)
                store[r][idx] = sample(feats, tab[["z_um", "y_um", "x_um"]].values[idx])
        del feats
        print(f"{vid}: {len(names)} features, {time.time() - t0:.0f} s", flush=True)
    for r in runs:
        s, p = spots[r], probes[r]
        tr = (s.split == "train").values
        y = s[[f"true/{k}" for k in PROGS]].values
        seed = int(yaml.safe_load((r / "config.yaml").read_text())["seed"])
        et = ExtraTreesRegressor(300, min_samples_leaf=3, max_features=0.5, random_state=seed, n_jobs=2).fit(fs[r][tr], y[tr])
        def pred(X):
            q = np.clip(et.predict(X), 0, None)
            return q / q.sum(1, keepdims=True)
        held = s.split.isin(["val", "test"]).values
        ps = pred(fs[r])
        for vid in sorted(s.volume_id.unique()):
            m = held & (s.volume_id.values == vid)
            rr = [np.corrcoef(ps[m, k], y[m, k])[0, 1] for k in range(6)]
            rf = [np.corrcoef(s[f"pred/{p_}"].values[m], y[m, k])[0, 1] for k, p_ in enumerate(PROGS)]
            print(f"seed {seed} {vid} held-out spots ({m.sum()}): struct r {np.nanmean(rr):.3f}  forest r {np.nanmean(rf):.3f}")
        dst = OUT / r.name
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("config.yaml", "metrics.json"):
            shutil.copy(r / f, dst / f)
        q = p.copy()
        q[[f"model/{k}" for k in PROGS]] = pred(fp[r])
        q.to_csv(dst / "probe_points.csv", index=False)
        imp = pd.Series(et.feature_importances_, index=names).sort_values(ascending=False)
        print("top features:", ", ".join(f"{k} {v:.3f}" for k, v in imp.head(8).items()))


if __name__ == "__main__":
    main()
