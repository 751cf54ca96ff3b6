"""``infer.py``: a trained run over held-out volumes -> maps, previews, figures, scores.

Order: check the config's values, resolve the run (checkpoint + config), check that the output
folder can be written, open every volume and check voxel sizes, grids and existing outputs (all
before any network compute), then per volume: tissue mask,
normaliser, sweep into ``<output>/<volume_id>/maps.ome.zarr``; rank 0 adds the CT preview,
optional BigTIFF and figures. Scoring the maps against a synthetic cohort's truth is the
evaluation layer's (``xpression.evaluation.maps``; ``infer.py`` runs it after the sweep).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xpression.inference.predictor import InferenceError, Predictor
from xpression.inference.runs import RunInfo, load_predictor, resolve_run
from xpression.inference.shards import dist_rank_world, process_device
from xpression.inference.volume_sweep import infer_volume, plan_grid
from xpression.inference.writers import _read_meta, export_bigtiff, read_maps, write_ct_preview

__all__ = ["infer", "VolumeJob", "plan_jobs"]

log = logging.getLogger(__name__)


@dataclass
class VolumeJob:
    volume_id: str
    volume: Any
    section_z_um: float | None  # trained section of this volume (axial), if any
    out_dir: Path


def _plain(cfg: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def _open(path: Path, voxel_size_um: Any, model_vs: tuple | None, resample: bool, vid: str) -> Any:
    from xpression.data.volume import VolumeError, open_volume
    from xpression.inference.resample import ResampledVolume

    try:
        vol = open_volume(path, voxel_size_um)
    except VolumeError as exc:
        raise InferenceError(f"volume {vid}: {exc}") from exc
    if model_vs is not None and not np.allclose(vol.voxel_size_um, model_vs, rtol=1e-3):
        if not resample:
            raise InferenceError(
                f"volume {vid} ({path}) has voxels of {list(vol.voxel_size_um)} um but the model was trained at "
                f"{list(model_vs)} um; pass resample=true to resample it on the fly (trilinear)")
        vol = ResampledVolume(vol, model_vs)
    return vol


def plan_jobs(cfg: Any, info: RunInfo) -> tuple[list[VolumeJob], Any]:
    """The volumes to sweep (opened, voxel sizes checked) and the cohort (or None)."""
    from xpression.data.manifest import load_manifest

    out = Path(cfg.output)
    model_vs = info.voxel_size_um
    if cfg.get("volume"):
        path = Path(cfg.volume)
        vid = cfg.get("volume_id") or path.name.split(".")[0]
        vol = _open(path, cfg.get("voxel_size_um"), model_vs, bool(cfg.resample), vid)
        return [VolumeJob(vid, vol, None, out / vid)], None
    manifest = cfg.get("cohort") or info.manifest
    if not manifest:
        raise InferenceError("nothing to sweep: give cohort=<cohort.yaml> or volume=<path>")
    cohort = load_manifest(manifest)
    trained = set(info.trained_sections or [s.id for s in cohort.sections])
    wanted = cfg.get("volumes")
    jobs = []
    for v in cohort.volumes:
        if wanted and v.id not in wanted:
            continue
        z = [s.z_um for s in v.sections if s.id in trained and s.is_axial]
        vol = _open(v.image, v.voxel_size_um, model_vs, bool(cfg.resample), v.id)
        jobs.append(VolumeJob(v.id, vol, z[0] if z else None, out / v.id))
    if wanted and len(jobs) != len(set(wanted)):
        raise InferenceError(f"volumes {sorted(set(wanted) - {j.volume_id for j in jobs})} not in {cohort.path}")
    return jobs, cohort


def _normalizer(volume: Any, info: RunInfo) -> Any:
    """The training run's intensity transform, applied to this volume (same code as training)."""
    from xpression.data.datamodule import volume_intensity_transform
    from xpression.data.manifest import load_manifest

    base = getattr(volume, "source", volume)
    data_cfg = info.config.get("data") or {}
    reference = data_cfg.get("intensity_reference")
    # A reference volume id names a volume of the *training* cohort.
    training_cohort = load_manifest(data_cfg["manifest"]) if reference and data_cfg.get("manifest") else None
    from xpression.data.intensity import Quantised

    norm = volume_intensity_transform(base, training_cohort, reference, seed=info.seed,
                                      intensity=data_cfg.get("intensity", "robust"))
    # Training caches normalised slabs as uint8 (round(255 x)) unless data.cache_dtype says otherwise.
    quantise = data_cfg.get("cache_dtype", "uint8") == "uint8"
    described = norm.to_dict() if hasattr(norm, "to_dict") else {"reference": str(reference), **norm.normalizer.to_dict()}
    return (Quantised(norm) if quantise else norm), described


def _mask(volume: Any, cfg: Any) -> Any:
    if not cfg.mask.enabled:
        return None
    from xpression.data.mask import tissue_mask

    params = {k: v for k, v in _plain(cfg.mask).items() if k != "enabled"}
    return tissue_mask(getattr(volume, "source", volume), **params)


def _precheck(jobs: list[VolumeJob], pred: Predictor, cfg: Any, identity: dict) -> None:
    """Grids and existing outputs, for every volume, before any compute."""
    for job in jobs:
        plan_grid(job.volume, pred, cfg.spacing_um, cfg.mode, (job.section_z_um, None, None))
        meta = _read_meta(job.out_dir / "maps.ome.zarr")
        if meta is not None and not cfg.overwrite and meta.get("identity", {}).get("checkpoint_sha256") != identity["checkpoint_sha256"]:
            raise InferenceError(
                f"{job.out_dir / 'maps.ome.zarr'} holds maps of a different run (checkpoint "
                f"{meta.get('identity', {}).get('checkpoint_sha256', '?')[:12]}, run {meta.get('identity', {}).get('run_dir')}); "
                "choose another output or pass overwrite=true")


def infer(cfg: Any) -> dict:
    """Run the whole sweep described by the ``conf/infer.yaml`` config; returns a summary."""
    from xpression.config import check_infer_config, check_output_writable

    check_infer_config(cfg)
    info = resolve_run(cfg.run, cfg.checkpoint)
    check_output_writable(cfg.output)  # before the model loads
    pred, hp = load_predictor(info, process_device(cfg.device), cfg.precision, compile=bool(cfg.get("compile", False)))
    if pred.device.type == "cuda":
        import torch

        torch.cuda.set_device(pred.device)
        if cfg.get("cudnn_benchmark", True):
            torch.backends.cudnn.benchmark = True  # tiles of one shape: each convolution autotuned once
    jobs, cohort = plan_jobs(cfg, info)
    identity = info.identity()
    _precheck(jobs, pred, cfg, identity)
    rank, world = dist_rank_world()
    spec = hp.get("target_spec") or {}
    genes = _gene_loadings(cfg, info, spec, jobs, identity)  # hook: gene maps (xpression.inference.genes)
    meta_common = {"run_config": info.config, "checkpoint": str(info.checkpoint), "target_kind": spec.get("kind"),
                   "target_colors": spec.get("colors"), "infer_config": _plain(cfg)}
    summary: dict = {"run_dir": str(info.run_dir), "cohort": str(cohort.path) if cohort is not None else None, "volumes": {}}
    for job in jobs:
        normalize, norm_meta = _normalizer(job.volume, info)
        mask = _mask(job.volume, cfg)
        res = infer_volume(
            job.volume, pred, job.out_dir / "maps.ome.zarr", spacing_um=cfg.spacing_um, mode=cfg.mode,
            tile_vox=cfg.tile_vox, overlap=cfg.overlap, batch_size=cfg.batch_size, mask=mask,
            normalize=normalize, identity=identity, anchor_um=(job.section_z_um, None, None),
            metadata={**meta_common, "volume_id": job.volume_id, "normalizer": norm_meta,
                      "ct": {"path": str(getattr(job.volume, "path", "")), "preview": "../ct_preview.ome.zarr"}},
            levels=cfg.levels, overwrite=cfg.overwrite, rank=rank, world=world, prefetch=cfg.prefetch,
            readers=cfg.get("readers"), pad_tiles=cfg.get("pad_tiles"), progress=cfg.progress)
        for note in res.notes:
            log.info("%s grid: %s", job.volume_id, note)
        summary["volumes"][job.volume_id] = {"path": str(res.path), "tiles": res.tiles_computed, "seconds": round(res.seconds, 2),
                                             "grid": res.grid.to_dict(), "notes": res.notes, "skipped": res.skipped,
                                             "section_z_um": job.section_z_um}
        if rank == 0:
            _extras(job, res, pred, cfg, meta_common["target_kind"])
            if genes is not None:  # hook: gene maps (xpression.inference.genes)
                from xpression.inference.genes import write_gene_maps

                path = write_gene_maps(res.path, genes, overwrite=bool(cfg.overwrite))
                summary["volumes"][job.volume_id]["genes"] = {"path": str(path), "genes": genes.genes, "units": genes.units}
    if rank == 0:
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _gene_loadings(cfg: Any, info: RunInfo, spec: dict, jobs: list[VolumeJob], identity: dict) -> Any:
    """``genes=[...]``: the run's gene loadings restricted to them, and every existing gene store
    checked, before any sweep (None without ``genes``)."""
    if not cfg.get("genes"):
        return None
    from xpression.inference.genes import check_gene_store, gene_loadings

    if spec.get("kind", "composition") != "composition":
        raise InferenceError(f"genes=[...] needs a composition target (compartments or programs); this run predicts "
                             f"{spec.get('kind')}")
    loadings = gene_loadings(info, list(spec.get("names") or [])).select(list(cfg.genes))
    for job in jobs:
        check_gene_store(job.out_dir / "genes.ome.zarr", identity, loadings, bool(cfg.overwrite))
    return loadings


def _extras(job: VolumeJob, res: Any, pred: Predictor, cfg: Any, kind: str | None) -> None:
    from xpression.inference.figures import plot_depth_proportions, plot_orthoviews

    maps, meta = read_maps(res.path)
    ct = None
    if cfg.ct_preview:
        ct_path = job.out_dir / "ct_preview.ome.zarr"
        if not ct_path.exists() or cfg.overwrite or res.tiles_computed:
            write_ct_preview(job.volume, res.grid, ct_path, overwrite=True)
        import zarr

        ct = zarr.open_group(str(ct_path), mode="r")["0"]
    if cfg.bigtiff:
        export_bigtiff(res.path, job.out_dir / "maps.tif", job.out_dir / "ct_preview.ome.zarr" if cfg.ct_preview else None)
    if cfg.figures:
        names, colors = list(meta["targets"]), meta.get("target_colors")
        label = "predicted proportion" if (kind or "composition") == "composition" else "predicted value"
        plot_orthoviews(maps, res.grid, names, job.out_dir / "figures" / "orthoviews.png", ct=ct, title=job.volume_id,
                        section_z_um=job.section_z_um, value_label=label, colors=colors)
        plot_depth_proportions(maps, res.grid, names, job.out_dir / "figures" / "proportions_by_depth.png",
                               kind=kind or "composition", title=job.volume_id, section_z_um=job.section_z_um,
                               colors=colors)
