"""Open an ``infer.py`` output in napari: CT, maps, uncertainty, gene maps and spots, in um.

```
python -m xpression.view OUTPUT_DIR [--volume ID] [--screenshot out.png]
```

``OUTPUT_DIR`` is an ``infer.py`` output (one folder per volume) or one volume's folder (holding
``maps.ome.zarr``). Layers, all in the volume's physical frame in micrometres (each image
layer's ``scale`` is its grid spacing and ``translate`` the position of its first voxel, so
layers of different grids overlay): the CT preview (``ct_preview.ome.zarr``), one layer per map
channel (``<target>``; channels named ``<target>_sd`` become hidden uncertainty layers), one
hidden layer per gene of ``genes.ome.zarr``, and the run's ST spots of this volume as points
(from the run's ``predictions.csv``, coloured by their dominant target, 55 um across).

napari is an optional extra (``pip install -e .[viewer]``); :func:`build_layers` needs none of it
and returns napari's layer-data tuples ``(data, kwargs, layer type)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ViewError", "volume_folders", "build_layers", "main"]

SPOT_DIAMETER_UM = 55.0
UNITS = ("um", "um", "um")  # napari's per-axis layer units (>= 0.6): the scale bar reads them
_MAP_COLORMAPS = ["magma", "viridis", "cividis", "inferno", "plasma", "turbo"]


class ViewError(ValueError):
    """An output folder that cannot be shown."""


def volume_folders(output_dir: str | Path) -> dict[str, Path]:
    """``{volume_id: folder holding maps.ome.zarr}`` of an ``infer.py`` output (or one volume's folder)."""
    root = Path(output_dir)
    if not root.is_dir():
        raise ViewError(f"{root} is not a folder (give an infer.py output folder)")
    if (root / "maps.ome.zarr").is_dir():
        return {root.name: root}
    found = {p.parent.name: p.parent for p in sorted(root.glob("*/maps.ome.zarr"))}
    if not found:
        raise ViewError(f"{root} holds no maps.ome.zarr (neither directly nor in a volume subfolder)")
    return found


def _ome(path: Path) -> tuple[Any, dict, list[float], list[float]]:
    """Level-0 array of an OME-Zarr written here, its attributes, and its z, y, x scale and
    translation in um (from the multiscale's first dataset)."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    ms = attrs["ome"]["multiscales"][0]
    axes = [a["name"] for a in ms["axes"]]
    transforms = {t["type"]: t for t in ms["datasets"][0]["coordinateTransformations"]}
    scale = transforms["scale"]["scale"]
    shift = transforms.get("translation", {}).get("translation", [0.0] * len(scale))
    space = [axes.index(a) for a in "zyx"]
    return group[ms["datasets"][0]["path"]], attrs, [float(scale[i]) for i in space], [float(shift[i]) for i in space]


def _hex_rgba(color: str) -> list[float]:
    from matplotlib.colors import to_rgba

    return list(to_rgba(color))


def _window(channel: dict | None, default: tuple[float, float]) -> list[float]:
    w = (channel or {}).get("window") or {}
    lo, hi = float(w.get("start", default[0])), float(w.get("end", default[1]))
    return [lo, hi if hi > lo else lo + 1e-6]


def _map_layers(path: Path) -> list[tuple[Any, dict, str]]:
    arr, attrs, scale, shift = _ome(path)
    meta = attrs.get("xpression", {})
    names = list(meta.get("targets") or [c["label"] for c in attrs["ome"]["omero"]["channels"]])
    colors = meta.get("target_colors")
    channels = attrs["ome"].get("omero", {}).get("channels") or [None] * len(names)
    genes = meta.get("kind") == "imputed gene expression"
    layers = []
    shown = 0
    for c, name in enumerate(names):
        sd = name.endswith("_sd")
        kwargs: dict[str, Any] = {"name": f"{name} (imputed)" if genes else name.replace("_sd", " sd") if sd else name,
                                  "scale": scale, "translate": shift, "units": UNITS, "blending": "additive", "opacity": 0.8}
        if genes:
            kwargs.update(colormap="inferno", visible=False, contrast_limits=_window(channels[c], (0.0, 1.0)),
                          metadata={"gene": name, "units": meta.get("units")})
        elif sd:
            kwargs.update(colormap="viridis", visible=False, contrast_limits=_window(channels[c], (0.0, 0.25)))
        else:
            base = name
            kwargs.update(colormap=_colormap(colors[c] if colors and c < len(colors) else None, shown),
                          visible=shown == 0, contrast_limits=[0.0, 1.0] if meta.get("target_kind", "composition") == "composition"
                          else _window(channels[c], (0.0, 1.0)))
            kwargs["metadata"] = {"target": base}
            shown += 1
        layers.append((_Channel(arr, c), kwargs, "image"))
    return layers


def _colormap(color: str | None, i: int) -> Any:
    """A colour shades from black (napari's custom colormap dict), else a named colormap."""
    if color is None:
        return _MAP_COLORMAPS[i % len(_MAP_COLORMAPS)]
    return {"colors": [[0.0, 0.0, 0.0, 1.0], _hex_rgba(color)], "name": f"to_{color.lstrip('#')}"}


class _Channel:
    """Channel ``c`` of a ``(C, z, y, x)`` zarr array as a lazy 3D array (napari reads planes)."""

    def __init__(self, arr: Any, c: int):
        self.arr, self.c = arr, c
        self.shape = tuple(arr.shape[1:])
        self.dtype = np.dtype(arr.dtype)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self.arr[(self.c,) + key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self.arr[self.c])
        return out if dtype is None else out.astype(dtype)


def _spot_layer(folder: Path, volume_id: str, meta: dict) -> tuple[Any, dict, str] | None:
    import pandas as pd

    run_dir = (meta.get("identity") or {}).get("run_dir")
    path = Path(run_dir) / "predictions.csv" if run_dir else None
    if path is None or not path.is_file():
        return None
    table = pd.read_csv(path)
    rows = table[table["volume_id"].astype(str) == volume_id] if "volume_id" in table else table.iloc[:0]
    if rows.empty:
        return None
    names = list(meta.get("targets") or [])
    dominant = rows["dominant"].astype(str).to_numpy() if "dominant" in rows else np.array(["spot"] * len(rows))
    colors = meta.get("target_colors")
    palette = {n: _hex_rgba(c) for n, c in zip(names, colors) if c} if colors else {}
    # without colours of their own, each target keeps the one the check overlay and the depth plots
    # give it (matplotlib's C0..C9 by the target's place), whichever targets this volume's spots show
    from matplotlib.colors import to_hex

    cycle = {n: _hex_rgba(to_hex(f"C{i % 10}")) for i, n in enumerate(names)}
    face = [palette.get(d) or cycle.get(d) or _hex_rgba("#7f7f7f") for d in dominant]
    features = {"barcode": rows["barcode"].astype(str).to_numpy() if "barcode" in rows else np.arange(len(rows)),
                "split": rows["split"].astype(str).to_numpy() if "split" in rows else np.array([""] * len(rows)),
                "dominant": dominant}
    kwargs = {"name": "spots (dominant target)", "size": SPOT_DIAMETER_UM, "units": UNITS, "face_color": np.asarray(face),
              "border_color": "white", "border_width": 0.05, "features": features, "out_of_slice_display": False,
              "opacity": 0.9}
    return rows[["z_um", "y_um", "x_um"]].to_numpy(float), kwargs, "points"


def build_layers(output_dir: str | Path, volume_id: str | None = None) -> list[tuple[Any, dict, str]]:
    """napari layer-data tuples ``(data, kwargs, "image" | "points")`` for one volume of an
    ``infer.py`` output, every layer in um (see the module doc); bottom layer first."""
    folders = volume_folders(output_dir)
    if volume_id is None:
        volume_id = next(iter(folders))
    if volume_id not in folders:
        raise ViewError(f"no volume {volume_id!r} in {output_dir}; volumes: {sorted(folders)}")
    folder = folders[volume_id]
    layers: list[tuple[Any, dict, str]] = []
    if (folder / "ct_preview.ome.zarr").is_dir():
        ct, _, scale, shift = _ome(folder / "ct_preview.ome.zarr")
        finite = np.asarray(ct[ct.shape[0] // 2], np.float32)
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 255.0)
        layers.append((ct, {"name": "CT", "colormap": "gray", "scale": scale, "translate": shift, "units": UNITS,
                            "contrast_limits": [float(lo), float(max(hi, lo + 1))]}, "image"))
    layers += _map_layers(folder / "maps.ome.zarr")
    if (folder / "genes.ome.zarr").is_dir():
        layers += _map_layers(folder / "genes.ome.zarr")
    _, attrs, _, _ = _ome(folder / "maps.ome.zarr")
    spots = _spot_layer(folder, volume_id, attrs.get("xpression", {}))
    if spots is not None:
        layers.append(spots)
    return layers


def open_viewer(layers: list[tuple[Any, dict, str]], title: str, show: bool = True) -> Any:
    """A napari viewer with ``layers``, the scale bar in um; raises :class:`ViewError` without napari."""
    try:
        import napari
    except ImportError:
        # the interpreter running this, which may not be the first pip on the PATH
        raise ViewError(f"napari is not installed: {sys.executable} -m pip install -e '.[viewer]' "
                        "(in the repository)") from None
    viewer = napari.Viewer(title=title, show=show)
    for data, kwargs, kind in layers:
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.9 keeps the overlays there
    scale_bar = canvas.overlays["scale_bar"] if canvas is not None else viewer.scale_bar
    scale_bar.visible = True  # in the layers' units (um)
    scale_bar.position = "bottom_left"
    spots = [d for d, _, kind in layers if kind == "points"]
    if spots and len(spots[0]):
        viewer.dims.set_point(0, float(np.median(spots[0][:, 0])))  # open on the section's plane
    return viewer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpression.view", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="an infer.py output folder (or one volume's folder in it)")
    parser.add_argument("--volume", default=None, help="volume id (default: the first)")
    parser.add_argument("--screenshot", default=None, help="save a screenshot of the window to this PNG and exit")
    parser.add_argument("--ndisplay", type=int, choices=(2, 3), default=2, help="2D slices or 3D rendering")
    args = parser.parse_args(argv)
    if args.screenshot and Path(args.screenshot).exists():
        print(f"error: --screenshot {args.screenshot} exists; name another file (nothing is overwritten)", file=sys.stderr)
        return 1
    try:
        layers = build_layers(args.output, args.volume)
        volume = args.volume or next(iter(volume_folders(args.output)))
        viewer = open_viewer(layers, f"X-Pression: {volume}", show=args.screenshot is None)
    except ViewError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    viewer.dims.ndisplay = args.ndisplay
    if args.screenshot:
        viewer.window.resize(1400, 900)
        viewer.screenshot(args.screenshot, canvas_only=False)
        viewer.close()
        print(f"screenshot: {args.screenshot}")
        return 0
    import napari

    napari.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
